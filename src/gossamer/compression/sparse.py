"""The identity baseline and the sparsifiers: top-k, random-k (shared seed), threshold.

Top-k and threshold rows are a ``u32`` count followed by a sparse block (``_bits.pack_block``:
ascending indices as a bitmap or an int32 list, whichever is smaller, then float32 values).
Random-k sends only its k float32 values: the receiver regenerates the indices from the seed
and the sender's key. Top-k with error feedback: Stich, Cordonnier, Jaggi 2018
("Sparsified SGD with Memory", arXiv:1809.07599); random-k's unbiased scaling follows the
same paper's rand-k operator.
"""

from __future__ import annotations

import numpy as np
import torch

import gossamer.compression._bits as _bits
from gossamer.compression.base import (
    COMPRESSORS,
    TAG_RANDK,
    Compressor,
    Encoded,
    as_bool,
    as_density,
    as_float,
    as_int,
    check_batch,
    k_of,
    row_keys,
    row_uniform,
)


def _check_len(data: bytes, expected: int, what: str) -> None:
    if len(data) != expected:
        raise ValueError(f"{what} payload has {len(data)} bytes, expected {expected}")


@COMPRESSORS.register("none")
class Identity(Compressor):
    """No compression: the row's float32 values, little-endian (``4 P`` bytes)."""

    name = "none"
    unbiased = True

    def compress(self, x, *, seed=0, keys=None):
        check_batch(x)
        row_keys(x, keys)
        n, p = x.shape
        return Encoded({"values": x.clone()}, np.full(n, 4 * p, dtype=np.int64), p)

    def decompress(self, enc):
        return enc.parts["values"].clone()

    def to_bytes(self, enc, row):
        return enc.parts["values"][row].cpu().numpy().astype("<f4").tobytes()

    def from_bytes(self, data, numel, *, seed=0, key=0):
        _check_len(data, 4 * numel, "uncompressed")
        return torch.from_numpy(np.frombuffer(data, dtype="<f4").astype(np.float32))

    def nominal_bytes(self, numel):
        return 4 * numel


def _dense(indices: np.ndarray, values: np.ndarray, numel: int) -> torch.Tensor:
    out = torch.zeros(numel, dtype=torch.float32)
    out[torch.from_numpy(indices)] = torch.from_numpy(values)
    return out


def _sparse_row_bytes(indices: np.ndarray, values: np.ndarray, numel: int) -> bytes:
    return _bits.U32.pack(indices.size) + _bits.pack_block(indices, values, numel)


def _parse_sparse_row(data: bytes, numel: int, what: str) -> tuple[int, torch.Tensor]:
    if len(data) < 4:
        raise ValueError(f"{what} payload of {len(data)} bytes has no count")
    (count,) = _bits.U32.unpack_from(data)
    if count > numel:
        raise ValueError(f"{what} payload claims {count} entries out of {numel}")
    indices, values = _bits.unpack_block(memoryview(data)[4:], count, numel)
    return count, _dense(indices, values, numel)


@COMPRESSORS.register("topk")
class TopK(Compressor):
    """Keep the ``k`` entries of largest magnitude per row, zeros elsewhere.

    ``density`` in (0, 1] (``k = max(1, round(density * P))``) or ``k`` directly. Ties in
    magnitude are broken by ``torch.topk``. Wire: ``u32 k`` + sparse block; the index part is
    a ``P``-bit bitmap when ``ceil(P / 8) < 4 k`` (density above ~1/32), else ``k`` int32.
    """

    name = "topk"

    def __init__(self, density: float | None = None, k: int | None = None) -> None:
        if (density is None) == (k is None):
            raise ValueError("topk needs exactly one of density or k")
        self.density = None if density is None else as_density("density", density)
        self.k = None if k is None else as_int("k", k, lo=1)

    def k_for(self, numel: int) -> int:
        return k_of(self.density, numel) if self.k is None else min(self.k, numel)

    def compress(self, x, *, seed=0, keys=None):
        check_batch(x)
        row_keys(x, keys)
        n, p = x.shape
        k = self.k_for(p)
        idx = torch.topk(x.abs(), k, dim=1, sorted=False).indices.sort(dim=1).values
        nbytes = np.full(n, 4 + _bits.block_bytes(k, p), dtype=np.int64)
        return Encoded({"indices": idx, "values": x.gather(1, idx)}, nbytes, p)

    def decompress(self, enc):
        idx, values = enc.parts["indices"], enc.parts["values"]
        out = torch.zeros(idx.shape[0], enc.numel, dtype=torch.float32, device=values.device)
        return out.scatter_(1, idx, values)

    def to_bytes(self, enc, row):
        return _sparse_row_bytes(enc.parts["indices"][row].cpu().numpy(),
                                 enc.parts["values"][row].cpu().numpy(), enc.numel)

    def from_bytes(self, data, numel, *, seed=0, key=0):
        count, dense = _parse_sparse_row(data, numel, "topk")
        if count != self.k_for(numel):
            raise ValueError(f"topk payload has {count} entries, expected {self.k_for(numel)}")
        return dense

    def nominal_bytes(self, numel):
        return 4 + _bits.block_bytes(self.k_for(numel), numel)


@COMPRESSORS.register("threshold")
class Threshold(Compressor):
    """Keep the entries with ``|x| >= tau``, zeros elsewhere (a variable number per row).

    Wire: ``u32 count`` + sparse block (bitmap or int32 indices, the smaller for that count).
    """

    name = "threshold"

    def __init__(self, tau: float) -> None:
        self.tau = as_float("tau", tau)

    def compress(self, x, *, seed=0, keys=None):
        check_batch(x)
        row_keys(x, keys)
        mask = x.abs() >= self.tau
        counts = mask.sum(dim=1).cpu().numpy()
        nbytes = 4 + np.asarray(_bits.block_bytes(counts, x.shape[1]), dtype=np.int64)
        return Encoded({"values": torch.where(mask, x, 0.0), "mask": mask},
                       nbytes.reshape(-1), x.shape[1])

    def decompress(self, enc):
        return enc.parts["values"].clone()

    def to_bytes(self, enc, row):
        indices = torch.nonzero(enc.parts["mask"][row]).reshape(-1).cpu().numpy()
        values = enc.parts["values"][row].cpu().numpy()[indices]
        return _sparse_row_bytes(indices, values, enc.numel)

    def from_bytes(self, data, numel, *, seed=0, key=0):
        return _parse_sparse_row(data, numel, "threshold")[1]


@COMPRESSORS.register("randk")
class RandK(Compressor):
    """Keep ``k = max(1, round(density * P))`` entries chosen uniformly at random per row.

    The indices are the ``k`` smallest of counter-based uniforms keyed by
    ``(seed, key, TAG_RANDK, j)``, so the receiver regenerates them: only the ``k`` float32
    values travel (``4 k`` bytes, in ascending index order). With ``scale`` (default) the
    receiver multiplies by ``P / k``, which makes the result unbiased.
    """

    name = "randk"

    def __init__(self, density: float, scale: bool = True) -> None:
        self.density = as_density("density", density)
        self.scale = as_bool("scale", scale)
        self.unbiased = self.scale

    def indices(self, numel: int, *, seed: int, keys: np.ndarray, device="cpu") -> torch.Tensor:
        """The shared random indices ``[N, k]`` (ascending) of rows keyed ``keys``."""
        u = row_uniform(seed, np.asarray(keys, dtype=np.int64).reshape(-1), TAG_RANDK, numel,
                        device=device)
        k = k_of(self.density, numel)
        return torch.topk(u, k, dim=1, largest=False, sorted=False).indices.sort(dim=1).values

    def _factor(self, numel: int) -> float:
        return numel / k_of(self.density, numel) if self.scale else 1.0

    def compress(self, x, *, seed=0, keys=None):
        check_batch(x)
        keys = row_keys(x, keys)
        n, p = x.shape
        idx = self.indices(p, seed=seed, keys=keys, device=x.device)
        return Encoded({"indices": idx, "values": x.gather(1, idx)},
                       np.full(n, self.nominal_bytes(p), dtype=np.int64), p)

    def decompress(self, enc):
        idx, values = enc.parts["indices"], enc.parts["values"]
        out = torch.zeros(idx.shape[0], enc.numel, dtype=torch.float32, device=values.device)
        return out.scatter_(1, idx, values * self._factor(enc.numel))

    def to_bytes(self, enc, row):
        return enc.parts["values"][row].cpu().numpy().astype("<f4").tobytes()

    def from_bytes(self, data, numel, *, seed=0, key=0):
        _check_len(data, self.nominal_bytes(numel), "randk")
        idx = self.indices(numel, seed=seed, keys=np.array([key]))
        values = torch.from_numpy(np.frombuffer(data, dtype="<f4").astype(np.float32))
        out = torch.zeros(1, numel, dtype=torch.float32)
        return out.scatter_(1, idx, values[None] * self._factor(numel))[0]

    def nominal_bytes(self, numel):
        return 4 * k_of(self.density, numel)
