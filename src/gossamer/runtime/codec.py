"""Tensors on the wire: a model message is a ``ModelMeta`` frame followed by raw byte chunks.

Everything a node receives is checked before use, in this order: the frame parses as the
schema says; the first frame declares dtype, shape and byte count; the dtype is one we
know (and the one expected, where the receiver expects one); shape, dtype and byte count
agree; the byte count is under the size cap; the shape is exactly the flat ``[numel]`` of
the model spec (a model travels as one flat row, so ``[10, 65]`` for a 650-element model is
refused, not reshaped); the run id matches; then chunks are accumulated without ever
exceeding the declared size, and the total must equal it; last, every value must be finite.
Any failure raises :class:`WireError` with a short reason, which the receiver logs and
answers; it never crashes the node, and nothing is unpickled.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from google.protobuf.message import DecodeError

from gossamer.runtime import schema

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16,
                                  "bfloat16": torch.bfloat16, "float64": torch.float64}
_NAMES = {v: k for k, v in DTYPES.items()} | {torch.uint8: "uint8"}
# bytes (an encoded update, a secure-aggregation message) travel as uint8 and are accepted
# only where a receiver asks for them (``dtype=torch.uint8``), never as a model
_BYTES = {"uint8": torch.uint8}
MAX_DIMS = 8
MAX_ELEMENTS = 1 << 48          # bounds every dimension and product, so no size arithmetic overflows


# ModelMeta.kind of an upload: a model row, an update (DP-FedAvg), encoded bytes (compression),
# an aggregator's partial aggregate (the weighted sum of the models of ``ModelMeta.nodes``),
# a client's evaluation report (personalized FL: ``[hits]`` on its own test rows)
KIND_MODEL, KIND_DELTA, KIND_ENCODED, KIND_PARTIAL, KIND_EVAL = 1, 2, 4, 9, 10


class WireError(ValueError):
    """A message was rejected; ``str()`` is the reason, safe to log and to send back."""


@dataclass(frozen=True)
class Limits:
    """Bounds on what a node accepts and how it sends (bytes)."""

    max_message_bytes: int = 256 << 20
    chunk_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        if self.chunk_bytes < 1 or self.max_message_bytes < 1:
            raise ValueError("runtime limits must be positive")


def parse(message_type: type, data: bytes) -> object:
    """Parse raw bytes as ``message_type``; malformed bytes raise :class:`WireError`."""
    try:
        return message_type.FromString(data)
    except (DecodeError, RuntimeWarning, ValueError) as exc:
        raise WireError(f"malformed {message_type.DESCRIPTOR.name}: {type(exc).__name__}") from None


def model_frames(tensor: torch.Tensor, *, kind: int = 1, sender: int = 0, round: int = 0,
                 meta: int = 0, run_id: str = "", chunk_bytes: int = 1 << 20,
                 nodes: Iterable[int] = ()) -> Iterator[object]:
    """The frames of one model message: metadata first, then chunks of the raw bytes
    (``nodes``: the clients a partial aggregate sums)."""
    flat = tensor.detach().contiguous().cpu()
    if flat.dtype not in _NAMES:
        raise ValueError(f"cannot send dtype {flat.dtype}")
    raw = flat.view(torch.int16) if flat.dtype == torch.bfloat16 else flat
    data = raw.numpy().tobytes()
    spec = schema.TensorSpec(dtype=_NAMES[flat.dtype], shape=list(flat.shape), num_bytes=len(data))
    yield schema.Frame(meta=schema.ModelMeta(kind=kind, sender=sender, round=round, meta=meta,
                                             tensor=spec, run_id=run_id, nodes=list(nodes)))
    view = memoryview(data)
    for start in range(0, len(data), chunk_bytes):
        yield schema.Frame(chunk=bytes(view[start:start + chunk_bytes]))


def check_meta(meta: object, *, expected_numel: int | None, run_id: str | None,
               limits: Limits, dtype: torch.dtype | None = None) -> tuple[torch.dtype, tuple[int, ...], int]:
    """Validate a ModelMeta's declared tensor; returns (dtype, shape, num_bytes).

    ``expected_numel``: the message must be the flat ``[expected_numel]`` row; ``dtype``: the
    one dtype accepted (None: any known dtype)."""
    spec = meta.tensor
    known = DTYPES | _BYTES if dtype == torch.uint8 else DTYPES
    if spec.dtype not in known:
        raise WireError(f"unknown dtype {spec.dtype[:32]!r}")
    if dtype is not None and known[spec.dtype] != dtype:
        raise WireError(f"dtype {spec.dtype} where {_NAMES[dtype]} is expected")
    if (len(spec.shape) > MAX_DIMS or any(d < 0 or d > MAX_ELEMENTS for d in spec.shape)
            or math.prod(max(d, 1) for d in spec.shape) > MAX_ELEMENTS):
        raise WireError("invalid shape")
    dtype = known[spec.dtype]
    numel = math.prod(spec.shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if numel * itemsize != spec.num_bytes:
        raise WireError(f"declared shape {list(spec.shape)} of {spec.dtype} needs "
                        f"{numel * itemsize} bytes, header says {spec.num_bytes}")
    if spec.num_bytes > limits.max_message_bytes:
        raise WireError(f"message of {spec.num_bytes} bytes exceeds the cap of "
                        f"{limits.max_message_bytes}")
    if expected_numel is not None and numel != expected_numel:
        raise WireError(f"model has {numel} elements, expected {expected_numel}")
    if expected_numel is not None and list(spec.shape) != [expected_numel]:
        raise WireError(f"shape {list(spec.shape)} where the flat [{expected_numel}] is expected")
    if run_id is not None and meta.run_id != run_id:
        raise WireError("message belongs to another run")
    return dtype, tuple(spec.shape), spec.num_bytes


def read_model(frames: Iterable[object], *, expected_numel: int | None = None,
               run_id: str | None = None, limits: Limits = Limits(),
               dtype: torch.dtype | None = None) -> tuple[object, torch.Tensor]:
    """Reassemble and validate one model message from frames (parsed ``Frame`` objects)."""
    iterator = iter(frames)
    first = next(iterator, None)
    if first is None or first.WhichOneof("body") != "meta":
        raise WireError("a model message must start with its metadata")
    meta = first.meta
    dtype, shape, size = check_meta(meta, expected_numel=expected_numel, run_id=run_id,
                                    limits=limits, dtype=dtype)
    buffer = bytearray(size)
    filled = 0
    for frame in iterator:
        if frame.WhichOneof("body") != "chunk":
            raise WireError("unexpected frame inside a model message")
        chunk = frame.chunk
        if filled + len(chunk) > size:
            raise WireError(f"payload exceeds its declared {size} bytes")
        buffer[filled:filled + len(chunk)] = chunk
        filled += len(chunk)
    if filled != size:
        raise WireError(f"payload has {filled} bytes, declared {size}")
    storage = torch.int16 if dtype == torch.bfloat16 else dtype
    tensor = torch.frombuffer(buffer, dtype=storage) if size else torch.empty(0, dtype=storage)
    if dtype == torch.bfloat16:
        tensor = tensor.view(torch.bfloat16)
    if dtype.is_floating_point and not bool(torch.isfinite(tensor).all()):
        raise WireError("the tensor holds non-finite values (NaN or infinity)")
    return meta, tensor.reshape(shape)


def read_raw_model(chunks: Iterable[bytes], **kwargs: object) -> tuple[object, torch.Tensor]:
    """:func:`read_model` over raw serialized frames, as a gRPC handler receives them."""
    return read_model((parse(schema.Frame, data) for data in chunks), **kwargs)


class Counted:
    """Raw chunks passed through unchanged while ``size`` sums their bytes (what was really
    received, for honest byte counts)."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self.chunks, self.size = chunks, 0

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.chunks:
            self.size += len(chunk)
            yield chunk


def peek_meta(chunks: Iterable[bytes]) -> tuple[object, Iterator[bytes]]:
    """The metadata of a raw model message (what a receiver decides the expected size by) and
    the whole stream again, its first frame put back; WireError when it does not start with
    metadata."""
    chunks = iter(chunks)
    first = next(chunks, None)
    head = parse(schema.Frame, first) if first is not None else None
    if head is None or head.WhichOneof("body") != "meta":
        raise WireError("a model message must start with its metadata")
    return head.meta, itertools.chain([first], chunks)


def read_counted_model(chunks: Iterable[bytes], **kwargs: object) -> tuple[object, torch.Tensor, int]:
    """:func:`read_raw_model`, also returning the bytes received (for honest byte counts)."""
    counted = Counted(chunks)
    meta, tensor = read_raw_model(iter(counted), **kwargs)
    return meta, tensor, counted.size


def state_hash(tensor: torch.Tensor) -> bytes:
    """SHA-256 of a tensor's float32 values in order: what a worker checks the model (or the
    outer state) it rebuilt from a task against."""
    import hashlib

    return hashlib.sha256(tensor.detach().float().contiguous().numpy().tobytes()).digest()


def frames_size(frames: Iterable[object]) -> int:
    """Bytes these frames occupy serialized: what is really sent (gRPC framing aside)."""
    return sum(frame.ByteSize() for frame in frames)


def bytes_frames(data: bytes, *, kind: int, sender: int = 0, round: int = 0, meta: int = 0,
                 run_id: str = "", chunk_bytes: int = 1 << 20) -> Iterator[object]:
    """The frames of a byte message (an encoded update, a secure-aggregation message)."""
    tensor = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    return model_frames(tensor, kind=kind, sender=sender, round=round, meta=meta, run_id=run_id,
                        chunk_bytes=chunk_bytes)
