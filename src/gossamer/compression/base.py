"""The compressor interface: batched, pure, exact about bytes.

A compressor turns a batch of flat float32 vectors ``x`` ``[N, P]`` (one row per sender:
a client's update, a node's gossip message) into an :class:`Encoded` batch, and back. Every
row's wire form is a real byte string (:meth:`Compressor.to_bytes` / :meth:`from_bytes`),
and ``Encoded.nbytes[i]`` is *exactly* ``len(to_bytes(enc, i))``, so the simulator can count
bytes without materializing them and a test checks that it never lies.

Randomness (random-k indices, stochastic rounding, PowerSGD's start) is counter-based:
row ``i`` draws from ``rng`` stream ``STREAM_COMPRESS`` keyed by ``(seed, keys[i], ...)``
(``keys``: e.g. ``sender * 2**32 + round``), so a row's result never depends on which other
rows are in the batch, and a runtime process compressing one row gets the same bytes.

Compressors hold no state. Stateful schemes (error feedback, EF21, DGC's momentum) keep
their memory ``[N, P]`` outside, in the caller, and are pure functions of it
(``compression/feedback.py``, ``compression/dgc.py``).

A receiver that needs the sender's randomness to decode (random-k regenerates its indices
from the shared seed instead of sending them) gets it through ``from_bytes(..., seed=, key=)``:
``key`` is the sender's row key (``keys[i]`` at compression), which the receiver knows from
the message header (sender id and round). Byte layouts are little-endian; see
``docs/compression.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from gossamer import rng
from gossamer.checks import as_int  # noqa: F401  (re-exported for the parts)
from gossamer.registry import Registry


@dataclass(frozen=True)
class Encoded:
    """A batch of compressed rows.

    ``parts``: method-specific tensors with leading dimension N (e.g. top-k's ``indices``
    ``[N, k]`` int64 and ``values`` ``[N, k]`` float32); ``nbytes``: int64 ``[N]``, the exact
    length of each row's wire bytes (payload only: the message header is counted by the
    caller, as for uncompressed models); ``numel``: P.
    """

    parts: dict[str, torch.Tensor]
    nbytes: np.ndarray
    numel: int
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return int(self.nbytes.shape[0])


class Compressor:
    """Base class: subclasses implement :meth:`compress`, :meth:`decompress`,
    :meth:`to_bytes`, :meth:`from_bytes`; ``unbiased`` is True when
    ``E[decompress(compress(x))] = x`` over the compressor's randomness."""

    name = "compressor"
    unbiased = False
    needs_spec = False  # True: the constructor requires ``spec`` (a models.functional.ParamSpec)

    def compress(self, x: torch.Tensor, *, seed: int = 0, keys: np.ndarray | None = None) -> Encoded:
        raise NotImplementedError

    def decompress(self, enc: Encoded) -> torch.Tensor:
        """The dense ``[N, P]`` float32 vectors the receiver reconstructs."""
        raise NotImplementedError

    def to_bytes(self, enc: Encoded, row: int) -> bytes:
        """Row ``row``'s wire payload; ``len(...) == enc.nbytes[row]``."""
        raise NotImplementedError

    def from_bytes(self, data: bytes, numel: int, *, seed: int = 0, key: int = 0) -> torch.Tensor:
        """Parse one payload into its dense ``[P]`` vector, validating sizes first (network
        input): a payload whose length disagrees with its own counts raises ValueError.
        ``seed``/``key``: the sender's seed and row key, for compressors whose receiver
        regenerates shared randomness (random-k); the others ignore them."""
        raise NotImplementedError

    def nominal_bytes(self, numel: int) -> int | None:
        """Payload size of any row when it does not depend on the values (top-k with a fixed
        k, b-bit quantization), else None; lets a driver price uploads before training."""
        return None

    def roundtrip(self, x: torch.Tensor, *, seed: int = 0, keys: np.ndarray | None = None
                  ) -> tuple[torch.Tensor, np.ndarray]:
        """``(decompress(compress(x)), nbytes)``: what the receiver gets and what it cost."""
        enc = self.compress(x, seed=seed, keys=keys)
        return self.decompress(enc), enc.nbytes


COMPRESSORS: Registry[type[Compressor]] = Registry("compressor")


def row_keys(x: torch.Tensor, keys: np.ndarray | None) -> np.ndarray:
    """Per-row randomness keys ``[N]`` (uint64-compatible int64); default 0..N-1."""
    n = x.shape[0]
    if keys is None:
        return np.arange(n, dtype=np.int64)
    keys = np.asarray(keys, dtype=np.int64).reshape(-1)
    if keys.shape[0] != n:
        raise ValueError(f"keys has {keys.shape[0]} entries for {n} rows")
    return keys


def build_compressor(name: str, params: dict[str, Any] | None = None, *, spec: Any = None
                     ) -> Compressor:
    """The compressor registered as ``name`` built from config ``params``; ``spec`` (the model's
    ``ParamSpec``) is passed to the compressors that need the parameter layout."""
    cls = COMPRESSORS.get(name)
    params = dict(params or {})
    if cls.needs_spec:
        if spec is None:
            raise ValueError(f"compressor {name!r} needs the model's parameter layout (spec)")
        params["spec"] = spec
    try:
        return cls(**params)
    except TypeError as exc:
        raise ValueError(f"compressor {name!r}: {exc}") from None


def check_batch(x: torch.Tensor) -> None:
    """Refuse anything but a float32 ``[N, P]`` batch (internal misuse, not network input)."""
    if x.dim() != 2 or x.dtype != torch.float32:
        raise ValueError(f"compressors take a float32 [N, P] batch, got {x.dtype} "
                         f"{tuple(x.shape)}")


# ---------------------------------------------------------------- shared randomness

# Purpose tags: the second key after the row key, so that two compressors (or two uses in
# one compressor) given the same (seed, key) draw independent numbers.
TAG_RANDK = 1
TAG_QSGD = 2
TAG_QUANTIZE = 3
TAG_POWERSGD = 4
TAG_RQM = 5
TAG_COUNTSKETCH = 6


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_M1 = _signed(0xBF58476D1CE4E5B9)
_M2 = _signed(0x94D049BB133111EB)


def _srl(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch has no uint64 arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    """:func:`gossamer.rng._splitmix64` on int64 tensors (two's complement wrap-around)."""
    x = x + _GOLDEN
    x = (x ^ _srl(x, 30)) * _M1
    x = (x ^ _srl(x, 27)) * _M2
    return x ^ _srl(x, 31)


def row_uniform(seed: int, keys: np.ndarray, tag: int, numel: int, *extra: int,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """Uniform [0, 1) float64 ``[N, numel]``: entry ``(i, j)`` is
    ``rng.uniform(seed, STREAM_COMPRESS, keys[i], tag, *extra, j)``, whatever the other rows.

    The per-row prefix is hashed by :mod:`gossamer.rng` (numpy); the last, ``[N, numel]``-sized
    mixing step runs in torch on ``device``, so a GPU batch draws its numbers on the GPU.
    """
    prefix = rng.hash_u64(seed, rng.STREAM_COMPRESS, np.asarray(keys).reshape(-1), tag, *extra)
    h = torch.from_numpy(prefix.view(np.int64).copy()).to(device)[:, None]
    cols = torch.arange(numel, dtype=torch.int64, device=device)[None, :]
    return _srl(_splitmix64(h ^ cols), 11).to(torch.float64) * (1.0 / (1 << 53))


# ---------------------------------------------------------------- parameter checks


def as_density(name: str, value: Any) -> float:
    """``value`` as a float in (0, 1]; one-line ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}") from None
    if not (0.0 < v <= 1.0):
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
    return v


def as_float(name: str, value: Any) -> float:
    """``value`` as a finite float >= 0 (bools refused); one-line ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number >= 0, got {value!r}") from None
    if not (math.isfinite(v) and v >= 0):
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    return v


def as_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


def k_of(density: float, numel: int) -> int:
    """Entries kept at ``density`` out of ``numel``: the nearest integer, at least 1."""
    return min(numel, max(1, math.floor(density * numel + 0.5)))
