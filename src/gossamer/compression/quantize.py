"""Uniform b-bit quantization between each row's min and max, and scaled sign compression.

``quantize``: codes ``c = round((x - min) / step)`` with ``step = (max - min) / (2**b - 1)``,
rounded stochastically (unbiased) or to nearest; the receiver gets ``min + c * step``.
``sign``: ``(||x||_1 / P) * sign(x)``, the compressor of EF-signSGD (Karimireddy, Rebjock,
Stich, et al. 2019, "Error Feedback Fixes SignSGD and other Gradient Compression Schemes",
arXiv:1901.09847); biased, meant for use with error feedback.
"""

from __future__ import annotations

import numpy as np
import torch

import gossamer.compression._bits as _bits
from gossamer.compression.base import (
    COMPRESSORS,
    TAG_QUANTIZE,
    Compressor,
    Encoded,
    as_bool,
    as_int,
    check_batch,
    row_keys,
    row_uniform,
)


def _step(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
    """Level spacing ``(hi - lo) / (2**bits - 1)`` in float64; dividing by a tensor (not a
    Python scalar, which CUDA turns into a multiply by the reciprocal) keeps it IEEE-exact, so
    a GPU sender and a CPU receiver agree to the bit."""
    return (hi.double() - lo.double()) / torch.full_like(lo, 2**bits - 1, dtype=torch.float64)


def _dequantize(codes: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int
                ) -> torch.Tensor:
    """``lo + codes * step`` in float64, rounded once to float32: the formula of both ends."""
    return (lo.double()[:, None] + codes.double() * _step(lo, hi, bits)[:, None]).float()


@COMPRESSORS.register("quantize")
class Quantize(Compressor):
    """Stochastic (unbiased) or nearest ``bits``-bit uniform quantization per row.

    Wire: ``f32 min, f32 max`` then ``P`` codes of ``bits`` bits, bit-packed (``8 +
    ceil(P bits / 8)`` bytes). Stochastic rounding draws ``u`` keyed by
    ``(seed, key, TAG_QUANTIZE, j)`` and rounds up with probability equal to the fraction.
    Inputs must be finite.
    """

    name = "quantize"

    def __init__(self, bits: int = 8, stochastic: bool = True) -> None:
        self.bits = as_int("bits", bits, lo=1, hi=16)
        self.stochastic = as_bool("stochastic", stochastic)
        self.unbiased = self.stochastic

    def compress(self, x, *, seed=0, keys=None):
        check_batch(x)
        keys = row_keys(x, keys)
        n, p = x.shape
        top = 2**self.bits - 1
        lo, hi = x.min(dim=1).values, x.max(dim=1).values
        step = _step(lo, hi, self.bits)
        # The position of x between the levels the receiver will rebuild (float32 lo, step).
        r = torch.where(step[:, None] > 0, (x.double() - lo.double()[:, None])
                        / step.clamp_min(1e-300)[:, None], 0.0).clamp_(0, top)
        if self.stochastic:
            u = row_uniform(seed, keys, TAG_QUANTIZE, p, device=x.device)
            floor = r.floor()
            codes = floor + (u < r - floor).double()
        else:
            codes = r.round()
        codes = codes.clamp_(0, top).to(torch.int32)
        return Encoded({"codes": codes, "lo": lo, "hi": hi},
                       np.full(n, self.nominal_bytes(p), dtype=np.int64), p)

    def decompress(self, enc):
        return _dequantize(enc.parts["codes"], enc.parts["lo"], enc.parts["hi"], self.bits)

    def to_bytes(self, enc, row):
        head = _bits.F32.pack(float(enc.parts["lo"][row])) + _bits.F32.pack(
            float(enc.parts["hi"][row]))
        return head + _bits.pack_fixed(enc.parts["codes"][row].cpu().numpy(), self.bits)

    def from_bytes(self, data, numel, *, seed=0, key=0):
        if len(data) != self.nominal_bytes(numel):
            raise ValueError(f"quantize payload has {len(data)} bytes, expected "
                             f"{self.nominal_bytes(numel)}")
        lo, hi = np.frombuffer(data[:8], dtype="<f4").astype(np.float32)
        if not (np.isfinite(lo) and np.isfinite(hi) and lo <= hi):
            raise ValueError(f"quantize payload has a bad range [{lo}, {hi}]")
        codes = torch.from_numpy(_bits.unpack_fixed(memoryview(data)[8:], numel, self.bits))
        return _dequantize(codes[None], torch.tensor([lo], dtype=torch.float32),
                           torch.tensor([hi], dtype=torch.float32), self.bits)[0]

    def nominal_bytes(self, numel):
        return 8 + _bits.fixed_bytes(numel, self.bits)


@COMPRESSORS.register("sign")
class ScaledSign(Compressor):
    """``(||x||_1 / P) * sign(x)`` with sign(0) = +1: one bit per entry and one float32.

    Wire: ``f32 scale`` then ``P`` sign bits (1 = negative), bit-packed (``4 + ceil(P / 8)``).
    """

    name = "sign"

    def compress(self, x, *, seed=0, keys=None):
        check_batch(x)
        row_keys(x, keys)
        n, p = x.shape
        scale = (x.double().abs().sum(dim=1) / p).float()
        return Encoded({"negative": x < 0, "scale": scale},
                       np.full(n, self.nominal_bytes(p), dtype=np.int64), p)

    @staticmethod
    def _expand(negative: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return torch.where(negative, -scale[:, None], scale[:, None])

    def decompress(self, enc):
        return self._expand(enc.parts["negative"], enc.parts["scale"])

    def to_bytes(self, enc, row):
        bits = enc.parts["negative"][row].cpu().numpy().astype(np.uint8)
        return _bits.F32.pack(float(enc.parts["scale"][row])) + _bits.pack_fixed(bits, 1)

    def from_bytes(self, data, numel, *, seed=0, key=0):
        if len(data) != self.nominal_bytes(numel):
            raise ValueError(f"sign payload has {len(data)} bytes, expected "
                             f"{self.nominal_bytes(numel)}")
        (scale,) = _bits.F32.unpack_from(data)
        negative = torch.from_numpy(_bits.unpack_fixed(memoryview(data)[4:], numel, 1) == 1)
        return self._expand(negative[None], torch.tensor([scale], dtype=torch.float32))[0]

    def nominal_bytes(self, numel):
        return 4 + _bits.fixed_bytes(numel, 1)
