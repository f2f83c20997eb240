"""Asynchronous FL on the simulated clock: the executor of ``protocols/async_fl.py``.

The protocol decides; this driver supplies the clock, the batching and the simulated network.
Clients ask at every event (period rules: at period ends only). A task ends at dispatch +
download + compute + upload (FAVANO: at its pull time, with the steps that fit before it, at
least one). One ``run_round`` is one server model update. A task's result depends only on its
start model and key, and its end time never on model values, so tasks train lazily: every
pending task in one ``trainer.train`` call (``steps=`` per task) when the first one arrives.

Compressed uploads (``compression.uplink``, feedback none, ef, ef21 or dgc; fixed-size compressors,
so an upload's time is known at dispatch): each task's message minus its base (FedAsync: the
start model; the other rules upload an update or a direction, base zero) is encoded with its
client's feedback row and keyed by (client, task key); the server rebuilds base plus the
decoded difference.

Simplifications: availability is checked at dispatch (a client going offline mid-task still
delivers); a lost download or upload frees the slot when the message would have arrived;
partitions drop an upload the client cannot deliver at its arrival time; the server's link
(``server_bandwidth_Bps``) is not shared between overlapping transfers.
"""

from __future__ import annotations

import heapq
import math
from typing import Any

import numpy as np
import torch

from gossamer.population.columns import SparseColumn
from gossamer.protocols.async_fl import AsyncFLProtocol, Step, Task
from gossamer.protocols.private import build_buffer_dp
from gossamer.protocols.upload import Uploads, build_pipeline, message_base
from gossamer.sim.drivers.async_fl_records import AsyncFLRecords, SimTask
from gossamer.sim.drivers.base import Driver
from gossamer.sim.experiment import Experiment


class AsyncFLDriver(AsyncFLRecords, Driver):
    """Runs :class:`~gossamer.algorithms.fl.async_fl.AsyncFL` rules; one round = one model update."""

    columns = Driver.columns + ["updates", "mean_staleness", "in_flight", "accepted", "discarded",
                                "lost_messages"]

    def __init__(self, exp: Experiment) -> None:
        super().__init__(exp)
        self.algorithm = exp.algorithm
        # compressed uploads (compression.uplink): each task's message, with the client's
        # feedback row (EF residual, EF21 estimate) kept for the whole population; client-level
        # DP (DP-FedBuff): clipped updates, noise on each buffer's sum, epsilon in each row
        pipe = build_pipeline(exp.cfg, exp.algorithm, exp.spec.numel, exp.uplink)
        self.private = build_buffer_dp(exp.cfg, pipe)
        if self.private is not None:
            self.columns = self.columns + ["epsilon"]
        self.protocol = AsyncFLProtocol(exp.algorithm, exp.trainer.sizes, exp.cfg.seed, float(exp.cfg.local.lr),
                                        exp.init_params, private=self.private)
        self.registered = exp.population is not None      # nothing of length N (docs/scale.md)
        self.has_data = self.protocol.has_data
        self.faults = exp.faults if exp.faults is not None and exp.faults.enabled else None
        self.attack = exp.adversary is not None and exp.adversary.model_attack
        # in flight, in dispatch order, and a heap of their (end time, id): the next end and
        # the due tasks without a pass over every task (1,000 in flight at Papaya scale)
        self._live: dict[int, SimTask] = {}
        self._ends: list[tuple[float, int]] = []
        self.next_task = self.max_in_flight = 0
        self.dispatch_open = True                    # period rules: clients ask at period ends only
        # local steps of delivered tasks
        self.client_steps = SparseColumn(exp.num_nodes) if self.registered else np.zeros(exp.num_nodes, dtype=np.int64)
        self.batch_size = exp.trainer.schedule.batch_size
        self.compress = pipe.compress
        self.up_bytes = exp.message_bytes if self.compress is None else pipe.upload_bytes(1)
        self.stage_state: dict[str, torch.Tensor] = {}
        if self.compress is not None:
            self.stage_state = self.compress.init(exp.num_nodes, exp.spec.numel, self.device)
        parts = exp.cfg.faults.partitions if self.faults is not None else []
        self._partition_times = sorted({p.at_s for p in parts} | {p.heal_s for p in parts if p.heal_s})

    @property
    def tasks(self) -> list[SimTask]:
        """The tasks in flight, in dispatch order."""
        return list(self._live.values())

    @tasks.setter
    def tasks(self, tasks: list[SimTask]) -> None:
        self._live = {x.task_id: x for x in tasks}
        self._ends = [(x.end_s, x.task_id) for x in tasks]
        heapq.heapify(self._ends)

    def _add(self, task: SimTask) -> None:
        self._live[task.task_id] = task
        heapq.heappush(self._ends, (task.end_s, task.task_id))

    @property
    def state(self):
        return self.protocol.state

    @property
    def acct(self):
        return self.protocol.acct

    # --- one round: events until the next model update ---------------------------------------
    def run_round(self) -> None:
        p, losses = self.protocol, []
        while True:
            t = self.sim_time
            if self.dispatch_open:
                self._dispatch(t)
                self.dispatch_open = p.invited is None
            t_end = self._ends[0][0] if self._ends else math.inf
            t_timer = p.next_timer()
            waiting = p.has_free_slot()
            t_ready = p.next_ready(t) if waiting else math.inf
            t_wake = self._next_change(t) if waiting else math.inf
            if not self._live and p.invited is None and math.isinf(min(t_timer, t_ready)):
                if math.isfinite(t_wake):                 # nobody to run: wait for a change
                    self._advance(t_wake)
                break                                     # a round without a model update
            t_next = min(t_end, t_timer, t_ready, t_wake)
            self._advance(t_next)
            step = self._arrivals(t_next, losses)
            if step is None and t_timer <= t_next:
                with self.timer("communicate_s"):
                    step = p.timer(t_next)
                self.dispatch_open = True
            if step is not None and step.update is not None:
                break
        if losses:
            self.train_loss = float(np.mean(losses))
        self.round += 1

    def _advance(self, t: float) -> None:
        if not self._live:
            self.acct.server_idle(t - self.sim_time)
        self.sim_time = t

    def _next_change(self, t: float) -> float:
        """Earliest time after ``t`` at which an idle client may become dispatchable."""
        times = []
        avail = self.exp.availability
        if avail.model != "always":
            idle = self.has_data & ~self.protocol.busy()
            if idle.any():
                times.append(float(avail.next_switch[idle].min()))
        if self.faults is not None:
            times.append(self.faults.next_change())
            times += self._partition_times
        return min((x for x in times if x > t), default=math.inf)

    # --- dispatch: the protocol picks, the simulated network times ----------------------------
    def _dispatch(self, t: float) -> None:
        """A dispatch point: every available idle client asks for work."""
        if self.registered:                   # always available: the protocol draws the idle
            plans = self.protocol.dispatch(None, t)
            if plans:
                self._start(plans, t)
            return
        available = self.exp.online(t) & self.has_data
        if self.faults is not None:
            available &= self.faults.server_reachable(t)
        self.acct.unavailable(~available & ~self.protocol.busy(), t)
        plans = self.protocol.dispatch(np.flatnonzero(available), t)
        if plans:
            self._start(plans, t)

    def _start(self, plans: list[Task], t: float) -> None:
        exp, system, faults = self.exp, self.exp.system, self.faults
        nbytes, server, b = exp.message_bytes, exp.num_nodes, len(plans)
        nodes = np.array([x.client for x in plans], dtype=np.int64)
        steps = np.array([x.steps for x in plans], dtype=np.int64)
        ids = np.arange(self.next_task, self.next_task + b)
        self.next_task += b
        down = system.download_s(nodes, nbytes) + system.server_fanout_s(b * nbytes)
        up = system.upload_s(nodes, self.up_bytes) + system.server_fanout_s(self.up_bytes)
        slow = faults.slowdown(self.state.version, nodes) if faults is not None else None
        deadline = np.array([x.deadline_s for x in plans])
        pulled = np.isfinite(deadline)
        if pulled.any():                           # FAVANO: the steps that fit before the pull, >= 1
            per_step = system.compute_s(nodes, np.full(b, self.batch_size)) * (1.0 if slow is None else slow)
            fit = np.floor((deadline - t - down - up) / np.where(per_step > 0, per_step, 1.0))
            steps = np.where(pulled, np.clip(np.where(per_step > 0, fit, steps), 1, steps), steps).astype(np.int64)
        samples = np.where(steps > 0, steps * self.batch_size, self._planned(nodes)).astype(np.int64)
        compute = system.compute_s(nodes, samples)
        received, sent = np.ones(b, dtype=bool), np.ones(b, dtype=bool)
        if faults is not None:                     # message keys: 2 * task (down), 2 * task + 1 (up)
            compute = compute * slow
            for j, (k, c) in enumerate(zip(ids.tolist(), nodes.tolist(), strict=True)):
                received[j] = not faults.lost(2 * k, server, c)
                sent[j] = not faults.lost(2 * k + 1, c, server)
                down[j] += float(faults.extra_delay(2 * k, server, c))
                up[j] += float(faults.extra_delay(2 * k + 1, c, server))
        end = t + np.where(received, down + compute + up, down)
        end = np.where(pulled & received, np.maximum(end, deadline), end)
        if faults is not None:
            sent &= np.array([bool(faults.server_reachable(e)[c]) for e, c in zip(end, nodes, strict=True)])
        self.bytes_down += b * nbytes
        self.acct.download(nodes, nbytes)
        for j, plan in enumerate(plans):
            ok = bool(received[j] and sent[j])
            self._add(SimTask(int(ids[j]), plan, float(end[j]), bool(received[j]), ok, int(samples[j]),
                              int(steps[j]), self.protocol.start_params(plan) if ok else None))
        self.max_in_flight = max(self.max_in_flight, len(self._live))

    def _planned(self, nodes: np.ndarray) -> np.ndarray:
        """Samples a task of the ``local`` schedule processes on each of ``nodes``."""
        sched, sizes = self.exp.trainer.schedule, self.exp.trainer.sizes[nodes]
        per_task = sched.steps * sched.batch_size if sched.steps else int(sched.epochs or 1) * sizes
        return np.where(sizes > 0, per_task, 0)

    # --- arrivals and lazy batched training ----------------------------------------------------
    def _arrivals(self, t: float, losses: list[float]) -> Step | None:
        """Hand the tasks ending at ``t`` to the protocol in task order, until one makes a server
        update (the rest wait for the next round); None if none did."""
        p = self.protocol
        due = []                                  # the tasks ending by t, by (end, id)
        while self._ends and self._ends[0][0] <= t:
            due.append(heapq.heappop(self._ends))
        for k, (_, task_id) in enumerate(due):
            task = self._live.pop(task_id)
            c = task.plan.client
            if task.received:
                self.bytes_up += self.up_bytes
                self.acct.upload([c], self.up_bytes)
            with self.timer("communicate_s"):
                if not task.delivered:
                    step = p.lost(c, t)
                else:
                    if task.message is None:
                        self._train_pending(task)
                    self.node_steps += task.trained_steps
                    self.client_steps[c] += task.trained_steps
                    losses.append(task.loss)
                    step = p.arrival(c, t, task.message)
            if step.update is not None:
                for left in due[k + 1:]:          # the next round's
                    heapq.heappush(self._ends, left)
                return step
            if step.dispatch:                            # FedCompass: a late client is re-assigned at once
                self._dispatch(t)
        return None

    def _train_pending(self, first: SimTask) -> None:
        """Train ``first`` and every other deliverable untrained task in one batched call."""
        pending = [first] + [x for x in self.tasks if x.delivered and x.message is None]
        messages, result = self._train_tasks(pending, first)
        losses = result.loss.tolist()          # one host read per batched call
        for i, task in enumerate(pending):
            task.message, task.start = messages[i].clone(), None
            task.loss, task.trained_steps = losses[i], int(result.steps[i])

    def _train_tasks(self, tasks: list[SimTask], first: SimTask) -> tuple[torch.Tensor, Any]:
        """Train ``tasks`` (untrained, from their start rows) in one batched call: their uploads
        ``[B, P]`` and the trainer's result. ``first``: the arrival that made them train."""
        rows = torch.stack([x.start for x in tasks])
        result = self._trained(tasks, rows, first)
        with self.timer("train_s"):
            messages = self._messages(tasks, rows, result.params, result.steps, first)
        return messages, result

    def _trained(self, tasks: list[SimTask], rows: torch.Tensor, first: SimTask) -> Any:
        """The trainer's result for ``tasks`` from their start ``rows`` (their trained models,
        before any attack)."""
        exp = self.exp
        nodes = np.array([x.plan.client for x in tasks], dtype=np.int64)
        keys = np.array([x.plan.key for x in tasks], dtype=np.int64)
        steps = np.array([x.steps for x in tasks], dtype=np.int64) if first.steps else None
        with self.timer("train_s"):
            result = exp.trainer.train(rows, nodes, keys, steps=steps)
        if not np.array_equal(result.samples, [x.samples for x in tasks]):
            raise RuntimeError("trainer processed a different number of samples than planned")
        return result

    def _messages(self, tasks: list[SimTask], rows: torch.Tensor, trained: torch.Tensor, steps: np.ndarray,
                  first: SimTask) -> torch.Tensor:
        """The uploads of ``tasks`` from their start ``rows`` and trained models: the Byzantine
        clients' crafted (a model attack sees the whole batch), then each client's message."""
        exp = self.exp
        nodes = np.array([x.plan.client for x in tasks], dtype=np.int64)
        if self.attack:
            trained = exp.adversary.corrupt(trained, rows, exp.adversary.byzantine[nodes], first.task_id)
        messages = self.algorithm.client_message(trained, rows, steps, self.protocol.lr)
        keys = np.array([x.plan.key for x in tasks], dtype=np.int64)
        if self.private is not None:       # noise: clients: each clips and adds its share
            messages = self.private.dp.client(messages, nodes, keys, self.algorithm.due(0))
        if self.compress is not None:      # what the server decodes
            messages = self._compressed(nodes, keys, rows, messages)
        return messages

    def _compressed(self, nodes: np.ndarray, keys: np.ndarray, rows: torch.Tensor,
                    messages: torch.Tensor) -> torch.Tensor:
        """Each task's message minus its base (the start model where the rule uploads models,
        FedAsync; else zero: an update or a direction) through ``compression.uplink`` with its
        client's feedback row, keyed by (client, task key) as a real client keys it; the messages
        as the server rebuilds them, base plus the decoded difference. A client has one task in
        flight, so each row is once in a batch, and its tasks train in their order."""
        base = message_base(self.algorithm.uploads_model, rows)
        idx = torch.from_numpy(nodes)
        state = {k: v[idx] for k, v in self.stage_state.items()}
        up, decoded, state = self.compress.apply(Uploads(keys, nodes, base, messages), state)
        for k, v in state.items():
            self.stage_state[k][idx] = v
        return up.with_delta(decoded).model
