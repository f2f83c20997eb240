"""Asynchronous FL on the simulated clock: clients train from whatever model they were sent.

Event-driven. Whenever fewer than ``concurrency`` clients are in flight, the server picks
idle clients (online, with data, reachable; uniformly at random) and sends them the current
model; a task ends at dispatch + download + compute + upload. The server updates its model
(one ``run_round``) on one accepted arrival (FedAsync), ``buffer_size`` accepted arrivals
(FedBuff, AFA-CD, AFA-CS), at each period end (FedFix, which also hands out models only at
period ends), or when an arrival group completes or times out (FedCompass, whose scheduler
also gives each task its number of local steps; a client's first arrival is a single
update). Anarchic clients (AFA) dispatch themselves: an idle client becomes ready after its
think time and starts a task of its own length at the next dispatch point it is eligible.
Staleness = server version at arrival minus the version the client started from.

Batching: a task's result depends only on its start model and its key, and its end time
only on profiles and counter-based draws, never on model values. So a task is trained
lazily, when the first not-yet-trained task arrives, together with every other pending
task, in one ``trainer.train`` call; the effects still land at their simulated times.
Tasks of different lengths train in the same call (``steps=`` per task): a node's batches
do not depend on the other nodes' step counts.

Simplifications: availability is checked at dispatch (a client that goes offline mid-task
still delivers); a lost download or upload frees the client's slot at the time the message
would have arrived; partitions drop an upload when the client cannot reach the server at
its arrival time; the server's link (``server_bandwidth_Bps``) is not shared between
overlapping transfers (a dispatch batch of B models adds ``B * bytes / bandwidth``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gossamer import rng
from gossamer.algorithms.fl.async_fl import AsyncFL
from gossamer.algorithms.fl.fedcompass import CompassSchedule, FedCompass
from gossamer.protocols.accounting import FLAccounting
from gossamer.sim.drivers.base import Driver, _to_numpy, _to_tensor
from gossamer.sim.experiment import Experiment

_INT_FIELDS = ("task_id", "client", "start_version", "samples", "steps", "assigned", "key")
_FLOAT_FIELDS = ("dispatch_s", "end_s", "loss")
_BOOL_FIELDS = ("received", "delivered")


@dataclass
class Task:
    """One client's job: download, train, upload. ``start`` until trained, then ``message``."""

    task_id: int                     # its fault-message key
    client: int
    start_version: int
    dispatch_s: float
    end_s: float
    received: bool                   # the download arrived
    delivered: bool                  # the upload will arrive
    samples: int
    start: torch.Tensor | None = None
    message: torch.Tensor | None = None
    loss: float = 0.0
    steps: int = 0
    assigned: int = 0                # local steps the algorithm chose; 0: the local schedule
    key: int = 0                     # data-order key: tasks the client had started before this one


Entry = tuple[Task, int]             # an accepted update and its staleness


class AsyncFLDriver(Driver):
    """Runs :class:`~gossamer.algorithms.fl.async_fl.AsyncFL` rules; one round = one model update."""

    columns = Driver.columns + ["updates", "mean_staleness", "in_flight", "accepted", "discarded",
                                "lost_messages"]

    def __init__(self, exp: Experiment) -> None:
        super().__init__(exp)
        self.algorithm: AsyncFL = exp.algorithm
        n, algo = exp.num_nodes, exp.algorithm
        self.state = algo.init_state(exp.init_params.reshape(-1))
        self.has_data = exp.trainer.sizes > 0
        self.faults = exp.faults if exp.faults is not None and exp.faults.enabled else None
        self.attack = exp.adversary is not None and exp.adversary.model_attack
        self.acct = FLAccounting(n)
        self.concurrency = algo.concurrency if algo.concurrency is not None else n
        self.lr = float(exp.cfg.local.lr)
        self.tasks: list[Task] = []                  # in flight, in dispatch order
        self.buffer: list[Entry] = []                # accepted, not yet applied (FedCompass: general buffer)
        self.next_task = self.dispatches = 0
        self.dispatch_open = True                    # FedFix: only at period boundaries
        self.accepted = self.lost = self.max_in_flight = 0
        self.last_staleness: float | None = None
        self.client_tasks = np.zeros(n, dtype=np.int64)        # tasks each client started
        self.client_steps = np.zeros(n, dtype=np.int64)        # local steps of its delivered tasks
        # self-dispatching clients (anarchic FL): when each idle client wants to start its next task
        self.ready_s = algo.think_time(exp.cfg.seed, np.arange(n), self.client_tasks) \
            if algo.self_dispatch else np.zeros(n)
        # FedCompass: speeds, arrival groups and their buffered updates
        self.compass: FedCompass | None = algo if algo.trigger == "group" else None
        self.schedule = CompassSchedule.empty(n) if self.compass is not None else None
        self.group_buffer: dict[int, list[Entry]] = {}
        sched, sizes = exp.trainer.schedule, exp.trainer.sizes
        self.batch_size = sched.batch_size
        per_task = sched.steps * sched.batch_size if sched.steps else int(sched.epochs or 1) * sizes
        self.planned = np.where(self.has_data, per_task, 0).astype(np.int64)   # samples per task
        parts = exp.cfg.faults.partitions if self.faults is not None else []
        self._partition_times = sorted({p.at_s for p in parts} | {p.heal_s for p in parts if p.heal_s})

    # --- one round: events until the next model update ---------------------------------------
    def run_round(self) -> None:
        algo, r = self.algorithm, self.round + 1
        losses: list[float] = []
        while True:
            t = self.sim_time
            if algo.trigger != "period" or self.dispatch_open:
                self._dispatch(t)
                self.dispatch_open = False
            boundary = (self.state.version + 1) * algo.delta_t_s if algo.trigger == "period" else math.inf
            t_end = min((task.end_s for task in self.tasks), default=math.inf)
            t_timer = min((g.latest_s for g in self.schedule.groups.values() if g.open), default=math.inf) \
                if self.schedule is not None else math.inf
            waiting = algo.trigger != "period" and len(self.tasks) < self.concurrency
            t_ready = self._next_ready(t) if waiting else math.inf
            t_wake = self._next_change(t) if waiting else math.inf
            if not self.tasks and algo.trigger != "period" and math.isinf(min(t_timer, t_ready)):
                if math.isfinite(t_wake):                 # nobody to run: wait for a change
                    self._advance(t_wake)
                break                                     # a round without a model update
            t_next = min(t_end, t_timer, t_ready, t_wake, boundary)
            self._advance(t_next)
            entries = self._arrivals(t_next, losses)
            if entries is None and t_timer <= t_next:
                entries = self._timers(t_next)
            if entries is not None:
                self._update(entries)
                break
            if t_next == boundary:
                entries, self.buffer = self.buffer, []
                self._update(entries)
                self.dispatch_open = True
                break
        if losses:
            self.train_loss = float(np.mean(losses))
        self.round = r

    def _advance(self, t: float) -> None:
        if not self.tasks:
            self.acct.server_idle(t - self.sim_time)
        self.sim_time = t

    def _busy(self) -> np.ndarray:
        """Bool ``[N]``: clients training, or (FedCompass) waiting in their arrival group."""
        busy = np.zeros(self.exp.num_nodes, dtype=bool)
        busy[[task.client for task in self.tasks]] = True
        if self.schedule is not None:
            busy |= self.schedule.group >= 0
        return busy

    def _next_ready(self, t: float) -> float:
        """Earliest time after ``t`` at which an idle self-dispatching client ends its think time."""
        if not self.algorithm.self_dispatch:
            return math.inf
        times = self.ready_s[self.has_data & ~self._busy()]
        times = times[times > t]
        return float(times.min()) if len(times) else math.inf

    def _next_change(self, t: float) -> float:
        """Earliest time after ``t`` at which an idle client may become dispatchable."""
        idle = self.has_data & ~self._busy()
        times = []
        avail = self.exp.availability
        if avail.model != "always" and idle.any():
            times.append(float(avail.next_switch[idle].min()))
        if self.faults is not None:
            times.append(self.faults.next_change())
            times += self._partition_times
        return min((x for x in times if x > t), default=math.inf)

    # --- dispatch ----------------------------------------------------------------------------
    def _dispatch(self, t: float) -> None:
        """A dispatch point: serve up to ``concurrency - in flight`` eligible idle clients."""
        exp = self.exp
        busy = self._busy()
        available = exp.online(t) & self.has_data
        if self.faults is not None:
            available &= self.faults.server_reachable(t)
        self.acct.unavailable(~available & ~busy, t)
        eligible = available & ~busy
        if self.algorithm.self_dispatch:                 # anarchic clients start when they want to
            eligible &= self.ready_s <= t
        free = self.concurrency - len(self.tasks)
        candidates = np.flatnonzero(eligible)
        if free <= 0 or len(candidates) == 0:
            return
        if len(candidates) > free:
            g = rng.generator(exp.cfg.seed, rng.STREAM_ASYNC_FL, self.dispatches)
            candidates = np.sort(g.choice(candidates, size=free, replace=False))
        self.dispatches += 1
        candidates, steps = self._task_steps(candidates, t)
        self.acct.assigned(candidates, t)
        self._start(candidates, t, steps)

    def _task_steps(self, nodes: np.ndarray, t: float) -> tuple[np.ndarray, np.ndarray | None]:
        """Local steps of the tasks about to start (None: the local schedule), in start order.

        FedCompass assigns fastest first (by the speed estimate); a client without an estimate
        trains ``max_local_steps`` in no group."""
        algo, counts = self.algorithm, self.client_tasks[nodes]
        if self.compass is None:
            return nodes, algo.task_steps(self.exp.cfg.seed, nodes, counts)
        speed = self.schedule.speed[nodes]
        nodes = nodes[np.lexsort((nodes, np.where(np.isnan(speed), np.inf, speed)))]
        steps = np.array([self.compass.max_local_steps if np.isnan(self.schedule.speed[c])
                          else self.compass.assign(self.schedule, int(c), t) for c in nodes.tolist()],
                         dtype=np.int64)
        return nodes, steps

    def _start(self, nodes: np.ndarray, t: float, steps: np.ndarray | None = None) -> None:
        exp, system, faults = self.exp, self.exp.system, self.faults
        nbytes, server, b = exp.message_bytes, exp.num_nodes, len(nodes)
        ids = np.arange(self.next_task, self.next_task + b)
        self.next_task += b
        keys = self.client_tasks[nodes].copy()      # per client, so a real client computes the same
        self.client_tasks[nodes] += 1
        samples = self.planned[nodes] if steps is None else \
            np.where(self.has_data[nodes], steps * self.batch_size, 0).astype(np.int64)
        down = system.download_s(nodes, nbytes) + system.server_fanout_s(b * nbytes)
        compute = system.compute_s(nodes, samples)
        up = system.upload_s(nodes, nbytes) + system.server_fanout_s(nbytes)
        received, sent = np.ones(b, dtype=bool), np.ones(b, dtype=bool)
        if faults is not None:                     # message keys: 2 * task (down), 2 * task + 1 (up)
            compute = compute * faults.slowdown(self.state.version, nodes)
            for j, (k, c) in enumerate(zip(ids.tolist(), nodes.tolist(), strict=True)):
                received[j] = not faults.lost(2 * k, server, c)
                sent[j] = not faults.lost(2 * k + 1, c, server)
                down[j] += float(faults.extra_delay(2 * k, server, c))
                up[j] += float(faults.extra_delay(2 * k + 1, c, server))
        end = t + np.where(received, down + compute + up, down)
        if faults is not None:
            sent &= np.array([bool(faults.server_reachable(e)[c]) for e, c in zip(end, nodes, strict=True)])
        self.bytes_down += b * nbytes
        self.acct.download(nodes, nbytes)
        for j, c in enumerate(nodes.tolist()):
            ok = bool(received[j] and sent[j])
            self.tasks.append(Task(int(ids[j]), c, self.state.version, t, float(end[j]), bool(received[j]),
                                   ok, int(samples[j]), self.state.params if ok else None,
                                   assigned=0 if steps is None else int(steps[j]), key=int(keys[j])))
        self.max_in_flight = max(self.max_in_flight, len(self.tasks))

    # --- arrivals, training, updates -----------------------------------------------------------
    def _arrivals(self, t: float, losses: list[float]) -> list[Entry] | None:
        """Handle tasks ending at ``t`` in task order; the updates to apply once one is due (the
        rest wait for the next round), else None."""
        algo, seed = self.algorithm, self.exp.cfg.seed
        for task in sorted((x for x in self.tasks if x.end_s <= t), key=lambda x: (x.end_s, x.task_id)):
            c = task.client
            self.tasks.remove(task)
            self.acct.finished([c], t)
            if algo.self_dispatch:                      # the client thinks before its next task
                self.ready_s[c] = t + float(algo.think_time(seed, np.array([c]), self.client_tasks[[c]])[0])
            if task.received:
                self.bytes_up += self.exp.message_bytes
                self.acct.upload([c], self.exp.message_bytes)
            if not task.delivered:
                self.lost += 1
                if self.schedule is not None and (entries := self._compass_lost(task)):
                    return entries
                continue
            self.acct.completed([c])
            if task.message is None:
                self._train_pending(task)
            self.node_steps += task.steps
            self.client_steps[c] += task.steps
            losses.append(task.loss)
            staleness = self.state.version - task.start_version
            entry: Entry | None = None
            if algo.accepts(staleness):
                self.acct.accepted(staleness)
                self.accepted += 1
                entry = (task, staleness)
            else:
                self.acct.discard()
            if self.schedule is not None:
                if entries := self._compass_arrival(task, entry, t):
                    return entries
                continue
            if entry is None:
                continue
            self.buffer.append(entry)
            due = 1 if algo.trigger == "arrival" else getattr(algo, "buffer_size", None)
            if len(self.buffer) == due:
                entries, self.buffer = self.buffer, []
                return entries
        return None

    # --- FedCompass: arrival groups ------------------------------------------------------------
    def _compass_arrival(self, task: Task, entry: Entry | None, t: float) -> list[Entry] | None:
        """A delivered FedCompass task: measure the speed, then single update, late, or wait."""
        sched, c = self.schedule, task.client
        sched.speed[c] = self.compass.update_speed(float(sched.speed[c]), (t - task.dispatch_s) / task.assigned)
        g = int(sched.group[c])
        if g < 0:                                       # first task: applied alone, then assigned
            return [entry] if entry is not None else None
        group = sched.groups[g]
        if not group.open or t >= group.latest_s:      # late: general buffer, re-assigned at once
            sched.leave(c)
            if entry is not None:
                self.buffer.append(entry)
            self._dispatch(t)
            return None
        group.members.remove(c)
        group.arrived.append(c)
        if entry is not None:
            self.group_buffer.setdefault(g, []).append(entry)
        return self._close_group(g) if not group.members else None

    def _compass_lost(self, task: Task) -> list[Entry] | None:
        """A FedCompass task that never reaches the server: the client leaves its group (it asks
        for work again), which may complete the group."""
        g = self.schedule.leave(task.client)
        group = self.schedule.groups.get(g)
        if group is not None and group.open and not group.members:
            return self._close_group(g)
        return None

    def _timers(self, t: float) -> list[Entry] | None:
        """Open groups whose latest arrival time has come: aggregate what arrived, else close."""
        for g in sorted(self.schedule.groups):
            group = self.schedule.groups.get(g)
            if group is None or not group.open or group.latest_s > t:
                continue
            if group.arrived:
                if entries := self._close_group(g):
                    return entries
            else:                                       # nobody arrived: members will be late
                group.open = False
        return None

    def _close_group(self, g: int) -> list[Entry] | None:
        """Group ``g`` aggregates: its buffered updates and the general buffer (None when empty);
        its arrived clients are free to be re-assigned (the next dispatch point, fastest first)."""
        self.schedule.release(g)
        entries, self.buffer = self.buffer + self.group_buffer.pop(g, []), []
        return entries or None

    def _train_pending(self, first: Task) -> None:
        """Train ``first`` and every other deliverable untrained task in one batched call."""
        exp = self.exp
        pending = [first] + [x for x in self.tasks if x.delivered and x.message is None]
        rows = torch.stack([x.start for x in pending])
        nodes = np.array([x.client for x in pending], dtype=np.int64)
        keys = np.array([x.key for x in pending], dtype=np.int64)
        steps = np.array([x.assigned for x in pending], dtype=np.int64) if first.assigned else None
        with self.timer("train_s"):
            result = exp.trainer.train(rows, nodes, keys, steps=steps)
            if not np.array_equal(result.samples, [x.samples for x in pending]):
                raise RuntimeError("trainer processed a different number of samples than planned")
            trained = result.params
            if self.attack:
                trained = exp.adversary.corrupt(trained, rows, exp.adversary.byzantine[nodes], first.task_id)
            messages = self.algorithm.client_message(trained, rows, result.steps, self.lr)
        for i, task in enumerate(pending):
            task.message, task.start = messages[i].clone(), None
            task.loss, task.steps = float(result.loss[i]), int(result.steps[i])

    def _update(self, entries: list[Entry]) -> None:
        """One server update from ``entries`` (possibly none: FedFix's empty period)."""
        tasks = [task for task, _ in entries]
        staleness = np.array([s for _, s in entries], dtype=np.int64)
        if tasks:
            messages = torch.stack([task.message for task in tasks])
        else:
            messages = self.state.params.new_zeros((0, self.state.params.numel()))
        clients = np.array([task.client for task in tasks], dtype=np.int64)
        with self.timer("communicate_s"):
            self.state = self.algorithm.aggregate(self.state, messages, staleness, clients,
                                                  self.exp.trainer.sizes, lr=self.lr)
        self.last_staleness = float(staleness.mean()) if tasks else None

    # --- reporting -----------------------------------------------------------------------------
    def evaluate(self) -> dict[str, Any]:
        with self.timer("eval_s"):
            acc, loss = self.exp.evaluator.evaluate(self.state.params.reshape(1, -1))
        row = self.base_row()
        row.update(test_accuracy=float(acc[0]), test_loss=float(loss[0]), updates=self.state.version,
                   mean_staleness=self.last_staleness, in_flight=len(self.tasks),
                   accepted=self.accepted, discarded=self.acct.discarded, lost_messages=self.lost)
        return row

    def global_params(self) -> torch.Tensor:
        return self.state.params

    def summary(self) -> dict[str, Any]:
        out = self.acct.summary()
        out.update(server_updates=self.state.version, accepted_updates=self.accepted,
                   lost_messages=self.lost, concurrency=self.concurrency,
                   max_in_flight=self.max_in_flight, local_steps_per_client=self.client_steps.tolist())
        return out

    # --- checkpoints: the in-flight tasks with their start models or trained messages ----------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        numel = self.state.params.numel()
        pending = [task for task in self.tasks if task.start is not None]
        versions = sorted({task.start_version for task in pending})
        starts = {task.start_version: task.start for task in pending}
        grouped = [(g, entry) for g in sorted(self.group_buffer) for entry in self.group_buffer[g]]
        extra = {f.name: getattr(self.state, f.name) for f in dataclasses.fields(self.state)
                 if f.name not in ("params", "version")}
        state.update(_to_tensor({
            "params": self.state.params, "version": self.state.version, "server_extra": extra,
            "tasks": _task_arrays(self.tasks), "buffer": _task_arrays([task for task, _ in self.buffer]),
            "buffer_staleness": np.array([s for _, s in self.buffer], dtype=np.int64),
            "group_buffer": _task_arrays([task for _, (task, _) in grouped]),
            "group_buffer_staleness": np.array([s for _, (_, s) in grouped], dtype=np.int64),
            "group_buffer_ids": np.array([g for g, _ in grouped], dtype=np.int64),
            "start_versions": np.array(versions, dtype=np.int64),
            "start_models": torch.stack([starts[v] for v in versions]) if versions
            else self.state.params.new_zeros((0, numel)),
            "next_task": self.next_task, "dispatches": self.dispatches,
            "dispatch_open": self.dispatch_open, "accepted": self.accepted, "lost": self.lost,
            "max_in_flight": self.max_in_flight, "last_staleness": self.last_staleness,
            "client_tasks": self.client_tasks.copy(), "client_steps": self.client_steps.copy(),
            "ready_s": self.ready_s.copy(),
            "schedule": self.schedule.state_dict() if self.schedule is not None else None,
            "accounting": self.acct.state_dict()}))
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        n = self.exp.num_nodes
        self.state = dataclasses.replace(self.algorithm.init_state(state["params"]), params=state["params"],
                                         version=int(state["version"]), **state.get("server_extra", {}))
        models = dict(zip(_to_numpy(state["start_versions"]).tolist(), state["start_models"], strict=True))
        self.tasks = _tasks_from(state["tasks"], models)
        buffered = _tasks_from(state["buffer"], models)
        self.buffer = list(zip(buffered, _to_numpy(state["buffer_staleness"]).tolist(), strict=True))
        self.group_buffer = {}
        if "group_buffer" in state:
            grouped = zip(_to_numpy(state["group_buffer_ids"]).tolist(), _tasks_from(state["group_buffer"], models),
                          _to_numpy(state["group_buffer_staleness"]).tolist(), strict=True)
            for g, task, s in grouped:
                self.group_buffer.setdefault(g, []).append((task, s))
        self.next_task, self.dispatches = int(state["next_task"]), int(state["dispatches"])
        self.dispatch_open = bool(state["dispatch_open"])
        self.accepted, self.lost = int(state["accepted"]), int(state["lost"])
        self.max_in_flight = int(state["max_in_flight"])
        self.last_staleness = state["last_staleness"]

        def array(key: str, dtype: type, default: np.ndarray) -> np.ndarray:   # older checkpoints lack some
            return np.array(_to_numpy(state[key]), dtype=dtype) if key in state else default

        self.client_tasks = array("client_tasks", np.int64, np.zeros(n, dtype=np.int64))
        self.client_steps = array("client_steps", np.int64, np.zeros(n, dtype=np.int64))
        self.ready_s = array("ready_s", np.float64, self.ready_s)
        if state.get("schedule") is not None:
            self.schedule = CompassSchedule.from_state_dict(state["schedule"])
        self.acct.load_state_dict(_to_numpy(state["accounting"]))


def _task_arrays(tasks: list[Task]) -> dict[str, Any]:
    """Column arrays of ``tasks``, plus the stacked messages of the trained ones."""
    out: dict[str, Any] = {}
    for name, dtype in [(f, np.int64) for f in _INT_FIELDS] + [(f, np.float64) for f in _FLOAT_FIELDS] \
            + [(f, bool) for f in _BOOL_FIELDS]:
        out[name] = np.array([getattr(task, name) for task in tasks], dtype=dtype)
    out["trained"] = np.array([task.message is not None for task in tasks], dtype=bool)
    trained = [task.message for task in tasks if task.message is not None]
    out["messages"] = torch.stack(trained) if trained else torch.zeros(0)
    return out


def _tasks_from(arrays: dict[str, Any], starts: dict[int, torch.Tensor]) -> list[Task]:
    cols = {k: _to_numpy(v) for k, v in arrays.items() if k != "messages"}
    messages = iter(arrays["messages"])
    tasks = []
    for i in range(len(cols["task_id"])):
        task = Task(*(int(cols[f][i]) for f in ("task_id", "client", "start_version")),
                    float(cols["dispatch_s"][i]), float(cols["end_s"][i]), bool(cols["received"][i]),
                    bool(cols["delivered"][i]), int(cols["samples"][i]), loss=float(cols["loss"][i]),
                    steps=int(cols["steps"][i]), assigned=int(cols["assigned"][i]) if "assigned" in cols else 0,
                    key=int(cols["key"][i]) if "key" in cols else int(cols["task_id"][i]))
        if cols["trained"][i]:
            task.message = next(messages).clone()
        elif task.delivered:
            task.start = starts[task.start_version]
        tasks.append(task)
    return tasks
