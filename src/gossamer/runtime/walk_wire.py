"""The random-walk peers' messages, all sent with the ``Peer.Push`` RPC as ``Frame`` streams.

- A **token**: a ``ModelMeta`` frame (kind 1, ``round`` = hops done, ``meta`` = token id)
  and the model's raw chunks; for the self-repellent walk followed by a second tensor, the
  token's visit counts (kind 4, ``N`` float32 values, exact below 2^24 visits per node).
- A **done notice** (kind 3, as MoDeST's; ``meta`` = token id): that token made its last hop.
- An **abort notice** (kind 5, ``meta`` = the peer that failed): the run cannot finish.

Notices carry an empty float32 tensor. Everything received is validated with the codec's
checks before use (run id, sender is a neighbour, token id and hop in range, sizes; visit
counts must be non-negative integers summing to the hops).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gossamer.runtime import schema
from gossamer.runtime.codec import (
    Counted,
    Limits,
    WireError,
    check_meta,
    model_frames,
    parse,
    read_model,
)

KIND_MODEL, KIND_DONE, KIND_VISITS, KIND_ABORT = 1, 3, 4, 5


@dataclass
class Token:
    id: int
    hops: int                  # hops done: trained and moved this many times
    params: torch.Tensor       # [1, P]
    visits: np.ndarray         # [N] int64, every visit counted once (SRRW's history)


@dataclass(frozen=True)
class Expect:
    """What a peer accepts: its neighbours, the run's tokens, hops, sizes and run id."""

    neighbors: frozenset[int]
    tokens: int
    rounds: int
    numel: int
    num_nodes: int
    with_visits: bool
    run_id: str
    limits: Limits


def token_frames(token: Token, *, sender: int, with_visits: bool, run_id: str,
                 chunk_bytes: int) -> list[bytes]:
    """A token's serialized frames (what goes on the wire, so ``sum(map(len, ...))`` is its size)."""
    kw = {"sender": sender, "round": token.hops, "meta": token.id, "run_id": run_id,
          "chunk_bytes": chunk_bytes}
    frames = list(model_frames(token.params[0], kind=KIND_MODEL, **kw))
    if with_visits:
        frames += model_frames(torch.from_numpy(token.visits).float(), kind=KIND_VISITS, **kw)
    return [f.SerializeToString() for f in frames]


def notice_frame(kind: int, value: int, *, sender: int, rounds: int, run_id: str) -> bytes:
    return schema.Frame(meta=schema.ModelMeta(
        kind=kind, sender=sender, round=rounds, meta=value, run_id=run_id,
        tensor=schema.TensorSpec(dtype="float32", shape=[0], num_bytes=0))).SerializeToString()


class _Messages:
    """A frame stream split into messages: each a metadata frame and the chunks after it."""

    def __init__(self, frames: Iterable[Any]) -> None:
        self.frames, self.head = iter(frames), None

    def next(self) -> Iterator[Any] | None:
        first = self.head if self.head is not None else next(self.frames, None)
        self.head = None
        if first is None:
            return None

        def body() -> Iterator[Any]:
            yield first
            for frame in self.frames:
                if frame.WhichOneof("body") == "meta":
                    self.head = frame
                    return
                yield frame
        return body()


def read_message(chunks: Iterable[bytes], expect: Expect) -> tuple[Any, Token | None, int]:
    """Validate a pushed token or notice: ``(meta, token or None, bytes received)``."""
    counted = Counted(chunks)
    stream = _Messages(parse(schema.Frame, c) for c in counted)
    first = stream.next()
    head = next(first, None) if first is not None else None
    if head is None or head.WhichOneof("body") != "meta":
        raise WireError("a message must start with its metadata")
    meta, kind, value, hops = head.meta, head.meta.kind, int(head.meta.meta), int(head.meta.round)
    if int(meta.sender) not in expect.neighbors:
        raise WireError(f"{int(meta.sender)} is not a neighbour")
    if kind in (KIND_DONE, KIND_ABORT):
        check_meta(meta, expected_numel=0, run_id=expect.run_id, limits=expect.limits)
        if next(first, None) is not None or stream.next() is not None:
            raise WireError("a notice carries no payload")
        if value >= (expect.num_nodes if kind == KIND_ABORT else expect.tokens):
            raise WireError(f"notice about an unknown {'peer' if kind == KIND_ABORT else 'token'}")
        return meta, None, counted.size
    if kind != KIND_MODEL or value >= expect.tokens or not 1 <= hops <= expect.rounds:
        raise WireError(f"no token {value} at hop {hops} (kind {kind}) in this run")
    _, params = read_model(_chain(head, first), expected_numel=expect.numel,
                           run_id=expect.run_id, limits=expect.limits)
    visits = np.zeros(expect.num_nodes, dtype=np.int64)
    extra = stream.next()
    if expect.with_visits:
        if extra is None:
            raise WireError("an SRRW token must carry its visit counts")
        vmeta, counts = read_model(extra, expected_numel=expect.num_nodes, run_id=expect.run_id,
                                   limits=expect.limits)
        counts = counts.double().numpy()
        if (vmeta.kind != KIND_VISITS or not np.all(np.isfinite(counts)) or np.any(counts < 0)
                or np.any(counts != np.round(counts)) or counts.sum() != hops):
            raise WireError("visit counts must be non-negative integers summing to the hops")
        visits = counts.astype(np.int64)
        extra = stream.next()
    if extra is not None:
        raise WireError("unexpected extra message")
    return meta, Token(value, hops, params.float().clone().reshape(1, -1), visits), counted.size


def _chain(head: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield head
    yield from rest
