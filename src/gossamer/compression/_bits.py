"""Bit streams and sparse blocks shared by the compressors' wire formats (one row at a time).

Bit order everywhere: stream bit ``t`` is bit ``t % 8`` (least significant = 0) of byte
``t // 8``; the last byte is zero-padded. Fixed-width codes are written least significant bit
first, so 8- and 16-bit codes are plain little-endian ``uint8``/``uint16`` arrays. Elias-gamma
codes are written most significant bit first (their leading zeros, then the number).
"""

from __future__ import annotations

import math
import struct

import numpy as np

U32 = struct.Struct("<I")
F32 = struct.Struct("<f")


def fixed_bytes(count: int, width: int) -> int:
    """Bytes of ``count`` codes of ``width`` bits, packed."""
    return (count * width + 7) // 8


def pack_fixed(codes: np.ndarray, width: int) -> bytes:
    """``codes`` (non-negative ints < 2**width) packed at ``width`` bits each."""
    codes = np.asarray(codes).reshape(-1)
    if width == 8:
        return codes.astype(np.uint8).tobytes()
    if width == 16:
        return codes.astype("<u2").tobytes()
    shifts = np.arange(width, dtype=np.uint32)
    bits = ((codes.astype(np.uint32)[:, None] >> shifts) & 1).astype(np.uint8)
    return np.packbits(bits.reshape(-1), bitorder="little").tobytes()


def unpack_fixed(buf: bytes | memoryview, count: int, width: int) -> np.ndarray:
    """Inverse of :func:`pack_fixed` (int64 ``[count]``); padding bits must be zero."""
    raw = np.frombuffer(buf, dtype=np.uint8)
    if raw.size != fixed_bytes(count, width):
        raise ValueError(f"packed codes take {raw.size} bytes, expected "
                         f"{fixed_bytes(count, width)}")
    if width == 8:
        return raw.astype(np.int64)
    if width == 16:
        return raw.view("<u2").astype(np.int64)
    bits = np.unpackbits(raw, bitorder="little")
    if bits[count * width:].any():
        raise ValueError("nonzero padding bits after the packed codes")
    bits = bits[:count * width].reshape(count, width).astype(np.int64)
    return bits @ (np.int64(1) << np.arange(width, dtype=np.int64))


def gamma_lengths(n: np.ndarray) -> np.ndarray:
    """Elias-gamma code lengths ``2 * floor(log2 n) + 1`` of positive ints."""
    _, exp = np.frexp(np.asarray(n, dtype=np.float64))
    return 2 * (exp.astype(np.int64) - 1) + 1


def pack_varlen(values: np.ndarray, lengths: np.ndarray) -> bytes:
    """Codes ``values[i]`` of ``lengths[i]`` bits (<= 63), each written MSB first, in order."""
    values = np.asarray(values, dtype=np.uint64)
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return b""
    starts = np.cumsum(lengths) - lengths
    owner = np.repeat(np.arange(values.size), lengths)
    offset = np.arange(total, dtype=np.int64) - starts[owner]
    shift = (lengths[owner] - 1 - offset).astype(np.uint64)
    bits = ((values[owner] >> shift) & np.uint64(1)).astype(np.uint8)
    return np.packbits(bits, bitorder="little").tobytes()


class GammaReader:
    """Sequential reader of a bit stream holding Elias-gamma codes and single bits.

    Decoding is inherently sequential; the per-code work is O(1) Python on lists prepared
    with numpy (the position of the next 1 bit, and a 64-bit window at every position).
    """

    def __init__(self, buf: bytes | memoryview) -> None:
        bits = np.unpackbits(np.frombuffer(buf, dtype=np.uint8), bitorder="little")
        self.nbits = bits.size
        ones = np.flatnonzero(bits)
        nxt = np.full(self.nbits + 1, self.nbits, dtype=np.int64)
        if ones.size:
            slot = np.searchsorted(ones, np.arange(self.nbits), side="left")
            found = slot < ones.size
            nxt[:-1][found] = ones[slot[found]]
        padded = np.concatenate([bits, np.zeros(64, dtype=np.uint8)]).astype(np.uint64)
        window = np.zeros(self.nbits, dtype=np.uint64)
        for j in range(64):  # window[t] = bits t..t+63, bit t most significant
            window |= padded[j:j + self.nbits] << np.uint64(63 - j)
        self._next = nxt.tolist()
        self._window = window.tolist()
        self._bits = bits.tolist()
        self.pos = 0

    def bit(self) -> int:
        if self.pos >= self.nbits:
            raise ValueError("bit stream ends inside a code")
        b = self._bits[self.pos]
        self.pos += 1
        return b

    def gamma(self) -> int:
        """The next Elias-gamma coded positive int."""
        one = self._next[self.pos]
        zeros = one - self.pos
        if one >= self.nbits or zeros > 62 or one + zeros >= self.nbits:
            raise ValueError("bit stream ends inside an Elias-gamma code")
        value = self._window[one] >> (63 - zeros)
        self.pos = one + zeros + 1
        return value

    def check_end(self) -> None:
        """Only zero padding (< 8 bits) may follow the last code."""
        rest = self.nbits - self.pos
        if rest >= 8 or any(self._bits[self.pos:]):
            raise ValueError(f"{rest} unexpected bits after the last code")


# ---------------------------------------------------------------- sparse blocks


def index_width(numel: int) -> int:
    """Bytes per explicit index: int32 while every index fits, else int64."""
    return 4 if numel < 2**31 else 8


def uses_bitmap(count: int, numel: int) -> bool:
    """The index encoding rule: a ``numel``-bit bitmap when strictly smaller than ``count``
    explicit indices (i.e. density above 1/32 with int32 indices), else the index list."""
    return math.ceil(numel / 8) < index_width(numel) * count


def block_bytes(count: np.ndarray | int, numel: int) -> np.ndarray | int:
    """Bytes of a sparse block of ``count`` entries out of ``numel`` (indices + values)."""
    idx = np.minimum(np.asarray(count, dtype=np.int64) * index_width(numel), math.ceil(numel / 8))
    out = idx + 4 * np.asarray(count, dtype=np.int64)
    return int(out) if np.ndim(out) == 0 else out


def pack_block(indices: np.ndarray, values: np.ndarray, numel: int) -> bytes:
    """A sparse block: ascending ``indices`` as a bitmap or int32/int64 list (the smaller, by
    :func:`uses_bitmap`), then their float32 ``values`` in index order."""
    count = indices.size
    if uses_bitmap(count, numel):
        mask = np.zeros(numel, dtype=np.uint8)
        mask[indices] = 1
        head = np.packbits(mask, bitorder="little").tobytes()
    else:
        head = indices.astype("<i4" if index_width(numel) == 4 else "<i8").tobytes()
    return head + values.astype("<f4").tobytes()


def unpack_block(buf: memoryview, count: int, numel: int) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`pack_block` for a known ``count``; validates length, the bitmap's
    population count and that explicit indices are strictly increasing and < ``numel``."""
    if len(buf) != block_bytes(count, numel):
        raise ValueError(f"sparse block of {count} entries out of {numel} takes "
                         f"{block_bytes(count, numel)} bytes, got {len(buf)}")
    head = len(buf) - 4 * count
    if uses_bitmap(count, numel):
        bits = np.unpackbits(np.frombuffer(buf[:head], dtype=np.uint8), bitorder="little")
        if bits[numel:].any():
            raise ValueError("nonzero padding bits after the index bitmap")
        indices = np.flatnonzero(bits[:numel])
        if indices.size != count:
            raise ValueError(f"index bitmap has {indices.size} entries, header says {count}")
    else:
        dtype = "<i4" if index_width(numel) == 4 else "<i8"
        indices = np.frombuffer(buf[:head], dtype=dtype).astype(np.int64)
        if count and (indices[0] < 0 or indices[-1] >= numel or np.any(np.diff(indices) <= 0)):
            raise ValueError(f"sparse indices must be strictly increasing in [0, {numel})")
    values = np.frombuffer(buf[head:], dtype="<f4").astype(np.float32)
    return indices, values
