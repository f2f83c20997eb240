"""The wire format of model messages, shared by the simulator's byte counts and the runtime.

A message is a fixed 28-byte little-endian header followed by the raw tensor bytes:
magic ``GSMR``, version, kind, dtype code, reserved, sender id (u32), round (u32),
meta (u32, e.g. a gossip model's age), element count (u64). Nothing is pickled.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import torch

MAGIC = b"GSMR"
VERSION = 1
_HEADER = struct.Struct("<4sBBBBIIIQ")
HEADER_BYTES = _HEADER.size

KIND_MODEL = 1
KIND_DELTA = 2

_DTYPES = {1: torch.float32, 2: torch.float16, 3: torch.bfloat16, 4: torch.float64}
_CODES = {v: k for k, v in _DTYPES.items()}


@dataclass(frozen=True)
class Header:
    kind: int
    dtype: torch.dtype
    sender: int
    round: int
    meta: int
    numel: int


def encoded_size(numel: int, dtype: torch.dtype = torch.float32) -> int:
    """Exact number of bytes :func:`encode` produces for a tensor of ``numel`` elements."""
    return HEADER_BYTES + numel * torch.empty((), dtype=dtype).element_size()


def encode(tensor: torch.Tensor, *, kind: int = KIND_MODEL, sender: int = 0, round: int = 0,
           meta: int = 0) -> bytes:
    """Serialize a flat tensor with its header; raw bytes, no pickling."""
    flat = tensor.detach().reshape(-1).contiguous().cpu()
    header = _HEADER.pack(MAGIC, VERSION, kind, _CODES[flat.dtype], 0, sender, round, meta,
                          flat.numel())
    if flat.dtype == torch.bfloat16:
        payload = flat.view(torch.int16).numpy().tobytes()
    else:
        payload = flat.numpy().tobytes()
    return header + payload


def decode(data: bytes, *, expected_numel: int | None = None) -> tuple[Header, torch.Tensor]:
    """Parse a message, checking magic, version, dtype and size before touching the payload."""
    if len(data) < HEADER_BYTES:
        raise ValueError(f"message too short: {len(data)} bytes < header {HEADER_BYTES}")
    magic, version, kind, code, _, sender, rnd, meta, numel = _HEADER.unpack_from(data)
    if magic != MAGIC or version != VERSION:
        raise ValueError("message has a bad magic number or version")
    if code not in _DTYPES:
        raise ValueError(f"message has an unknown dtype code {code}")
    dtype = _DTYPES[code]
    if expected_numel is not None and numel != expected_numel:
        raise ValueError(f"message carries {numel} elements, expected {expected_numel}")
    if len(data) != encoded_size(numel, dtype):
        raise ValueError(f"message length {len(data)} does not match its header")
    buf = np.frombuffer(data, dtype=np.uint8, offset=HEADER_BYTES).copy()
    if dtype == torch.bfloat16:
        tensor = torch.from_numpy(buf.view(np.int16)).view(torch.bfloat16)
    else:
        tensor = torch.from_numpy(buf).view(dtype)
    return Header(kind, dtype, sender, rnd, meta, numel), tensor
