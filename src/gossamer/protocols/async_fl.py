"""The asynchronous FL pattern as one pure state machine, for every executor: FedAsync, FedBuff,
FedFix, FedCompass, AFA, FAVANO, FedAST and the General Theory's rules.

Events in, each with an explicit time (simulated or wall seconds): :meth:`~AsyncFLProtocol.dispatch`
(idle clients ask for work: the simulator offers a dispatch point's available clients, the
runtime the one asking), :meth:`~AsyncFLProtocol.arrival` (an upload, already decoded),
:meth:`~AsyncFLProtocol.lost` (a task that will never deliver), :meth:`~AsyncFLProtocol.timer`
(:meth:`~AsyncFLProtocol.next_timer` is due). Actions out: the :class:`Task` records to start
(client, data-order key = the client's own task count, local steps, start version, model, FAVANO's
pull time) and :class:`Step` (the update applied; ask again now). It holds the server state,
buffers, FedCompass groups and accounting, and decides who may start (concurrency, period
invitations, think times), step counts, staleness and acceptance, and when the server updates.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from gossamer import rng
from gossamer.algorithms.fl.async_fl import AsyncFL
from gossamer.algorithms.fl.fedcompass import CompassSchedule
from gossamer.population.columns import Everyone, SparseColumn
from gossamer.protocols.accounting import FLAccounting
from gossamer.protocols.compass import CompassGroups


@dataclass
class Task:
    """One client's job: train ``steps`` (0: the ``local`` schedule) from ``model``'s version
    ``version`` with data-order key ``key``; FAVANO pulls its progress at ``deadline_s``."""

    client: int
    key: int
    steps: int
    version: int
    start_s: float
    model: int = 0
    deadline_s: float = math.inf


@dataclass
class Entry:
    """An accepted upload waiting to be applied."""

    task: Task
    message: torch.Tensor
    staleness: int
    end_s: float


@dataclass
class Step:
    """What an event made the server do: ``update`` is the applied model update's
    ``(clients, staleness)`` (None: none); ``dispatch``: idle clients should ask now."""

    update: tuple[np.ndarray, np.ndarray] | None = None
    dispatch: bool = False


@dataclass
class AsyncFLProtocol(CompassGroups):
    """The state machine of one asynchronous FL run over ``len(sizes)`` clients."""

    algorithm: AsyncFL
    sizes: np.ndarray                   # [N] samples per client (the server's knowledge), or a
                                        # registered population's column of them (training/cohort.py)
    seed: int
    lr: float                           # local learning rate (two-sided rules)
    params: dataclasses.InitVar[torch.Tensor]
    t0: float = 0.0                     # when the run's clock starts
    tasks: dict[int, Task] = field(default_factory=dict)          # client -> its task in flight
    buffer: list[Entry] = field(default_factory=list)
    dispatches: int = 0
    periods: int = 0
    accepted: int = 0
    lost_tasks: int = 0
    last_staleness: float | None = None
    stopped: bool = False               # the executor has its updates: no more work or updates
    private: Any = None                 # client-level DP (protocols.private.BufferDP): DP-FedBuff

    Step = Step                         # for the FedCompass mixin

    def __post_init__(self, params: torch.Tensor) -> None:
        algo, n = self.algorithm, len(self.sizes)
        self.n = n
        self.state = algo.init_state(params.reshape(-1))
        self.concurrency = algo.concurrency if algo.concurrency is not None else n
        self.group_buffer: dict[int, list[Entry]] = {}
        # a registered population (sizes computed on demand): every client has data and only
        # clients that acted are stored; its rules have no per-client timers or invitations
        self.registered = not isinstance(self.sizes, (np.ndarray, list, tuple))
        if self.registered:
            self.has_data, self.client_tasks = Everyone(n), SparseColumn(n)
            self.ready_s, self.invited, self.schedule = np.zeros(0), None, None
            self.acct = FLAccounting(n, sparse=True)
            return
        self.has_data = np.asarray(self.sizes) > 0
        self.client_tasks = np.zeros(n, dtype=np.int64)
        self.ready_s = self.t0 + algo.think_time(self.seed, np.arange(n), self.client_tasks) \
            if algo.self_dispatch else np.zeros(n)
        self.invited = self.has_data.copy() if algo.trigger == "period" else None
        self.schedule = CompassSchedule.empty(n) if algo.trigger == "group" else None
        self.acct = FLAccounting(n)

    # --- what the executor asks ------------------------------------------------------------------
    def busy(self) -> np.ndarray:
        """Bool ``[N]``: clients training, or (FedCompass) waiting in their arrival group."""
        busy = np.zeros(self.n, dtype=bool)
        busy[list(self.tasks)] = True
        if self.schedule is not None:
            busy |= self.schedule.group >= 0
        return busy

    def busy_among(self, ids: np.ndarray) -> np.ndarray:
        """Bool ``[B]``: which of ``ids`` are :meth:`busy` (without a mask of length N)."""
        busy = np.fromiter((i in self.tasks for i in ids.tolist()), dtype=bool, count=len(ids))
        if self.schedule is not None:
            busy |= self.schedule.group[ids] >= 0
        return busy

    def has_free_slot(self) -> bool:
        """Whether a client may start any time now (not a period rule, fewer than ``concurrency``)."""
        return self.algorithm.trigger != "period" and len(self.tasks) < self.concurrency

    def next_ready(self, t: float) -> float:
        """Earliest time after ``t`` at which an idle self-dispatching client ends its think time."""
        if not self.algorithm.self_dispatch:
            return math.inf
        times = self.ready_s[self.has_data & ~self.busy()]
        times = times[times > t]
        return float(times.min()) if len(times) else math.inf

    def boundary(self) -> float:
        """The end of the current period (period rules), else inf."""
        if self.algorithm.trigger != "period" or self.stopped:
            return math.inf
        return self.t0 + (self.periods + 1) * self.algorithm.delta_t_s

    def next_timer(self) -> float:
        """When :meth:`timer` is next due: a period end or an open group's latest arrival time."""
        return min(self.boundary(), self.group_timer())

    def start_params(self, task: Task) -> torch.Tensor:
        """The model ``[P]`` a task starts from (the current version of its model)."""
        return self.algorithm.model_params(self.state, task.model)

    # --- events ------------------------------------------------------------------------------------
    def dispatch(self, candidates: np.ndarray | None, t: float) -> list[Task]:
        """Clients ``candidates`` (ascending ids) ask for work at ``t``: start tasks for those the
        rule lets start, at most the free slots (a counter-based uniform choice when more ask).
        ``None``: every idle client of a registered population asks; the free slots go to a
        uniform draw of them, made by rejection without listing the population."""
        algo = self.algorithm
        if self.stopped:
            return []
        free = self.concurrency - len(self.tasks)
        if candidates is None:
            nodes = self._draw_idle(free) if free > 0 else np.zeros(0, dtype=np.int64)
        else:
            candidates = np.asarray(candidates, dtype=np.int64)
            ok = self.has_data[candidates] & ~self.busy_among(candidates)
            if self.invited is not None:
                ok &= self.invited[candidates]
            if algo.self_dispatch:
                ok &= self.ready_s[candidates] <= t
            nodes = candidates[ok]
        if free <= 0 or len(nodes) == 0:
            return []
        if len(nodes) > free:
            g = rng.generator(self.seed, rng.STREAM_ASYNC_FL, self.dispatches)
            nodes = np.sort(g.choice(nodes, size=free, replace=False))
        self.dispatches += 1
        counts = self.client_tasks[nodes]
        if self.schedule is not None:
            nodes, steps = self.compass_steps(nodes, t)
        else:
            chosen = algo.task_steps(self.seed, nodes, counts)
            steps = np.zeros(len(nodes), dtype=np.int64) if chosen is None else chosen
        self.acct.assigned(nodes, t)
        # one model: nothing to choose (and no pass over 1,000 tasks in flight per dispatch)
        active = [task.model for task in self.tasks.values()] if algo.num_models > 1 else []
        models = algo.pick_models(len(nodes), active)
        out = []
        for c, s, m in zip(nodes.tolist(), np.asarray(steps).tolist(), models, strict=True):
            task = Task(c, int(self.client_tasks[c]), int(s), algo.model_version(self.state, m), t, m,
                        self._deadline(c, t))
            self.client_tasks[c] += 1
            if self.invited is not None:
                self.invited[c] = False
            self.tasks[c] = task
            out.append(task)
        return out

    def arrival(self, client: int, t: float, message: torch.Tensor) -> Step:
        """``client``'s upload arrives at ``t``: staleness, acceptance, then the rule's trigger."""
        task = self._finish(client, t)
        self.acct.completed([client])
        if self.stopped:
            return Step()
        staleness = self.algorithm.model_version(self.state, task.model) - task.version
        entry = None
        if self.algorithm.accepts(staleness):
            self.acct.accepted(staleness)
            self.accepted += 1
            entry = Entry(task, message, staleness, t)
        else:
            self.acct.discard()
        if self.schedule is not None:
            return self.compass_arrival(task, entry, t)
        if entry is None:
            return Step()
        self.buffer.append(entry)
        due = self.algorithm.due(task.model)
        mine = [e for e in self.buffer if e.task.model == task.model]
        if due is not None and len(mine) == due:
            self.buffer = [e for e in self.buffer if e.task.model != task.model]
            return self._apply(mine)
        return Step()

    def lost(self, client: int, t: float) -> Step:
        """``client``'s task will not deliver (a lost message, a timeout, a rejected upload)."""
        self._finish(client, t)
        self.lost_tasks += 1
        if self.schedule is not None and not self.stopped:
            return self.compass_lost(client)
        return Step()

    def timer(self, t: float) -> Step:
        """Fire the first timer due at ``t``: a period end (every buffered update pulled by
        now, possibly none; the idle clients are invited) or a FedCompass group timer. FAVANO:
        progress that arrived before its own pull (a real client uploads as soon as it stops)
        waits for that period end; in the simulator a pulled task arrives at its pull, so this
        holds nothing back there."""
        if t >= self.boundary():
            entries = [e for e in self.buffer if e.task.deadline_s <= t or math.isinf(e.task.deadline_s)]
            self.buffer = [e for e in self.buffer if not (e.task.deadline_s <= t or math.isinf(e.task.deadline_s))]
            self.periods += 1
            self.invited = self.has_data & ~self.busy()
            return self._apply(entries)
        if self.schedule is not None and not self.stopped:
            return self.compass_timers(t)
        return Step()

    def restart(self, t: float) -> None:
        """The executor (re)starts its clock at ``t`` (the runtime, also after ``--resume``): tasks
        in flight and updates not yet applied are gone; periods and think times count from ``t``."""
        self.tasks, self.buffer, self.group_buffer = {}, [], {}
        if self.schedule is not None:
            self.schedule.group[:] = -1
            self.schedule.groups = {}
        self.t0, self.periods = t, 0
        if self.invited is not None:
            self.invited = self.has_data.copy()
        if self.algorithm.self_dispatch:
            self.ready_s = t + self.algorithm.think_time(self.seed, np.arange(self.n), self.client_tasks)

    def stop(self) -> None:
        """The run has its updates: later arrivals free their slots but change nothing."""
        self.stopped = True

    # --- internals -----------------------------------------------------------------------------------
    def _draw_idle(self, free: int) -> np.ndarray:
        """``min(free, idle)`` distinct idle clients of a registered population, ascending: ids
        drawn uniformly from the dispatch's counter-based generator, busy and repeated ones
        skipped, so each idle client is equally likely."""
        want = min(free, self.n - len(self.tasks))
        g = rng.generator(self.seed, rng.STREAM_ASYNC_FL, self.dispatches)
        chosen: dict[int, None] = {}
        while len(chosen) < want:
            for i in g.integers(0, self.n, 2 * (want - len(chosen)) + 8).tolist():
                if i not in self.tasks and i not in chosen:
                    chosen[i] = None
                    if len(chosen) == want:
                        break
        return np.sort(np.fromiter(chosen, dtype=np.int64, count=len(chosen)))

    def _finish(self, client: int, t: float) -> Task:
        task = self.tasks.pop(client)
        self.acct.finished([client], t)
        if self.algorithm.self_dispatch:        # the client thinks before its next task
            self.ready_s[client] = t + float(self.algorithm.think_time(
                self.seed, np.array([client]), self.client_tasks[[client]])[0])
        return task

    def _deadline(self, client: int, t: float) -> float:
        """FAVANO: the first later period end at which the server pulls ``client`` (inf otherwise)."""
        p = self.algorithm.pull_probability
        if p is None:
            return math.inf
        k = self.periods + 1
        while rng.uniform_scalar(self.seed, rng.STREAM_ASYNC_FL, client, k, 1) >= p:
            k += 1
        return self.t0 + k * self.algorithm.delta_t_s

    def _apply(self, entries: list[Entry]) -> Step:
        """One server update from ``entries`` (FedFix/FAVANO may apply none)."""
        algo, numel = self.algorithm, self.state.params.numel()
        messages = torch.stack([e.message for e in entries]) if entries else self.state.params.new_zeros((0, numel))
        clients = np.array([e.task.client for e in entries], dtype=np.int64)
        staleness = np.array([e.staleness for e in entries], dtype=np.int64)
        task_s = np.array([e.end_s - e.task.start_s for e in entries], dtype=np.float64)
        steps = np.array([e.task.steps for e in entries], dtype=np.int64)
        model = entries[0].task.model if entries else 0
        noise = None
        if self.private is not None:    # DP-FedBuff: the buffer's clipped updates, noise on their sum
            messages, noise = self.private.server(messages, clients, self.state.version + 1)
        self.state = algo.aggregate(self.state, messages, staleness, clients, self.sizes, lr=self.lr,
                                    task_s=task_s, steps=steps, model=model, noise=noise)
        self.last_staleness = float(staleness.mean()) if entries else None
        return Step(update=(clients, staleness))

    # --- checkpoints: tensors and plain values only ----------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        entries = self.buffer + [e for g in sorted(self.group_buffer) for e in self.group_buffer[g]]
        extra = {f.name: getattr(self.state, f.name) for f in dataclasses.fields(self.state)
                 if f.name not in ("params", "version")}
        tensors = lambda d: {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in d.items()}  # noqa: E731
        return {"params": self.state.params, "version": self.state.version, "server_extra": extra,
                "tasks": [dataclasses.astuple(x) for x in self.tasks.values()],
                "entries": [(dataclasses.astuple(e.task), e.staleness, e.end_s) for e in entries],
                "entry_groups": [-1] * len(self.buffer) + [g for g in sorted(self.group_buffer)
                                                            for _ in self.group_buffer[g]],
                "messages": torch.stack([e.message for e in entries]) if entries else torch.zeros(0, device="cpu"),
                "arrays": ({"client_tasks": self.client_tasks.state_dict()} if self.registered else
                           tensors({"client_tasks": self.client_tasks, "ready_s": np.asarray(self.ready_s),
                                    "invited": self.invited})),
                "schedule": None if self.schedule is None else tensors(self.schedule.state_dict()),
                "counters": [self.t0, self.dispatches, self.periods, self.accepted, self.lost_tasks,
                             self.last_staleness, self.stopped],
                "accounting": tensors(self.acct.state_dict()),
                "dp_ledger": None if self.private is None else self.private.ledger.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = dataclasses.replace(self.algorithm.init_state(state["params"]), params=state["params"],
                                         version=int(state["version"]), **state["server_extra"])
        self.tasks = {row[0]: Task(*row) for row in state["tasks"]}
        self.buffer, self.group_buffer = [], {}
        for (task, staleness, end_s), g, message in zip(state["entries"], state["entry_groups"],
                                                        state["messages"], strict=True):
            entry = Entry(Task(*task), message.clone(), staleness, end_s)
            (self.buffer if g < 0 else self.group_buffer.setdefault(g, [])).append(entry)
        if self.registered:
            self.client_tasks.load_state_dict(state["arrays"]["client_tasks"])
        else:
            arrays = {k: None if v is None else v.numpy().copy() for k, v in state["arrays"].items()}
            self.client_tasks, self.ready_s, self.invited = arrays["client_tasks"], arrays["ready_s"], arrays["invited"]
        if state["schedule"] is not None:
            self.schedule = CompassSchedule.from_state_dict(state["schedule"])
        t0, self.dispatches, self.periods, self.accepted, self.lost_tasks, self.last_staleness, self.stopped = \
            state["counters"]
        self.t0 = float(t0)
        self.acct.load_state_dict(state["accounting"])
        if self.private is not None and state.get("dp_ledger") is not None:
            self.private.ledger.load_state_dict(state["dp_ledger"])
