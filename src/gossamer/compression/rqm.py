"""The Randomized Quantization Mechanism (RQM): a quantizer that is also a DP mechanism.

Youn, Hu, Ziani, Abernethy 2023, "Randomized Quantization is All You Need for Differential
Privacy in Federated Learning", arXiv:2306.11913. Each coordinate, clipped to ``[-c, c]``, is
quantized on ``m`` evenly spaced levels ``B(i) = -(c + D) + i 2 (c + D) / (m - 1)`` that
extend ``D`` (the paper's Delta) beyond the clipping range. The two endpoint levels are always
kept, every interior level independently with probability ``q``; the value is then rounded
stochastically to one of the two kept levels around it (unbiased for every kept set). Its
Renyi DP is computed by :mod:`gossamer.privacy.rqm`.
"""

from __future__ import annotations

import math

import numpy as np
import torch

import gossamer.compression._bits as _bits
from gossamer.compression.base import (
    COMPRESSORS,
    TAG_RQM,
    Compressor,
    Encoded,
    as_float,
    as_int,
    check_batch,
    row_keys,
    row_uniform,
)


def level_width(levels: int) -> int:
    """Bits per level index: ``ceil(log2 m)``."""
    return (levels - 1).bit_length()


@COMPRESSORS.register("rqm")
class RQM(Compressor):
    """RQM with clipping bound ``c`` > 0, ``levels`` m in 2..65536, keep probability ``q`` in
    (0, 1] and range extension ``extension`` D >= 0 (the paper's Delta; D > 0 for privacy).

    Sampling: only the two kept levels around ``x`` matter, and they are independent: with
    ``x`` in cell ``[B(j), B(j+1))``, the lower one is ``max(0, j - G1)`` and the upper one
    ``min(m - 1, j + 1 + G2)``, where ``G1``, ``G2`` count the consecutive dropped levels,
    geometric with ``P(G >= t) = (1 - q)**t``. This draws the same distribution as flipping
    ``m - 2`` coins, with three uniforms per coordinate, keyed by ``(seed, key, TAG_RQM, k, j)``
    for ``k`` = 0 (down gap), 1 (up gap), 2 (rounding).

    Wire: the ``P`` level indices, ``ceil(log2 m)`` bits each, bit-packed (no header: ``c``,
    ``m`` and ``D`` are parameters both ends know); ``ceil(P ceil(log2 m) / 8)`` bytes.
    Unbiased for inputs inside ``[-c, c]`` (``E[decoded] = clip(x)``). Inputs must be finite.
    """

    name = "rqm"
    unbiased = False            # unbiased for |x_j| <= c only: larger entries are clipped

    def __init__(self, c: float = 1.0, levels: int = 16, q: float = 0.5,
                 extension: float = 1.0) -> None:
        self.c = as_float("c", c)
        if self.c <= 0:
            raise ValueError(f"c must be a number > 0, got {c!r}")
        self.levels = as_int("levels", levels, lo=2, hi=65536)
        self.q = as_float("q", q)
        if not 0 < self.q <= 1:
            raise ValueError(f"q must be a number in (0, 1], got {q!r}")
        self.extension = as_float("extension", extension)
        self.width = level_width(self.levels)
        self.top = self.c + self.extension
        self.step = 2.0 * self.top / (self.levels - 1)      # Python float64: same at both ends

    def _values(self, index: torch.Tensor) -> torch.Tensor:
        """``B(index) = -(c + D) + index * step`` in float64 (the formula of both ends)."""
        return -self.top + index.double() * self.step

    def compress(self, x, *, seed=0, keys=None):
        check_batch(x)
        keys = row_keys(x, keys)
        n, p = x.shape
        m = self.levels
        xc = x.double().clamp(-self.c, self.c)
        # the cell j with B(j) <= x < B(j+1), corrected against the levels as computed
        j = ((xc + self.top) / self.step).floor().clamp_(0, m - 2).long()
        j = j - (self._values(j) > xc).long()
        j = (j + (self._values(j + 1) <= xc).long()).clamp_(0, m - 2)
        u = [row_uniform(seed, keys, TAG_RQM, p, k, device=x.device) for k in range(3)]
        if self.q < 1:
            scale = 1.0 / math.log1p(-self.q)
            gaps = [(torch.log1p(-v) * scale).floor().clamp_(0, m).long() for v in u[:2]]
        else:
            gaps = [torch.zeros_like(j), torch.zeros_like(j)]
        lower = (j - gaps[0]).clamp_(min=0)
        upper = (j + 1 + gaps[1]).clamp_(max=m - 1)
        b_lo, b_hi = self._values(lower), self._values(upper)
        up = u[2] < (xc - b_lo) / (b_hi - b_lo)
        index = torch.where(up, upper, lower).to(torch.int32)
        return Encoded({"index": index}, np.full(n, self.nominal_bytes(p), dtype=np.int64), p)

    def decompress(self, enc):
        return self._values(enc.parts["index"]).float()

    def to_bytes(self, enc, row):
        return _bits.pack_fixed(enc.parts["index"][row].cpu().numpy(), self.width)

    def from_bytes(self, data, numel, *, seed=0, key=0):
        if len(data) != self.nominal_bytes(numel):
            raise ValueError(f"rqm payload has {len(data)} bytes, expected "
                             f"{self.nominal_bytes(numel)}")
        index = _bits.unpack_fixed(data, numel, self.width)
        if numel and int(index.max()) >= self.levels:
            raise ValueError(f"rqm level index {int(index.max())} out of range for "
                             f"{self.levels} levels")
        return self._values(torch.from_numpy(index)).float()

    def nominal_bytes(self, numel):
        return _bits.fixed_bytes(numel, self.width)
