"""Event-driven asynchronous gossip on the simulated clock, batched across independent events.

Events: a node's clock fires (WAKE), a pull request arrives (REQUEST), a model arrives
(ARRIVE), a node finishes merging and training on a received model (APPLY). A node
processes received models one at a time, so an APPLY lands at
``max(arrival, node busy until) + compute time``: the effect appears at its simulated time.

Batching: every message takes at least ``delta`` seconds, so no event handled in
``[t0, t0 + delta)`` can create a model-reading event inside the window except through
scheduling, which does not depend on model values (clocks and peer choices are
counter-based random draws). Each window is therefore handled in two phases: scheduling
in time order in Python, then the model reads and writes in waves where each node
appears at most once per wave, each wave one batched tensor call. The result equals
processing events one by one.
"""

from __future__ import annotations

import heapq
import math
from typing import Any

import numpy as np
import torch

from gossamer import rng, wire
from gossamer.sim.drivers.sync_dl import SyncDLDriver
from gossamer.sim.experiment import Experiment

WAKE, REQUEST, ARRIVE, APPLY = 0, 1, 2, 3
READ, WRITE, RESET = 0, 1, 2


class GossipDriver(SyncDLDriver):
    """Runs :class:`~gossamer.algorithms.dl.gossip.GossipLearning`; one round = one period."""

    columns = SyncDLDriver.columns + ["events", "messages_dropped"]

    def __init__(self, exp: Experiment) -> None:
        super().__init__(exp)
        algo, n = exp.algorithm, exp.num_nodes
        self.period = algo.period_s
        self.age = torch.zeros(n)
        self.updates = np.zeros(n, dtype=np.int64)
        self.busy_until = np.zeros(n)
        self.heap: list[tuple] = []
        self.seq = 0
        self.messages: dict[int, tuple[torch.Tensor, float]] = {}
        self.next_msg = 0
        self.events = 0
        self.dropped = 0
        sys_ = exp.system
        sizes = exp.trainer.sizes
        sched = exp.trainer.schedule
        per_update = (sched.steps * sched.batch_size if sched.steps else (sched.epochs or 1) * sizes)
        self.update_samples = np.where(sizes > 0, per_update, 0)
        self.compute_s = sys_.sample_time_s * self.update_samples
        self.faults = exp.faults if exp.faults is not None and exp.faults.enabled else None
        quiet = exp.availability.model == "always" and self.faults is None
        self._always = np.ones(n, dtype=bool) if quiet else None
        self.receiver: dict[int, int] = {}          # message id -> receiver (attacks need it)
        self.delta = float(np.min(sys_.latency_s + wire.HEADER_BYTES / sys_.bandwidth_up_Bps))
        for i in range(n):
            self._push(self._wake_gap(i, 0), WAKE, i, 0, 0)

    # --- scheduling helpers ------------------------------------------------------------------
    def _push(self, t: float, kind: int, node: int, a: int, b: int, target: list | None = None) -> None:
        self.seq += 1
        heapq.heappush(self.heap if target is None else target, (t, self.seq, kind, node, a, b))

    def _wake_gap(self, node: int, k: int) -> float:
        u = rng.uniform_scalar(self.exp.cfg.seed, rng.STREAM_GOSSIP, node, k, 0)
        if self.exp.algorithm.poisson:
            return -math.log1p(-u) * self.period
        return u * self.period if k == 0 else self.period

    def _peer(self, node: int, k: int) -> int:
        topo = self.exp.topology
        lo, hi = int(topo.indptr[node]), int(topo.indptr[node + 1])
        if hi == lo:
            return -1
        u = rng.uniform_scalar(self.exp.cfg.seed, rng.STREAM_GOSSIP, node, k, 1)
        return int(topo.indices[lo + int(u * (hi - lo))])

    def _delay(self, sender: int, receiver: int, nbytes: int, key: int = 0) -> float:
        s = self.exp.system
        extra = 0.0
        if self.faults is not None:
            extra = float(self.faults.extra_delay(key, np.array([sender]), np.array([receiver]))[0])
        return float(s.latency_s[sender] + nbytes / s.bandwidth_up_Bps[sender]
                     + nbytes / s.bandwidth_down_Bps[receiver]) + extra

    def _online(self, t: float, ops: list) -> np.ndarray:
        online = self.exp.online(t)
        if self.faults is not None and self.faults.rejoin_fresh:
            for node in self.faults.rejoined().tolist():
                ops.append((RESET, node, -1))
        return online

    def _reachable(self, t: float, sender: int, receiver: int) -> bool:
        return self.faults is None or bool(
            self.faults.connected(t, np.array([sender]), np.array([receiver]))[0])

    # --- the two phases of a window ------------------------------------------------------------
    def _schedule_window(self, t_end: float) -> list[tuple]:
        """Phase 1: handle the window's events in time order; return model reads/writes."""
        local: list[tuple] = []
        while self.heap and self.heap[0][0] < t_end:
            heapq.heappush(local, heapq.heappop(self.heap))
        ops: list[tuple] = []
        mode, nbytes = self.exp.algorithm.mode, self.exp.message_bytes
        while local:
            t, _, kind, node, a, b = heapq.heappop(local)
            self.events += 1
            online = self._always if self._always is not None else self._online(t, ops)
            if kind == WAKE:
                nxt = t + self._wake_gap(node, a + 1)
                self._push(nxt, WAKE, node, a + 1, 0, local if nxt < t_end else None)
                peer = self._peer(node, a)
                if not online[node] or peer < 0 or not self._reachable(t, node, peer):
                    continue
                if mode == "pull":
                    self.bytes_up += wire.HEADER_BYTES
                    self._push(t + self._delay(node, peer, wire.HEADER_BYTES, -1 - a), REQUEST, peer, node, 0)
                else:
                    self._send(ops, t, node, peer, reply_to=node if mode == "push_pull" else -1)
            elif kind == REQUEST:
                if online[node] and self._reachable(t, node, a):
                    self.bytes_down += wire.HEADER_BYTES
                    self._send(ops, t, node, a, reply_to=-1)
            elif kind == ARRIVE:
                if not online[node]:
                    self.dropped += 1
                    self.messages.pop(a, None)
                    self.receiver.pop(a, None)
                    continue
                self.bytes_down += nbytes
                if b >= 0 and self._reachable(t, node, b):  # push-pull: answer with own model
                    self._send(ops, t, node, b, reply_to=-1)
                compute = self.compute_s[node]
                if self.faults is not None:
                    compute *= float(self.faults.slowdown(self.round + 1, np.array([node]))[0])
                done = max(t, self.busy_until[node]) + compute
                self.busy_until[node] = done
                self._push(done, APPLY, node, a, 0, local if done < t_end else None)
            else:
                ops.append((WRITE, node, a))
        return ops

    def _send(self, ops: list, t: float, sender: int, receiver: int, reply_to: int) -> None:
        msg = self.next_msg
        self.next_msg += 1
        self.bytes_up += self.exp.message_bytes
        if self.faults is not None and self.faults.lost(msg, np.array([sender]), np.array([receiver]))[0]:
            self.dropped += 1                          # sent, never arrives
            return
        ops.append((READ, sender, msg))
        self.receiver[msg] = receiver
        self._push(t + self._delay(sender, receiver, self.exp.message_bytes, msg), ARRIVE, receiver,
                   msg, reply_to)

    def _run_ops(self, ops: list[tuple]) -> None:
        """Phase 2: apply reads and writes in waves with each node at most once per wave."""
        count: dict[int, int] = {}
        waves: list[list[tuple]] = []
        for op in ops:
            w = count.get(op[1], 0)
            count[op[1]] = w + 1
            if w == len(waves):
                waves.append([])
            waves[w].append(op)
        for wave in waves:
            reads = [op for op in wave if op[0] == READ]
            writes = [op for op in wave if op[0] == WRITE]
            resets = [op[1] for op in wave if op[0] == RESET]
            if reads:
                nodes = torch.tensor([op[1] for op in reads])
                rows, ages = self._outgoing(reads, self.params[nodes].clone()), self.age[nodes]
                for j, op in enumerate(reads):
                    self.messages[op[2]] = (rows[j], float(ages[j]))
            if writes:
                self._apply(writes)
            if resets:
                self._restart(np.array(resets))
                self.age[torch.tensor(resets)] = 0.0

    def _outgoing(self, reads: list[tuple], rows: torch.Tensor) -> torch.Tensor:
        """What the readers send: Byzantine senders replace their model by an attack crafted
        against the receiver's current model (the receiver's model is the honest reference)."""
        adv = self.exp.adversary
        if adv is None or not adv.model_attack:
            return rows
        byz = np.array([adv.byzantine[op[1]] for op in reads])
        if not byz.any():
            return rows
        pick = np.flatnonzero(byz)
        receivers = torch.tensor([self.receiver[reads[j][2]] for j in pick])
        own = self.params[receivers]
        held = torch.stack([own, rows[torch.from_numpy(pick)]], dim=1)        # [F, 2, P]
        mask = np.zeros((len(pick), 2), dtype=bool)
        mask[:, 1] = True
        crafted = adv.corrupt(held, own, mask, self.round + 1, key=reads[pick[0]][2])
        rows[torch.from_numpy(pick)] = crafted[:, 1]
        return rows

    def _apply(self, writes: list[tuple]) -> None:
        nodes = np.array([op[1] for op in writes], dtype=np.int64)
        received = [self.messages.pop(op[2]) for op in writes]
        for op in writes:
            self.receiver.pop(op[2], None)
        idx = torch.from_numpy(nodes)
        merged, age = self.exp.algorithm.merge_models(
            self.params[idx], self.age[idx], torch.stack([m for m, _ in received]),
            torch.tensor([a for _, a in received]))
        with self.timer("train_s"):
            result = self.exp.trainer.train(merged, nodes, self.updates[nodes], inplace=True)
        self.params[idx] = result.params
        trained = torch.from_numpy(result.steps > 0)
        self.age[idx] = age + trained.to(age.dtype)
        self.updates[nodes] += 1
        self.node_steps += int(result.steps.sum())
        if trained.any():
            self.train_loss = float(result.loss[trained].mean())

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
        self.round += 1

    def evaluate(self) -> dict[str, Any]:
        row = super().evaluate()
        row.update(events=self.events, messages_dropped=self.dropped)
        return row

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        ids = sorted(self.messages)
        heap = sorted(self.heap)
        state.update(
            age=self.age.clone(), updates=torch.from_numpy(self.updates.copy()),
            busy_until=torch.from_numpy(self.busy_until.copy()), seq=self.seq, next_msg=self.next_msg,
            events=self.events, dropped=self.dropped,
            heap_time=torch.tensor([e[0] for e in heap], dtype=torch.float64),
            heap_ints=torch.tensor([e[1:] for e in heap], dtype=torch.int64).reshape(-1, 5),
            msg_ids=torch.tensor(ids, dtype=torch.int64),
            msg_rows=torch.stack([self.messages[i][0] for i in ids]) if ids else torch.zeros(0),
            msg_ages=torch.tensor([self.messages[i][1] for i in ids], dtype=torch.float64),
            msg_receivers=torch.tensor([self.receiver.get(i, -1) for i in ids], dtype=torch.int64))
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.age = state["age"].clone()
        self.updates = state["updates"].numpy().copy()
        self.busy_until = state["busy_until"].numpy().copy()
        self.seq, self.next_msg = int(state["seq"]), int(state["next_msg"])
        self.events, self.dropped = int(state["events"]), int(state["dropped"])
        self.heap = [(float(t), *map(int, ints)) for t, ints in
                     zip(state["heap_time"].tolist(), state["heap_ints"].tolist(), strict=True)]
        heapq.heapify(self.heap)
        self.messages = {int(i): (state["msg_rows"][j].clone(), float(state["msg_ages"][j]))
                         for j, i in enumerate(state["msg_ids"].tolist())}
        receivers = state.get("msg_receivers", torch.full((len(self.messages),), -1)).tolist()
        self.receiver = {int(i): int(receivers[j]) for j, i in enumerate(state["msg_ids"].tolist())}
