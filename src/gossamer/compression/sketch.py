"""Count sketch as a compressor, and FetchSGD's server step in sketch space.

Count sketch: Moses Charikar, Kevin Chen, Martin Farach-Colton, "Finding frequent items in
data streams", ICALP 2002. A sketch has ``r`` rows of ``c`` buckets; coordinate ``j`` goes to
bucket ``h_i(j)`` of row ``i`` with sign ``s_i(j)``, so ``S(x)[i, b] = sum_{j: h_i(j) = b}
s_i(j) x_j``. The estimate of ``x_j`` is the median over rows of ``s_i(j) S(x)[i, h_i(j)]``.

The hashes depend only on ``(seed, i, j)``: counter-based (``rng.STREAM_COMPRESS`` with the
row key ``SHARED_KEY`` that no sender has, tag ``TAG_COUNTSKETCH``), never on the sender or
the round. Every sender therefore sketches with the same linear map, and the sum of the
sketches of several vectors is the sketch of their sum: a server can aggregate sketches
without decoding them.

FetchSGD: Daniel Rothchild, Ashwinee Panda, Enayat Ullah, et al., "FetchSGD:
Communication-Efficient Federated Learning with Sketching", ICML 2020, arXiv:2007.07682.
Clients send sketches and keep no state; the server keeps momentum and error accumulation
as sketches (:func:`fetchsgd_step`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from gossamer import rng
from gossamer.compression.base import (
    COMPRESSORS,
    TAG_COUNTSKETCH,
    Compressor,
    Encoded,
    _splitmix64,
    _srl,
    as_density,
    as_int,
    check_batch,
    k_of,
    row_keys,
)

SHARED_KEY = -1          # the hashes' row key: 2**64 - 1, no sender's key (client * 2**32 + round)
MAX_COLUMNS = 2**31 - 1  # keeps the bucket arithmetic ((hash >> 32) * c) inside int64
_CHUNK = 1 << 23         # estimates are computed for at most this many [row, sketch row, j] cells


@COMPRESSORS.register("countsketch")
class CountSketch(Compressor):
    """A count sketch of ``rows`` x ``columns`` float32 buckets per vector.

    Params: ``rows`` r in 1..255 (5); ``columns`` c >= 1 **or** ``ratio`` in (0, 1], the sketch
    size relative to the vector (``c = max(1, round(ratio * P / r))``); optionally ``k`` >= 1
    **or** ``density`` in (0, 1]: how many heavy hitters the receiver recovers (below).

    ``decompress``/``from_bytes`` give the count-sketch estimate of every coordinate (the
    median over the rows of ``s_i(j) table[i, h_i(j)]``; for an even ``r`` the mean of the two
    middle values), or, with ``k``, only the ``k`` estimates of largest magnitude (ties to the
    lower index) and zeros elsewhere. FetchSGD unsketches its ``k`` heavy hitters this way.

    Wire: the ``r x c`` table, float32 row-major (``4 r c`` bytes, fixed). ``from_bytes``
    rejects a payload of another length and non-finite buckets.

    Bias (``unbiased = False``): the hashes are fixed by the seed, so for a given seed the
    estimate is a deterministic function of ``x`` and is off by the colliding coordinates'
    signed mass. Over the draw of the hash functions, one row's estimate ``s_i(j)
    table[i, h_i(j)]`` is unbiased (the colliding terms have random signs), and so is the mean
    of two (``r = 2``). The median of ``r >= 3`` rows is unbiased when the rows' errors are
    independent and symmetric about zero, as with fully random signs; the pairwise independent
    hash families of the count sketch's analysis do not guarantee that, and in general (for
    skewed error distributions) the median is biased.
    """

    name = "countsketch"
    unbiased = False

    def __init__(self, rows: int = 5, columns: int | None = None, ratio: float | None = None,
                 k: int | None = None, density: float | None = None) -> None:
        self.rows = as_int("rows", rows, lo=1, hi=255)
        if (columns is None) == (ratio is None):
            raise ValueError("countsketch needs exactly one of columns or ratio")
        self.columns = None if columns is None else as_int("columns", columns, lo=1, hi=MAX_COLUMNS)
        self.ratio = None if ratio is None else as_density("ratio", ratio)
        if k is not None and density is not None:
            raise ValueError("countsketch takes at most one of k or density (heavy hitters)")
        self.k = None if k is None else as_int("k", k, lo=1)
        self.density = None if density is None else as_density("density", density)
        self._hashes: dict[tuple[int, int, str], tuple[torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------------ sizes
    def columns_for(self, numel: int) -> int:
        """Buckets per row for vectors of ``numel`` entries."""
        if self.columns is not None:
            return self.columns
        return min(MAX_COLUMNS, max(1, math.floor(self.ratio * numel / self.rows + 0.5)))

    def k_for(self, numel: int) -> int | None:
        """Heavy hitters the receiver recovers (None: every coordinate's estimate)."""
        if self.k is not None:
            return min(self.k, numel)
        return None if self.density is None else k_of(self.density, numel)

    def nominal_bytes(self, numel):
        return 4 * self.rows * self.columns_for(numel)

    # ------------------------------------------------------------------ the linear map
    def hashes(self, numel: int, seed: int, device: torch.device | str = "cpu"
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(buckets, signs)``, both ``[r, P]``: ``h_i(j)`` (int64 in ``[0, c)``) and
        ``s_i(j)`` (float32 +-1). From ``v = splitmix64(hash_u64(seed, STREAM_COMPRESS,
        SHARED_KEY, TAG_COUNTSKETCH, i) ^ j)``: ``h = ((v >> 32) * c) >> 32``, ``s = +1`` when
        ``v`` is even. Memoized per ``(seed, P, device)``."""
        cache = (int(seed), int(numel), str(device))
        if cache not in self._hashes:
            c = self.columns_for(numel)
            prefix = rng.hash_u64(seed, rng.STREAM_COMPRESS, SHARED_KEY, TAG_COUNTSKETCH,
                                  np.arange(self.rows, dtype=np.int64))
            h = torch.from_numpy(prefix.view(np.int64).copy()).to(device)[:, None]
            v = _splitmix64(h ^ torch.arange(numel, dtype=torch.int64, device=device)[None, :])
            buckets = (_srl(v, 32) * c) >> 32
            signs = (1 - 2 * (v & 1)).to(torch.float32)
            if len(self._hashes) >= 4:
                self._hashes.pop(next(iter(self._hashes)))
            self._hashes[cache] = (buckets, signs)
        return self._hashes[cache]

    def sketch(self, x: torch.Tensor, *, seed: int = 0) -> torch.Tensor:
        """``S(x)``: tables ``[N, r, c]`` of a float32 batch ``[N, P]``; row ``n``'s table
        depends on ``x[n]`` only (on a CPU each bucket sums its coordinates in index order)."""
        check_batch(x)
        n, p = x.shape
        buckets, signs = self.hashes(p, seed, x.device)
        tables = x.new_zeros(n, self.rows, self.columns_for(p))
        for i in range(self.rows):                   # over sketch rows, not coordinates
            tables[:, i].scatter_add_(1, buckets[i].expand(n, p), x * signs[i])
        return tables

    def sketch_sparse(self, indices: torch.Tensor, values: torch.Tensor, numel: int, *,
                      seed: int = 0) -> torch.Tensor:
        """``S(v)`` ``[r, c]`` of the vector ``v`` of ``numel`` entries that is ``values [k]``
        at ``indices [k]`` (ascending) and zero elsewhere, without building ``v``."""
        buckets, signs = self.hashes(numel, seed, values.device)
        table = values.new_zeros(self.rows, self.columns_for(numel))
        for i in range(self.rows):
            table[i].index_add_(0, buckets[i, indices], values * signs[i, indices])
        return table

    # ------------------------------------------------------------------ estimates
    def estimate(self, tables: torch.Tensor, numel: int, *, seed: int = 0,
                 indices: torch.Tensor | None = None) -> torch.Tensor:
        """Count-sketch estimates ``[N, P]`` from tables ``[N, r, c]`` (``indices``: only those
        coordinates, ``[N, len(indices)]``). The median over rows, exact on any device (sign
        flips and comparisons; an even ``r`` averages the middle two as ``a / 2 + b / 2``)."""
        buckets, signs = self.hashes(numel, seed, tables.device)
        if indices is not None:
            buckets, signs = buckets[:, indices], signs[:, indices]
        n, r, width = tables.shape[0], self.rows, buckets.shape[1]
        out = tables.new_empty(n, width)
        step = max(1, _CHUNK // max(1, r * width))
        for lo in range(0, n, step):                 # chunks of rows bound the [n, r, P] buffer
            t = tables[lo: lo + step]
            vals = _sorted([t[:, i].index_select(1, buckets[i]) * signs[i] for i in range(r)])
            mid = vals[r // 2]
            out[lo: lo + step] = mid if r % 2 else vals[r // 2 - 1] * 0.5 + mid * 0.5
        return out

    @staticmethod
    def heavy_hitters(estimates: torch.Tensor, k: int) -> torch.Tensor:
        """Indices ``[N, k]`` (ascending) of the ``k`` largest ``|estimates|`` per row; ties go
        to the lower index (by comparisons only, so every device picks the same set). A NaN
        counts as infinitely large, so a diverged run carries on rather than failing here."""
        mag = estimates.abs().nan_to_num(nan=math.inf)
        kth = torch.topk(mag, k, dim=1, sorted=False).values.min(dim=1, keepdim=True).values
        above, tied = mag > kth, mag == kth
        room = k - above.sum(dim=1, keepdim=True)
        take = above | (tied & (tied.cumsum(dim=1) <= room))
        return take.nonzero()[:, 1].reshape(estimates.shape[0], k)

    def _unsketch(self, tables: torch.Tensor, numel: int, seed: int) -> torch.Tensor:
        est = self.estimate(tables, numel, seed=seed)
        k = self.k_for(numel)
        if k is None:
            return est
        idx = self.heavy_hitters(est, k)
        return torch.zeros_like(est).scatter_(1, idx, est.gather(1, idx))

    # ------------------------------------------------------------------ the contract
    def compress(self, x, *, seed=0, keys=None):
        check_batch(x)
        row_keys(x, keys)                 # validated, but unused: every sender shares the hashes
        n, p = x.shape
        return Encoded({"table": self.sketch(x, seed=seed)},
                       np.full(n, self.nominal_bytes(p), dtype=np.int64), p, {"seed": int(seed)})

    def decompress(self, enc):
        return self._unsketch(enc.parts["table"], enc.numel, enc.meta["seed"])

    def to_bytes(self, enc, row):
        return enc.parts["table"][row].cpu().numpy().astype("<f4").tobytes()

    def table_from_bytes(self, data: bytes, numel: int) -> torch.Tensor:
        """One payload's table ``[r, c]``, validated: exactly ``4 r c`` bytes, finite."""
        expected = self.nominal_bytes(numel)
        if len(data) != expected:
            raise ValueError(f"countsketch payload has {len(data)} bytes, expected {expected} "
                             f"({self.rows} x {self.columns_for(numel)} float32)")
        table = np.frombuffer(data, dtype="<f4").astype(np.float32)
        if not np.isfinite(table).all():
            raise ValueError("countsketch payload holds non-finite buckets")
        return torch.from_numpy(table.reshape(self.rows, self.columns_for(numel)))

    def from_bytes(self, data, numel, *, seed=0, key=0):
        return self._unsketch(self.table_from_bytes(data, numel)[None], numel, seed)[0]


def _sorted(values: list[torch.Tensor]) -> list[torch.Tensor]:
    """Elementwise sort of ``r`` equal-shaped tensors: an odd-even transposition network of
    ``min``/``max`` (exact; faster than ``torch.sort`` over a short axis) up to 16, else a sort."""
    r = len(values)
    if r > 16:
        return list(torch.stack(values).sort(dim=0).values)
    v = list(values)
    for rnd in range(r):
        for i in range(rnd % 2, r - 1, 2):
            v[i], v[i + 1] = torch.minimum(v[i], v[i + 1]), torch.maximum(v[i], v[i + 1])
    return v


# ---------------------------------------------------------------------- FetchSGD


class FetchSGDStep(NamedTuple):
    """One FetchSGD server step: the model ``update [P]`` (the heavy hitters' estimates at
    ``indices [k]``, zeros elsewhere) and the new ``momentum``/``error`` sketches ``[r, c]``."""

    update: torch.Tensor
    indices: torch.Tensor
    momentum: torch.Tensor
    error: torch.Tensor


RESETS = ("zero_buckets", "subtract")


def fetchsgd_step(sketch: CountSketch, table: torch.Tensor, momentum: torch.Tensor | None,
                  error: torch.Tensor | None, *, numel: int, seed: int = 0, rho: float = 0.9,
                  reset: str = "zero_buckets") -> FetchSGDStep:
    """FetchSGD's server step on the round's aggregated sketch ``table [r, c]`` (the weighted
    mean of the clients' sketches: by linearity, the sketch of their mean update).

    1. momentum ``S_u = rho S_u + table``; error accumulation ``S_e = S_e + S_u``;
    2. unsketch: ``Delta`` = the ``k`` estimates of largest magnitude of ``S_e``
       (``sketch.k``/``density``; the paper's variant without a second round trip);
    3. forget what was extracted, in ``S_e`` and ``S_u`` (momentum masking), by ``reset``:

       - ``zero_buckets`` (the reference code, kiddyboots216/CommEfficient): zero, in every
         row, the buckets of the coordinates with ``Delta_j != 0``. Whatever else those
         buckets held is dropped too.
       - ``subtract`` (the paper's Algorithm 1, line 14): ``S_e -= S(Delta)`` and
         ``S_u -= S(u_hat)``, ``u_hat`` = the estimates of ``S_u`` at the ``k`` coordinates.
         The sketches then hold exactly what was not extracted, and the extracted estimates
         become zero when no two of the ``k`` share a bucket (odd ``r``). When several do, each
         was given the whole bucket, so ``S(Delta)`` removes that bucket's mass several times
         and the bucket flips sign: the error grows instead of draining. With one row this
         happens at every step (a bucket's coordinates tie), and in tests it diverges.

    ``None`` state means zero sketches. The paper's learning rate (``S_e += eta S_u``) is left to
    the caller: with a constant ``eta`` every sketch of ``S_e`` and ``Delta`` scales by it, so
    applying ``eta Delta`` is the same step. The caller adds ``update`` to the model (updates
    here are model differences, already descent steps).
    """
    k = sketch.k_for(numel)
    if k is None:
        raise ValueError("fetchsgd unsketches the k heavy hitters: give countsketch k or density")
    if reset not in RESETS:
        raise ValueError(f"reset must be one of {', '.join(RESETS)}, got {reset!r}")
    u = table if momentum is None else torch.add(table, momentum, alpha=rho)
    e = u if error is None else error + u
    est = sketch.estimate(e[None], numel, seed=seed)[0]
    idx = sketch.heavy_hitters(est[None], k)[0]
    delta = est[idx]
    update = torch.zeros(numel, dtype=table.dtype, device=table.device).index_copy_(0, idx, delta)
    if reset == "zero_buckets":
        buckets, _ = sketch.hashes(numel, seed, table.device)
        hit = torch.zeros_like(e, dtype=torch.bool).scatter_(1, buckets[:, idx[delta != 0]], True)
        return FetchSGDStep(update, idx, u.masked_fill(hit, 0.0), e.masked_fill(hit, 0.0))
    e = e - sketch.sketch_sparse(idx, delta, numel, seed=seed)
    u_hat = sketch.estimate(u[None], numel, seed=seed, indices=idx)[0]
    u = u - sketch.sketch_sparse(idx, u_hat, numel, seed=seed)
    return FetchSGDStep(update, idx, u, e)
