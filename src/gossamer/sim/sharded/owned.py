"""Batched training calls whose entries train on the ranks that own their nodes (docs/scale.md).

The asynchronous FL, MoDeST and random-walk executors run their whole protocol on every rank
and split only the training of a call (a batch of tasks, a round's trainers, the tokens'
visits) by node owner; every rank then needs every entry's trained row, samples, steps and
loss, in the call's order. On one machine the entries go through shared memory: each rank
writes its entries' rows and numbers into one of two buffers, used in turn, and one barrier
later every rank reads the whole call (a rank consumes a call's rows before its next call,
and a buffer is written again only after every rank has passed the next call's barrier, so
no rank writes rows another may still be reading). Elsewhere, one ``all_gather``. Each row
carries its numbers in float64 (where float32 losses and counts are exact), their bits viewed
as extra columns of the rows' dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from gossamer.sim.sharded.barrier import barrier
from gossamer.sim.sharded.base import (
    Shard,
    gather_rows,
    pack_numbers,
    shared_if_possible,
    unpack_numbers,
)

Trained = tuple[torch.Tensor, np.ndarray, np.ndarray, torch.Tensor]    # rows, samples, steps, losses


class OwnedTraining:
    """The training calls of one run, split by node owner (see the module)."""

    def __init__(self, shard: Shard, numel: int, dtype: torch.dtype, views: bool = False) -> None:
        self.shard, self.numel, self.dtype = shard, numel, dtype
        # hand back views of the call's buffer instead of a copy (the caller uses the rows
        # before its next call and keeps none of them)
        self.views = views
        self.width = numel + 3 * 8 // dtype.itemsize
        self.buffers: list[torch.Tensor] | None = None
        self.capacity = self.calls = 0
        self.gathered = False             # no shared memory here: all_gather

    def __call__(self, nodes: np.ndarray, train: Callable[[np.ndarray], tuple[torch.Tensor, Any]],
                 during: str) -> Trained:
        """``train(positions)`` trains the entries of the call at ``positions`` (those whose
        node in ``nodes`` this rank owns) and returns their rows ``[m, numel]`` and the
        trainer's result; returns every entry's rows ``[len(nodes), numel]``, samples, steps and
        losses. The rows stay valid until this rank's next call (with ``views``, strided views of
        the call's buffer)."""
        shard = self.shard
        if shard.world == 1:
            rows, result = train(np.arange(len(nodes)))
            return (rows, np.asarray(result.samples, dtype=np.float64), np.asarray(result.steps, dtype=np.int64),
                    result.loss.float().cpu())
        owner = shard.owner(np.asarray(nodes, dtype=np.int64))
        mine = np.flatnonzero(owner == shard.rank)
        buffer = self._buffer(len(nodes))
        if buffer is None:
            send = torch.empty(len(mine), self.width, dtype=self.dtype, device=shard.device)
            self._write(send, mine, train)
            got = gather_rows(shard, send, np.bincount(owner, minlength=shard.world).tolist(), during)
            every = torch.empty_like(got)
            every[torch.from_numpy(np.argsort(owner, kind="stable"))] = got     # gathered rank by rank
        else:
            every = buffer[:len(nodes)]
            self._write(every, mine, train, at=mine)      # straight into the shared buffer
            barrier(shard, during)
        numbers = unpack_numbers(every[:, self.numel:]).cpu().numpy()
        rows = every[:, :self.numel] if self.views else every[:, :self.numel].contiguous()
        return (rows, numbers[:, 0].copy(), numbers[:, 1].astype(np.int64),
                torch.from_numpy(numbers[:, 2].copy()).float())

    def _write(self, out: torch.Tensor, mine: np.ndarray, train: Callable, at: np.ndarray | None = None) -> None:
        """Train the entries ``mine`` and write their rows and numbers into ``out``: its first
        rows, or its rows ``at``."""
        if not len(mine):
            return
        rows, result = train(mine)
        stats = torch.stack([torch.from_numpy(np.asarray(result.samples, dtype=np.float64)),
                             torch.from_numpy(np.asarray(result.steps, dtype=np.float64)),
                             result.loss.double().cpu()], dim=1)          # samples, steps, loss
        where = slice(0, len(mine)) if at is None else torch.from_numpy(at)
        out[where, :self.numel] = rows
        out[where, self.numel:] = pack_numbers(stats, self.dtype)

    def _buffer(self, entries: int) -> torch.Tensor | None:
        """This call's shared buffer (None: gather instead). Every rank makes the same calls, so
        all allocate together (a collective) when a call outgrows the buffers."""
        if self.gathered:
            return None
        if entries > self.capacity:
            self.capacity = max(entries, 2 * self.capacity, 8)
            pair = [shared_if_possible(self.shard, (self.capacity, self.width), self.dtype) for _ in range(2)]
            if any(b is None for b in pair):
                self.gathered, self.buffers = True, None
                return None
            self.buffers = pair
        self.calls += 1
        return self.buffers[self.calls % 2]
