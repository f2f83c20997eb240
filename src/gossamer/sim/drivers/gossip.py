"""Asynchronous gossip (:mod:`gossamer.protocols.gossip`) on the simulated clock, batched.

Events: a node's exchange clock fires (WAKE), a pull request arrives (REQUEST), a model
arrives (ARRIVE), a node finishes merging and training on it (APPLY: one clock, models one at
a time, so it lands at ``max(arrival, busy until) + compute time``); with dual clocks a model
is merged on arrival (MERGE) and the computation clock (TICK) starts an update that lands one
compute time later (DONE) on the model as it is then; ticks finding the node busy or offline
are skipped (``compute_skipped``).

Batching: every message takes at least ``delta`` seconds and scheduling never depends on
model values (clocks and peers are counter-based draws), so each window ``[t0, t0 + delta)``
is handled in two phases: scheduling in time order in Python (gaps and peers drawn as arrays;
without faults an update completing inside the window is a timed write, not a queued event),
then the model reads and writes in waves, each node at most once per wave, each wave one
batched call (:mod:`gossamer.sim.gossip_waves`). This equals one event at a time (tested).
"""

from __future__ import annotations

import heapq
import math
from typing import Any

import numpy as np
import torch

from gossamer import wire
from gossamer.protocols import dl_metrics
from gossamer.protocols import gossip as protocol
from gossamer.sim.drivers.sync_dl import SyncDLDriver
from gossamer.sim.experiment import Experiment
from gossamer.sim.gossip_waves import MERGE, READ, RESET, TRAIN, WRITE, GossipWaves
from gossamer.sim.messages import MessageStore

WAKE, REQUEST, ARRIVE, APPLY, TICK, DONE = 0, 1, 2, 3, 4, 5


class GossipDriver(GossipWaves, SyncDLDriver):
    """Executes :mod:`gossamer.protocols.gossip` for every node; one round = one period."""

    columns = dl_metrics.GOSSIP_COLUMNS

    def __init__(self, exp: Experiment) -> None:
        super().__init__(exp)
        algo, n = exp.algorithm, exp.num_nodes
        self.period = algo.period_s
        self.dual = not protocol.trains_on_arrival(algo)
        self.age = torch.zeros(n, device=self.device)
        self.updates = np.zeros(n, dtype=np.int64)
        self.busy_until: list[float] = [0.0] * n
        self.heap: list[tuple] = []
        self.seq = 0
        self.messages = MessageStore(exp.spec.numel, device=self.device)  # models in flight, copy-on-write
        self.next_msg = 0
        self.events = 0
        self.dropped = 0
        self.compute_skipped = 0                      # dual clocks: ticks that found the node busy/offline
        self.period_updates: list[tuple] = []         # this period's (nodes, keys, steps, losses)
        sys_ = exp.system
        sizes = exp.trainer.sizes
        sched = exp.trainer.schedule
        per_update = (sched.steps * sched.batch_size if sched.steps else (sched.epochs or 1) * sizes)
        self.update_samples = np.where(sizes > 0, per_update, 0)
        self.compute_s = sys_.sample_time_s * self.update_samples
        self._compute, self._latency = self.compute_s.tolist(), sys_.latency_s.tolist()
        self._bw_up, self._bw_down = sys_.bandwidth_up_Bps.tolist(), sys_.bandwidth_down_Bps.tolist()
        self.faults = exp.faults if exp.faults is not None and exp.faults.enabled else None
        quiet = exp.availability.model == "always" and self.faults is None
        self._always = np.ones(n, dtype=bool) if quiet else None
        self.receiver: dict[int, int] = {}          # message id -> receiver (attacks need it)
        self.delta = float(np.min(sys_.latency_s + wire.HEADER_BYTES / sys_.bandwidth_up_Bps))
        nodes = np.arange(n)
        first = [(t, WAKE, i) for i, t in enumerate(self._gaps(WAKE, nodes, np.zeros(n, dtype=np.int64)))]
        if self.dual:                               # only nodes with data have a computation clock
            holders = np.flatnonzero(self.has_data)
            ticks = self._gaps(TICK, holders, np.zeros(len(holders), dtype=np.int64))
            first += [(t, TICK, int(i)) for i, t in zip(holders.tolist(), ticks, strict=True)]
        for seq, (t, kind, i) in enumerate(first, start=1):
            self.heap.append((t, seq, kind, i, 0, 0))
        self.seq = len(first)
        heapq.heapify(self.heap)

    # --- scheduling helpers ------------------------------------------------------------------
    def _push(self, t: float, kind: int, node: int, a: int, b: int, target: list | None = None) -> None:
        self.seq += 1
        heapq.heappush(self.heap if target is None else target, (t, self.seq, kind, node, a, b))

    def _gap(self, kind: int, node: int, k: int) -> float:
        """Gap from a node's k-th clock tick to its next (the algorithm's clock rule)."""
        return self.exp.algorithm.clock_gap(self.exp.cfg.seed, node, k, compute=kind == TICK)

    def _gaps(self, kind: int, nodes: np.ndarray, ks: np.ndarray) -> list[float]:
        """:meth:`_gap` for many (node, k) at once (the same values: one vectorized draw)."""
        return self.exp.algorithm.clock_gaps(self.exp.cfg.seed, nodes, ks, compute=kind == TICK)

    def _due_gaps(self, due: list[tuple], kind: int) -> dict[int, float]:
        """Next gaps of the clock ticks of ``kind`` in a window, drawn at once: node -> gap.
        A node has one pending tick per clock, so each node appears at most once."""
        picked = [(e[3], e[4] + 1) for e in due if e[2] == kind]
        if not picked:
            return {}
        nodes, ks = np.array(picked, dtype=np.int64).T
        return dict(zip(nodes.tolist(), self._gaps(kind, nodes, ks), strict=True))

    def _neighbours(self) -> tuple[np.ndarray, np.ndarray]:
        """CSR out-neighbours of this period's graph (peer sampling: each node's view)."""
        dynamic = self.exp.dynamic
        if dynamic is None:
            return self.exp.topology.indptr, self.exp.topology.indices
        links = dynamic.links(self.round + 1)
        return links.out_indptr, links.out_indices

    def _peer(self, node: int, k: int) -> int:
        indptr, indices = self._neighbours()
        return protocol.pick_peer(self.exp.cfg.seed, node, k, indices[indptr[node]:indptr[node + 1]])

    def _peers(self, nodes: np.ndarray, ks: np.ndarray) -> np.ndarray:
        """:meth:`_peer` for many wakes of this period at once, with the same draws (tested equal):
        the per-wake scalar draw is the largest cost of scheduling at scale."""
        return protocol.pick_peers(self.exp.cfg.seed, nodes, ks, *self._neighbours())

    def _delay(self, sender: int, receiver: int, nbytes: int, key: int = 0) -> float:
        delay = self._latency[sender] + nbytes / self._bw_up[sender] + nbytes / self._bw_down[receiver]
        if self.faults is not None:
            delay += float(self.faults.extra_delay(key, np.array([sender]), np.array([receiver]))[0])
        return delay

    def _online(self, t: float, ops: list) -> np.ndarray:
        online = self.exp.online(t)
        if self.faults is not None and self.faults.rejoin_fresh:
            for node in self.faults.rejoined().tolist():
                ops.append((t, RESET, node, -1))
        return online

    def _reachable(self, t: float, sender: int, receiver: int) -> bool:
        return self.faults is None or bool(
            self.faults.connected(t, np.array([sender]), np.array([receiver]))[0])

    # --- the two phases of a window ------------------------------------------------------------
    def _schedule_window(self, t_end: float) -> list[tuple]:
        """Phase 1: handle the window's events in time order; return the model operations
        ``(time, kind, node, message)`` (phase 2 orders each node's operations by time)."""
        heap, local = self.heap, []
        while heap and heap[0][0] < t_end:
            local.append(heapq.heappop(heap))        # popped in order: already a heap
        ops: list[tuple] = []
        algo = self.exp.algorithm
        (push, pull), nbytes, dual = protocol.exchange(algo.mode), self.exp.message_bytes, self.dual
        gaps = {WAKE: self._due_gaps(local, WAKE), TICK: self._due_gaps(local, TICK) if dual else {}}
        due = [(e[3], e[4]) for e in local if e[2] == WAKE]      # each node has one pending wake
        nodes, ks = np.array(due, dtype=np.int64).reshape(-1, 2).T
        peers = dict(zip(nodes.tolist(), self._peers(nodes, ks).tolist(), strict=True))
        busy, pop, push, always = self.busy_until, heapq.heappop, heapq.heappush, self._always
        # Without faults or churn nothing happens at an update's completion but its model write,
        # so an update that completes inside the window is not queued as an event: its write
        # is recorded at its time (it still counts as an event).
        direct = always is not None
        events = 0
        while local:
            t, _, kind, node, a, b = pop(local)
            events += 1
            online = always if direct else self._online(t, ops)
            if kind == WAKE or kind == TICK:            # a clock ticks: schedule its next tick
                gap = gaps[kind].pop(node, None)
                nxt = t + (gap if gap is not None else self._gap(kind, node, a + 1))
                self.seq += 1
                push(local if nxt < t_end else heap, (nxt, self.seq, kind, node, a + 1, 0))
            if kind == WAKE:
                peer = peers.pop(node, None)
                if peer is None:                        # a second wake in the window
                    peer = self._peer(node, a)
                if not online[node] or peer < 0 or not (direct or self._reachable(t, node, peer)):
                    continue
                if not push:
                    self.bytes_up += wire.HEADER_BYTES
                    self.node_bytes[node] += wire.HEADER_BYTES
                    self._push(t + self._delay(node, peer, wire.HEADER_BYTES, -1 - a), REQUEST, peer, node, 0)
                else:
                    self._send(ops, t, node, peer, reply_to=node if pull else -1)
            elif kind == TICK:                          # start a local update if online and idle
                if not protocol.tick_trains(online[node], busy[node] > t):
                    self.compute_skipped += 1
                    continue
                busy[node] = done = t + self._compute_time(node)
                if direct and done < t_end:
                    ops.append((done, TRAIN, node, -1))
                    events += 1
                else:
                    self._push(done, DONE, node, 0, 0, local if done < t_end else None)
            elif kind == DONE:
                ops.append((t, TRAIN, node, -1))
            elif kind == REQUEST:
                if online[node] and self._reachable(t, node, a):
                    self.bytes_down += wire.HEADER_BYTES
                    self.node_bytes[node] += wire.HEADER_BYTES
                    self._send(ops, t, node, a, reply_to=-1)
            elif kind == ARRIVE:
                if not online[node]:
                    self.dropped += 1
                    self.messages.discard(a)
                    self.receiver.pop(a, None)
                    continue
                self.bytes_down += nbytes
                self.node_bytes[node] += nbytes
                if b >= 0 and self._reachable(t, node, b):  # push-pull: answer with own model
                    self._send(ops, t, node, b, reply_to=-1)
                if dual:                                # merged on arrival, trained on its own clock
                    ops.append((t, MERGE, node, a))
                    continue
                busy[node] = done = max(t, busy[node]) + self._compute_time(node)
                if direct and done < t_end:
                    ops.append((done, WRITE, node, a))
                    events += 1
                else:
                    self._push(done, APPLY, node, a, 0, local if done < t_end else None)
            else:
                ops.append((t, WRITE, node, a))
        self.events += events
        return ops

    def _compute_time(self, node: int) -> float:
        """Simulated seconds of one local update (stragglers slowed down by the fault schedule)."""
        compute = self._compute[node]
        if self.faults is not None:
            compute *= float(self.faults.slowdown(self.round + 1, np.array([node]))[0])
        return compute

    def _send(self, ops: list, t: float, sender: int, receiver: int, reply_to: int) -> None:
        msg = self.next_msg
        self.next_msg += 1
        nbytes = self.exp.message_bytes
        self.bytes_up += nbytes
        self.node_bytes[sender] += nbytes
        if self.faults is not None and self.faults.lost(msg, np.array([sender]), np.array([receiver]))[0]:
            self.dropped += 1                          # sent, never arrives
            return
        ops.append((t, READ, sender, msg))
        self.receiver[msg] = receiver
        self.seq += 1
        heapq.heappush(self.heap, (t + self._delay(sender, receiver, nbytes, msg), self.seq, ARRIVE,
                                   receiver, msg, reply_to))

    # --- driver API ----------------------------------------------------------------------------
    def run_round(self) -> None:
        boundary = (self.round + 1) * self.period
        while self.heap and self.heap[0][0] < boundary:
            t_end = min(self.heap[0][0] + self.delta, boundary) if self.delta > 0 \
                else math.nextafter(self.heap[0][0], math.inf)
            with self.timer("communicate_s"):
                ops = self._schedule_window(t_end)
            self._run_ops(ops)
        self.sim_time = boundary
        ops: list[tuple] = []
        self.last_online = self._online(boundary, ops)
        self._run_ops(ops)
        self._close_period()
        self.round += 1

    def evaluate(self) -> dict[str, Any]:
        row = super().evaluate()
        row.update(events=self.events, messages_dropped=self.dropped)
        return row

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        ids, rows, ages = self.messages.state(self.params)
        heap = sorted(self.heap)
        state.update(
            age=self.age.clone(), updates=torch.from_numpy(self.updates.copy()),
            busy_until=torch.tensor(self.busy_until, dtype=torch.float64, device="cpu"), seq=self.seq,
            next_msg=self.next_msg, events=self.events, dropped=self.dropped,
            compute_skipped=self.compute_skipped,
            heap_time=torch.tensor([e[0] for e in heap], dtype=torch.float64, device="cpu"),
            heap_ints=torch.tensor([e[1:] for e in heap], dtype=torch.int64, device="cpu").reshape(-1, 5),
            msg_ids=torch.tensor(ids, dtype=torch.int64, device="cpu"),
            msg_rows=rows, msg_ages=ages,
            msg_receivers=torch.tensor([self.receiver.get(i, -1) for i in ids], dtype=torch.int64, device="cpu"))
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.age = state["age"].to(self.device, copy=True)          # loaded on the host
        self.updates = state["updates"].numpy().copy()
        self.busy_until = state["busy_until"].tolist()
        self.seq, self.next_msg = int(state["seq"]), int(state["next_msg"])
        self.events, self.dropped = int(state["events"]), int(state["dropped"])
        self.compute_skipped = int(state.get("compute_skipped", 0))
        self.heap = [(float(t), *map(int, ints)) for t, ints in
                     zip(state["heap_time"].tolist(), state["heap_ints"].tolist(), strict=True)]
        heapq.heapify(self.heap)
        ids = state["msg_ids"].tolist()
        self.messages.load(ids, state["msg_rows"], state["msg_ages"].tolist())
        receivers = state.get("msg_receivers", torch.full((len(ids),), -1)).tolist()
        self.receiver = {int(i): int(receivers[j]) for j, i in enumerate(state["msg_ids"].tolist())}
