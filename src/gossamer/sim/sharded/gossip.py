"""Asynchronous gossip learning sharded over the ranks of one machine (docs/scale.md).

The gossip simulator (:mod:`gossamer.sim.drivers.gossip`) handles each window in two phases:
the schedule (clock ticks, peers, arrivals, bytes), which never depends on model values, then
the model operations in waves where each node appears once. Every rank runs the whole
schedule, so every rank holds the same operations; a rank then executes, wave by wave, the
operations of the nodes it owns: it merges the messages they receive and trains them.

Every node's model and age live in shared memory (each rank writes only its own rows). A
message whose sender and receiver have one owner stays a copy-on-write reference to the
sender's row, as in one process; one that crosses ranks is copied by the receiver's owner
when it is sent (its bits are the sender's row at that moment either way). Copying another
rank's row needs that rank to have finished writing it, and that rank must not write it again
before the copy is taken; both are decided from the operations every rank holds, so the ranks
meet at a barrier exactly before the waves that need one (a cross-rank read of a row written
since the last barrier, or a write of a row read across ranks since then), and nowhere else.

Metrics are fixed by node id (:mod:`.rows`); the period's training loss is the mean over its
local updates in (node, update) order whichever rank trained them. A checkpoint holds every
node's row and age and every message in flight, as one process writes them, so a run resumes
with any number of ranks. Ranks on several machines would need messages sent between them:
refused in one line (the synchronous patterns run there).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from gossamer.config import ConfigError
from gossamer.sim.drivers.gossip import GossipDriver
from gossamer.sim.experiment import Experiment
from gossamer.sim.gossip_waves import MERGE, READ, RESET, TRAIN, WRITE
from gossamer.sim.messages import MessageStore
from gossamer.sim.sharded.base import (
    TRANSPORT_ENV,
    Shard,
    barrier,
    gather,
    gather_rows,
    shared_if_possible,
)
from gossamer.sim.sharded.rows import ShardedRows


class OwnMessages(MessageStore):
    """The messages in flight to one rank's nodes (the others' are held by their owners)."""

    def discard(self, msg: int) -> None:
        if msg in self.age:              # a message to another rank's node: not held here
            super().discard(msg)


class ShardedGossipDriver(ShardedRows, GossipDriver):
    """:class:`GossipDriver` whose rank merges and trains only its own nodes (see the module)."""

    def __init__(self, exp: Experiment, shard: Shard) -> None:
        self.shard = shard
        # a node's batches never depend on the other nodes of its call (or rank)
        exp.trainer.batch_width = "population"
        super().__init__(exp)
        self.messages = OwnMessages(exp.spec.numel, device=self.device)
        self.dirty: set[int] = set()     # rows written since the last barrier
        self.lent: set[int] = set()      # rows other ranks copied since the last barrier
        self.barriers = 0
        n = exp.num_nodes
        self._models = shared_if_possible(shard, (n, self.params.shape[1]), self.params.dtype)
        self._ages = shared_if_possible(shard, (n,), self.age.dtype)
        if shard.world > 1 and (self._models is None or self._ages is None):
            raise ConfigError(TRANSPORT_ENV, "gossip on ranks keeps every model in shared memory: "
                              "run its ranks on one machine, with room in /dev/shm (not p2p)")
        self._share()

    def _share(self) -> None:
        """Put this rank's rows and ages into shared memory and use it (one rank: nothing)."""
        if self._models is None:
            return
        lo, hi = self.shard.lo, self.shard.hi
        self._models[lo:hi] = self.params[lo:hi]
        self._ages[lo:hi] = self.age[lo:hi]
        self.params, self.age = self._models, self._ages
        self._fence(f"round {self.round}'s start")

    def _fence(self, during: str) -> None:
        barrier(self.shard, during)
        self.barriers += 1
        self.dirty.clear()
        self.lent.clear()

    def _own_rows(self) -> torch.Tensor:
        return self.params[self.shard.lo:self.shard.hi]

    def evaluate(self) -> dict[str, Any]:
        row = ShardedRows.evaluate(self)
        row.update(events=self.events, messages_dropped=self.dropped)
        return row

    # --- phase 2: this rank's part of each wave -----------------------------------------------------
    def _run_ops(self, ops: list[tuple]) -> None:
        if not ops:
            return
        lo, hi = self.shard.lo, self.shard.hi
        timed = np.array(ops, dtype=np.float64)
        order = np.lexsort((np.arange(len(ops)), timed[:, 0], timed[:, 2]))   # by node, then time
        table = timed[order, 1:].astype(np.int64)
        nodes = table[:, 1]
        first = np.r_[0, np.flatnonzero(nodes[1:] != nodes[:-1]) + 1]
        wave = np.arange(len(nodes)) - np.repeat(first, np.diff(np.r_[first, len(nodes)]))
        receivers = np.array([self.receiver.get(int(m), -1) if k == READ else -1
                              for k, m in zip(table[:, 0].tolist(), table[:, 2].tolist(), strict=True)],
                             dtype=np.int64)
        for w in range(int(wave.max()) + 1):
            at = wave == w
            part, to = table[at], receivers[at]
            kind, node = part[:, 0], part[:, 1]
            self._fence_if_needed(kind, node, to, w)
            mine = (node >= lo) & (node < hi)
            written = kind != READ
            self.messages.detach(node[written & mine].tolist(), self.params)   # own rows about to change
            self.dirty.update(node[written].tolist())
            reads = kind == READ
            self._read_own(node[reads], part[reads, 2], to[reads])
            for op in (MERGE, WRITE):                # every rank forgets who merged what
                for m in part[kind == op, 2].tolist():
                    self.receiver.pop(m, None)
            theirs = (kind == TRAIN) | (kind == WRITE)
            self.updates[node[theirs & ~mine]] += 1  # their owners train them (update keys)
            if mine.any():
                self._wave(part[mine])

    def _fence_if_needed(self, kind: np.ndarray, node: np.ndarray, to: np.ndarray, w: int) -> None:
        """Meet the other ranks before this wave if it copies a row written since the last
        meeting (its writer may not be done) or writes a row copied since then (its readers may
        not be done). Every rank holds the same operations, so all decide alike."""
        if self.shard.world == 1:
            return
        edges = np.asarray(self.shard.edges)
        reads = kind == READ
        crossing = reads & (np.searchsorted(edges, node, side="right")
                            != np.searchsorted(edges, to, side="right"))
        copied = node[crossing].tolist()
        written = node[~reads].tolist()
        if any(n in self.dirty for n in copied) or any(n in self.lent for n in written):
            self._fence(f"round {self.round + 1}'s gossip (wave {w + 1})")
        self.lent.update(copied)

    def _read_own(self, senders: np.ndarray, msgs: np.ndarray, to: np.ndarray) -> None:
        """Messages to this rank's nodes: a reference to a sender's row on this rank, a copy of
        one on another rank (taken now: its owner may change it later)."""
        lo, hi = self.shard.lo, self.shard.hi
        here = (to >= lo) & (to < hi)
        same = here & (senders >= lo) & (senders < hi)
        if same.any():
            idx = self._index(senders[same])
            self.messages.put(msgs[same].tolist(), senders[same].tolist(), self.age[idx].tolist())
        far = here & ~same
        if far.any():
            idx = self._index(senders[far])
            self.messages.put_rows(msgs[far].tolist(), self.params.index_select(0, idx),
                                   self.age[idx].tolist())

    def _wave(self, part: np.ndarray) -> None:
        """This rank's merges and updates of one wave (its reads are taken already)."""
        kind = part[:, 0]
        resets = part[kind == RESET, 1]
        if len(resets):
            self._restart(resets)
            self.age[self._index(resets)] = 0.0
        for op, train in ((WRITE, True), (MERGE, False)):
            merges = part[kind == op]
            if len(merges):
                self._merge(merges[:, 1], merges[:, 2], train)
        trains = part[kind == TRAIN, 1]
        if len(trains):
            idx = self._index(trains)
            rows = self.params.index_select(0, idx)
            trained = self._local_update(rows, trains)
            self.params.index_copy_(0, idx, rows)
            self.age[idx] += trained.to(self.age.dtype)

    # --- the period's training record, from every rank ---------------------------------------------
    def _period_records(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, torch.Tensor]:
        nodes, keys, steps, losses = super()._period_records()
        shard = self.shard
        if shard.world == 1:
            return nodes, keys, steps, losses
        during = f"round {self.round + 1}'s training record"
        mine = torch.stack([torch.from_numpy(nodes).double(), torch.from_numpy(keys).double(),
                            torch.from_numpy(steps).double(), losses.double()], dim=1)
        counts = [int(c) for c in gather(shard, torch.tensor([len(nodes)]), during)]
        every = gather_rows(shard, mine, counts, during).numpy()
        return (every[:, 0].astype(np.int64), every[:, 1].astype(np.int64), every[:, 2].astype(np.int64),
                torch.from_numpy(every[:, 3]))

    # --- checkpoints: every node's row and every message, on rank 0 ---------------------------------
    def state_dict(self) -> dict[str, Any]:
        shard = self.shard
        during = f"round {self.round}'s checkpoint"
        self._fence(during)                           # every rank done writing
        state = super().state_dict()                 # this rank's messages
        if shard.world > 1:
            ids, rows, ages = state["msg_ids"], state["msg_rows"], state["msg_ages"]
            counts = [int(c) for c in gather(shard, torch.tensor([len(ids)]), during)]
            rows = gather_rows(shard, rows, counts, during)
            meta = gather_rows(shard, torch.stack([ids.double(), ages.double()], dim=1), counts, during)
            order = torch.argsort(meta[:, 0])
            ids = meta[order, 0].long()
            state.update(msg_ids=ids, msg_rows=rows[order], msg_ages=meta[order, 1].to(state["msg_ages"].dtype),
                         msg_receivers=torch.tensor([self.receiver.get(i, -1) for i in ids.tolist()],
                                                    dtype=torch.int64))
            if shard.primary:
                state["params"] = self.params.clone()
            self._fence(during)                       # rank 0's copies taken before anyone writes
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        lo, hi = self.shard.lo, self.shard.hi
        ids, receivers = state["msg_ids"], state.get("msg_receivers")
        if receivers is not None and self.shard.world > 1:       # this rank's receivers' messages
            keep = torch.from_numpy((receivers.numpy() >= lo) & (receivers.numpy() < hi))
            state = {**state, "msg_ids": ids[keep], "msg_rows": state["msg_rows"][keep],
                     "msg_ages": state["msg_ages"][keep], "msg_receivers": receivers[keep]}
        super().load_state_dict(state)
        if receivers is not None:                    # every rank knows every message's receiver
            self.receiver = dict(zip(ids.tolist(), receivers.tolist(), strict=True))
        self._share()
