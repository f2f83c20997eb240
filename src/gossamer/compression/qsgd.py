"""QSGD: stochastic rounding of ``|x| / ||x||_2`` onto ``s`` levels, unbiased.

Alistarh, Grubic, Li, et al. 2017, "QSGD: Communication-Efficient SGD via Gradient
Quantization and Encoding", arXiv:1610.02132. Entry ``j`` of a row becomes
``||x||_2 * sign(x_j) * l_j / s`` with ``l_j = floor(r) + Bernoulli(r - floor(r))``,
``r = s |x_j| / ||x||_2``, so ``E[l_j] = r`` and the result is unbiased. No bucketing: the
whole row shares one norm.
"""

from __future__ import annotations

import numpy as np
import torch

import gossamer.compression._bits as _bits
from gossamer.compression.base import (
    COMPRESSORS,
    TAG_QSGD,
    Compressor,
    Encoded,
    as_int,
    check_batch,
    row_keys,
    row_uniform,
)


def _gamma_len(n: torch.Tensor) -> torch.Tensor:
    """Elias-gamma lengths ``2 floor(log2 n) + 1`` (exact for n < 2**53)."""
    return 2 * (torch.frexp(n.double()).exponent.long() - 1) + 1


def _decode(levels: torch.Tensor, negative: torch.Tensor, norm: torch.Tensor, s: int
            ) -> torch.Tensor:
    """``norm * sign * level / s``, the one formula both ends use: the product is exact in
    float64 and the division by a tensor IEEE-exact on every device, so ends agree to the bit."""
    s_t = torch.full((1, 1), float(s), dtype=torch.float64, device=levels.device)
    mag = (norm.double()[:, None] * levels.double() / s_t).float()
    return torch.where(negative, -mag, mag)


@COMPRESSORS.register("qsgd")
class QSGD(Compressor):
    """QSGD with ``levels`` = s quantization levels and a fixed or Elias-gamma wire code.

    ``coding: fixed``: ``f32 norm`` then, per entry, a ``ceil(log2(s+1)) + 1``-bit code
    ``level << 1 | negative``, bit-packed (fixed size). ``coding: elias``: the paper's sparse
    code: ``f32 norm, u32 count`` of nonzero levels, then per nonzero entry, in index order,
    Elias-gamma(gap to the previous nonzero index, the first counted from -1), one sign bit
    (1 = negative), Elias-gamma(level); zero-padded to a byte (variable size).
    Stochastic rounding draws ``u`` keyed by ``(seed, key, TAG_QSGD, j)``.
    """

    name = "qsgd"
    unbiased = True

    def __init__(self, levels: int = 4, coding: str = "fixed") -> None:
        self.levels = as_int("levels", levels, lo=1, hi=2**16 - 1)
        if coding not in ("fixed", "elias"):
            raise ValueError(f"coding must be 'fixed' or 'elias', got {coding!r}")
        self.coding = coding
        self.width = self.levels.bit_length() + 1  # level bits + sign bit

    def compress(self, x, *, seed=0, keys=None):
        check_batch(x)
        keys = row_keys(x, keys)
        n, p = x.shape
        s = self.levels
        norm = x.double().norm(dim=1).float()
        # Levels are relative to the float32 norm that travels, so the receiver is unbiased.
        denom = norm.double().clamp_min(1e-300)[:, None]
        r = torch.where(norm[:, None] > 0, x.double().abs() / denom * s, 0.0).clamp_(0, s)
        u = row_uniform(seed, keys, TAG_QSGD, p, device=x.device)
        floor = r.floor()
        levels = (floor + (u < r - floor).double()).clamp_(0, s).to(torch.int32)
        negative = (x < 0) & (levels > 0)
        return Encoded({"levels": levels, "negative": negative, "norm": norm},
                       self._nbytes(levels), p)

    def _nbytes(self, levels: torch.Tensor) -> np.ndarray:
        n, p = levels.shape
        if self.coding == "fixed":
            return np.full(n, 4 + _bits.fixed_bytes(p, self.width), dtype=np.int64)
        nz = levels > 0
        cols = torch.arange(p, device=levels.device).expand(n, p)
        last = torch.where(nz, cols, -1).cummax(dim=1).values
        prev = torch.cat([torch.full((n, 1), -1, device=levels.device), last[:, :-1]], dim=1)
        gap = (cols - prev).clamp_min(1)
        bits = torch.where(nz, _gamma_len(gap) + 1 + _gamma_len(levels.clamp_min(1)), 0)
        return 8 + (bits.sum(dim=1).cpu().numpy().astype(np.int64) + 7) // 8

    def decompress(self, enc):
        return _decode(enc.parts["levels"], enc.parts["negative"], enc.parts["norm"],
                       self.levels)

    def to_bytes(self, enc, row):
        levels = enc.parts["levels"][row].cpu().numpy().astype(np.int64)
        negative = enc.parts["negative"][row].cpu().numpy()
        head = _bits.F32.pack(float(enc.parts["norm"][row]))
        if self.coding == "fixed":
            return head + _bits.pack_fixed((levels << 1) | negative, self.width)
        pos = np.flatnonzero(levels)
        gaps = np.diff(pos, prepend=-1)
        values = np.stack([gaps, negative[pos].astype(np.int64), levels[pos]], axis=1)
        lengths = np.stack([_bits.gamma_lengths(gaps), np.ones_like(gaps),
                            _bits.gamma_lengths(levels[pos])], axis=1)
        return (head + _bits.U32.pack(pos.size)
                + _bits.pack_varlen(values.reshape(-1), lengths.reshape(-1)))

    def from_bytes(self, data, numel, *, seed=0, key=0):
        head = 4 if self.coding == "fixed" else 8
        if len(data) < head:
            raise ValueError(f"qsgd payload of {len(data)} bytes is shorter than its header")
        (norm,) = _bits.F32.unpack_from(data)
        if not (np.isfinite(norm) and norm >= 0):
            raise ValueError(f"qsgd payload has a bad norm {norm}")
        if self.coding == "fixed":
            if len(data) != self.nominal_bytes(numel):
                raise ValueError(f"qsgd payload has {len(data)} bytes, expected "
                                 f"{self.nominal_bytes(numel)}")
            codes = _bits.unpack_fixed(memoryview(data)[4:], numel, self.width)
            levels, negative = codes >> 1, (codes & 1) == 1
            if levels.max(initial=0) > self.levels or np.any(negative & (levels == 0)):
                raise ValueError("qsgd payload has a level above s or a signed zero")
        else:
            levels, negative = self._parse_elias(data, numel)
        return _decode(torch.from_numpy(levels)[None], torch.from_numpy(negative)[None],
                       torch.tensor([norm], dtype=torch.float32), self.levels)[0]

    def _parse_elias(self, data: bytes, numel: int) -> tuple[np.ndarray, np.ndarray]:
        (count,) = _bits.U32.unpack_from(data, 4)
        if count > numel:
            raise ValueError(f"qsgd payload claims {count} nonzeros out of {numel}")
        levels = np.zeros(numel, dtype=np.int64)
        negative = np.zeros(numel, dtype=bool)
        reader = _bits.GammaReader(memoryview(data)[8:])
        pos = -1
        for _ in range(count):  # sequential by nature: each code's start depends on the last
            pos += reader.gamma()
            sign = reader.bit()
            level = reader.gamma()
            if pos >= numel or level > self.levels:
                raise ValueError(f"qsgd payload has index {pos} (of {numel}) or level "
                                 f"{level} (of {self.levels}) out of range")
            levels[pos], negative[pos] = level, sign == 1
        reader.check_end()
        return levels, negative

    def nominal_bytes(self, numel):
        return 4 + _bits.fixed_bytes(numel, self.width) if self.coding == "fixed" else None
