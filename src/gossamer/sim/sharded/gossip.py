"""Asynchronous gossip learning sharded over ranks (docs/scale.md).

The gossip simulator (:mod:`gossamer.sim.drivers.gossip`) handles each window in two phases:
the schedule (clock ticks, peers, arrivals, bytes), which never depends on model values, then
the model operations in waves where each node appears once. Every rank runs the whole
schedule, so every rank holds the same operations; a rank then executes, wave by wave, the
operations of the nodes it owns: it merges the messages they receive and trains them.

A message whose sender and receiver have one owner stays a copy-on-write reference to the
sender's row, as in one process. One that crosses ranks is copied when it is sent (its bits
are the sender's row at that moment either way):

- on one machine every node's model and age live in shared memory (each rank writes only its
  own rows) and the receiver's owner copies the row. That needs the sender's owner to have
  finished writing it, and not to write it again before the copy is taken; both are decided
  from the operations every rank holds, so the ranks meet at a barrier exactly before the
  waves that need one (a cross-rank read of a row written since the last barrier, or a write
  of a row read across ranks since then), and nowhere else;
- across machines (``GOSSAMER_SHARDED_TRANSPORT=p2p``) a rank holds only its own rows, and in
  every wave that sends messages across ranks the senders' owners send those rows (with their
  ages) to the receivers' owners in one ``all_to_all``, whose counts every rank knows.

Metrics are fixed by node id (:mod:`.rows`); the period's training loss is the mean over its
local updates in (node, update) order whichever rank trained them. A checkpoint holds every
node's row and age and every message in flight, as one process writes them, so a run resumes
with any number of ranks and either transport.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from gossamer.sim.drivers.gossip import GossipDriver
from gossamer.sim.experiment import Experiment
from gossamer.sim.gossip_waves import MERGE, READ, TRAIN, WRITE
from gossamer.sim.messages import MessageStore
from gossamer.sim.sharded.barrier import barrier
from gossamer.sim.sharded.base import (
    Shard,
    exchange,
    gather_uneven,
    pack_numbers,
    shared_if_possible,
    unpack_numbers,
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
        self.dirty: set[int] = set()     # rows written since the last barrier (shared memory)
        self.lent: set[int] = set()      # rows other ranks copied since the last barrier
        n = exp.num_nodes
        self._models = shared_if_possible(shard, (n, self.params.shape[1]), self.params.dtype)
        self._ages = shared_if_possible(shard, (n,), self.age.dtype) if self._models is not None else None
        self.p2p = shard.world > 1 and self._ages is None        # each rank holds its own rows only
        self._share()

    def _share(self) -> None:
        """Hold the models where this transport keeps them: this rank's rows in shared memory
        (then every rank's view of it), or only this rank's rows (point to point)."""
        lo, hi = self.shard.lo, self.shard.hi
        if self.p2p:
            self.params, self.age = self.params[lo:hi].clone(), self.age[lo:hi].clone()
            self.row_base = lo
            return
        if self._models is None:                  # one rank: its rows are every row
            return
        self._models[lo:hi] = self.params[lo:hi]
        self._ages[lo:hi] = self.age[lo:hi]
        self.params, self.age = self._models, self._ages
        self._fence(f"round {self.round}'s start")

    def _fence(self, during: str) -> None:
        barrier(self.shard, during)
        self.dirty.clear()
        self.lent.clear()

    def _own_rows(self) -> torch.Tensor:
        return self.params if self.p2p else self.params[self.shard.lo:self.shard.hi]

    def evaluate(self) -> dict[str, Any]:
        row = ShardedRows.evaluate(self)
        row.update(events=self.events, messages_dropped=self.dropped)
        return row

    # --- phase 2: this rank's part of each wave -----------------------------------------------------
    def _run_ops(self, ops: list[tuple]) -> None:
        if not ops:
            return
        lo, hi, base = self.shard.lo, self.shard.hi, self.row_base
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
            reads = kind == READ
            crossing = reads & (self.shard.owner(node) != self.shard.owner(np.maximum(to, 0)))
            if self.shard.world > 1 and not self.p2p:
                self._fence_if_needed(node, reads, crossing, w)
            mine = (node >= lo) & (node < hi)
            written = ~reads
            self.messages.detach((node[written & mine] - base).tolist(), self.params)   # own rows to change
            self._read_own(node[reads & ~crossing], part[reads & ~crossing, 2], to[reads & ~crossing])
            if crossing.any():
                self._read_across(node[crossing], part[crossing, 2], to[crossing], w)
            for op in (MERGE, WRITE):                # every rank forgets who merged what
                for m in part[kind == op, 2].tolist():
                    self.receiver.pop(m, None)
            theirs = (kind == TRAIN) | (kind == WRITE)
            self.updates[node[theirs & ~mine]] += 1  # their owners train them (update keys)
            if mine.any():
                self._apply(part[mine])

    def _fence_if_needed(self, node: np.ndarray, reads: np.ndarray, crossing: np.ndarray, w: int) -> None:
        """Shared memory: meet the other ranks before this wave if it copies a row written since
        the last meeting (its writer may not be done) or writes a row copied since then (its
        readers may not be done). Every rank holds the same operations, so all decide alike."""
        copied = node[crossing].tolist()
        if any(n in self.dirty for n in copied) or any(n in self.lent for n in node[~reads].tolist()):
            self._fence(f"round {self.round + 1}'s gossip (wave {w + 1})")
        self.lent.update(copied)
        self.dirty.update(node[~reads].tolist())

    def _read_own(self, senders: np.ndarray, msgs: np.ndarray, to: np.ndarray) -> None:
        """Messages between two nodes of this rank: references to the senders' rows (a
        Byzantine sender's: the crafted row)."""
        lo, hi = self.shard.lo, self.shard.hi
        here = (to >= lo) & (to < hi)
        byz = self._byzantine(senders)
        honest, crafted = here & ~byz, here & byz
        if honest.any():
            rows = senders[honest] - self.row_base
            self.messages.put(msgs[honest].tolist(), rows.tolist(), self.age[self._index(rows)].tolist())
        if crafted.any():
            idx = self._index(senders[crafted] - self.row_base)
            self._put_crafted(msgs[crafted], self.params.index_select(0, idx), to[crafted],
                              self.age[idx].tolist())

    def _byzantine(self, senders: np.ndarray) -> np.ndarray:
        """Which of ``senders`` craft what they send (a model attack)."""
        adv = self.exp.adversary
        if adv is None or not adv.model_attack:
            return np.zeros(len(senders), dtype=bool)
        return adv.byzantine[senders]

    def _put_crafted(self, msgs: np.ndarray, sent: torch.Tensor, to: np.ndarray, ages: list[float]) -> None:
        """Byzantine messages to this rank's nodes, crafted here against the receivers' models
        as they are when the messages are sent (this wave's writes come after its reads)."""
        own = self.params.index_select(0, self._index(to - self.row_base))
        self.messages.put_rows(msgs.tolist(), self._craft(sent, own, msgs), ages)

    def _put_sent(self, msgs: np.ndarray, rows: torch.Tensor, to: np.ndarray, ages: list[float],
                  byz: np.ndarray) -> None:
        """Messages to this rank's nodes from the rows their senders sent: copies of the rows,
        a Byzantine sender's crafted here (:meth:`_put_crafted`)."""
        if not byz.any():
            self.messages.put_rows(msgs.tolist(), rows, ages)
            return
        for crafted in (False, True):
            at = np.flatnonzero(byz == crafted)
            if len(at):
                picked, got = rows[torch.from_numpy(at)], [ages[j] for j in at.tolist()]
                if crafted:
                    self._put_crafted(msgs[at], picked, to[at], got)
                else:
                    self.messages.put_rows(msgs[at].tolist(), picked, got)

    def _read_across(self, senders: np.ndarray, msgs: np.ndarray, to: np.ndarray, w: int) -> None:
        """Messages to another rank's nodes: the receiver's owner copies the senders' rows now
        (their owners may change them later), from shared memory or sent to it."""
        shard = self.shard
        lo, hi = shard.lo, shard.hi
        byz = self._byzantine(senders)
        if not self.p2p:
            here = np.flatnonzero((to >= lo) & (to < hi))
            if len(here):
                idx = self._index(senders[here])
                self._put_sent(msgs[here], self.params.index_select(0, idx), to[here],
                               self.age[idx].tolist(), byz[here])
            return
        numel, dtype = self.params.shape[1], self.params.dtype
        width = numel + 8 // dtype.itemsize       # the age as a float64
        src, dst = shard.owner(senders), shard.owner(to)
        out = np.flatnonzero(src == shard.rank)
        out = out[np.argsort(dst[out], kind="stable")]                # by receiving rank, in wave order
        send = torch.empty(len(out), width, dtype=dtype, device=shard.device)
        if len(out):
            idx = self._index(senders[out] - lo)
            send[:, :numel] = self.params.index_select(0, idx)
            send[:, numel:] = pack_numbers(self.age[idx][:, None], dtype)
        come = np.flatnonzero(dst == shard.rank)
        come = come[np.argsort(src[come], kind="stable")]             # by sending rank, in wave order
        recv = torch.empty(len(come), width, dtype=dtype, device=shard.device)
        exchange(shard, send, np.bincount(dst[out], minlength=shard.world).tolist(), recv,
                 np.bincount(src[come], minlength=shard.world).tolist(),
                 f"round {self.round + 1}'s gossip (wave {w + 1})")
        if len(come):
            ages = unpack_numbers(recv[:, numel:])[:, 0].tolist()
            self._put_sent(msgs[come], recv[:, :numel], to[come], ages, byz[come])

    # --- the period's training record, from every rank ---------------------------------------------
    def _period_records(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, torch.Tensor]:
        nodes, keys, steps, losses = super()._period_records()
        shard = self.shard
        if shard.world == 1:
            return nodes, keys, steps, losses
        during = f"round {self.round + 1}'s training record"
        mine = torch.stack([torch.from_numpy(nodes).double(), torch.from_numpy(keys).double(),
                            torch.from_numpy(steps).double(), losses.double().cpu()], dim=1)
        every = gather_uneven(shard, [mine], during)[0].numpy()
        return (every[:, 0].astype(np.int64), every[:, 1].astype(np.int64), every[:, 2].astype(np.int64),
                torch.from_numpy(every[:, 3]).to(self.device))

    # --- checkpoints: every node's row and every message, on rank 0 ---------------------------------
    def state_dict(self) -> dict[str, Any]:
        shard = self.shard
        during = f"round {self.round}'s checkpoint"
        if not self.p2p:
            self._fence(during)                       # every rank done writing
        state = super().state_dict()                 # this rank's messages
        if shard.world > 1:
            ids, rows, ages = state["msg_ids"], state["msg_rows"], state["msg_ages"]
            rows, meta = gather_uneven(shard, [rows, torch.stack([ids.double(), ages.double()], dim=1)], during)
            order = torch.argsort(meta[:, 0])
            ids = meta[order, 0].long()
            state.update(msg_ids=ids, msg_rows=rows[order], msg_ages=meta[order, 1].to(state["msg_ages"].dtype),
                         msg_receivers=torch.tensor([self.receiver.get(i, -1) for i in ids.tolist()],
                                                    dtype=torch.int64, device="cpu"))
            if self.p2p:                              # every node's row and age, on rank 0
                state.update(params=self._on_primary(self.params), age=self._on_primary(self.age))
            else:
                if shard.primary:
                    state["params"] = self.params.clone()
                self._fence(during)                   # rank 0's copies taken before anyone writes
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
