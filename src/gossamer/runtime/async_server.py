"""The asynchronous FL coordinator on real processes: FedAsync, FedBuff, FedFix, FedCompass, AFA.

The same algorithm objects as the simulator's ``async_fl`` driver (``sim/drivers/async_fl.py``)
decide everything, on the wall clock instead of the simulated one:

- **Dispatch.** Clients pull. A client asking for work gets a task when fewer than
  ``concurrency`` tasks are in flight and its rule lets it start: FedFix hands the model
  only to the clients that were idle at the last period boundary, once per period; an
  anarchic client (AFA-CD/CS) starts once its think time after its previous upload has
  passed; FedCompass gives the step count from its scheduler (first come, first served,
  where the simulator serves a dispatch batch fastest first). The task header carries the
  data-order key (the client's own task count, as in the simulator, so a client computes
  what simulated node ``i`` computes for the same task) and the local steps (0: the
  ``local`` schedule).
- **Arrivals.** The client uploads the rule's ``client_message`` (the update, or AFA's
  average direction). Staleness is the model version at arrival minus the version the task
  started from; ``max_staleness`` drops staler updates. The server updates its model on
  each accepted arrival (FedAsync), a full buffer (FedBuff, AFA), each period end (FedFix,
  a timer), or when an arrival group completes or reaches its latest time (FedCompass,
  timers); the speed estimate of a FedCompass client is its measured wall seconds per step.
- **Lost tasks.** A task not delivered within ``runtime.round_timeout_s`` of its dispatch is
  dropped (its slot frees; a FedCompass client leaves its group), and a late upload is
  rejected. A client that asks again while its task is in flight (it restarted) is sent the
  same task again.
- **Rounds, metrics, stop.** One round is one model update, as in the simulator:
  ``stop.rounds`` counts updates. Every ``eval.every`` updates the main thread evaluates a
  snapshot and appends a row (``round`` = the snapshot's model version; rows may skip
  versions when updates are faster than evaluation); ``sim_time_s`` is wall seconds.
- **Checkpoints.** Taken with every row: the model and rule state (AFA-CS's memory), the
  version, per-client task counts, FedCompass speed estimates, accounting. Restarted with
  ``--resume`` the server continues from the last checkpoint: tasks in flight and updates
  received but not yet applied are dropped (their uploads are rejected as unknown and the
  clients get fresh tasks); rows after the checkpoint are dropped, so nothing is counted
  twice.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gossamer.algorithms.fl.async_fl import AsyncFL, AsyncServerState
from gossamer.algorithms.fl.fedcompass import CompassSchedule, FedCompass
from gossamer.config import ExperimentConfig
from gossamer.metrics.runstore import (
    checkpoint_exists,
    load_checkpoint,
    save_checkpoint,
    write_json,
)
from gossamer.protocols.accounting import FLAccounting
from gossamer.runtime import schema
from gossamer.runtime.codec import model_frames
from gossamer.runtime.common import RunFailed, log
from gossamer.runtime.fl_server import Coordinator
from gossamer.runtime.guard import Refused

ASYNC_COLUMNS = ["round", "sim_time_s", "bytes_up", "bytes_down", "test_accuracy", "test_loss",
                 "updates", "mean_staleness", "in_flight", "accepted", "discarded", "lost_messages"]


@dataclass
class LiveTask:
    """A task in flight: its data-order key, start version, dispatch time and assigned steps."""

    key: int
    version: int
    dispatch_s: float
    steps: int


Entry = tuple[int, torch.Tensor, int]          # (client, uploaded message, staleness)


class AsyncCoordinator(Coordinator):
    """Serves the Coordinator gRPC service for an :class:`~gossamer.algorithms.fl.async_fl.AsyncFL` rule."""

    pattern = "async_fl"
    columns = ASYNC_COLUMNS

    def __init__(self, cfg: ExperimentConfig, run_dir: Path, *, resume: bool = False,
                 listen: str | None = None) -> None:
        self.tasks: dict[int, LiveTask] = {}
        self.frames: dict[int, list[bytes]] = {}          # model version -> serialized task frames
        self.buffer: list[Entry] = []
        self.group_buffer: dict[int, list[Entry]] = {}
        self.invited: set[int] = set()                    # FedFix: idle at the last boundary
        self.boundary = math.inf
        self.accepted = self.lost = 0
        self.last_staleness: float | None = None
        self.closing = False                               # stop.rounds updates applied
        self.running = False                               # clients get tasks once rounds begin
        self.started = 0.0
        self.idle_since: float | None = 0.0
        super().__init__(cfg, run_dir, resume=resume, listen=listen)
        n = self.exp.num_nodes
        algo: AsyncFL = self.algorithm
        self.concurrency = algo.concurrency if algo.concurrency is not None else n
        self.sizes = self.exp.trainer.sizes
        self.lr = float(cfg.local.lr)
        self.acct = FLAccounting(n)
        self.client_tasks = np.zeros(n, dtype=np.int64)
        self.compass: FedCompass | None = algo if algo.trigger == "group" else None
        self.schedule = CompassSchedule.empty(n) if self.compass is not None else None
        self.ready_s = np.zeros(n)
        if getattr(self, "_restore_pending", False):
            self._restore()

    def _init_state(self) -> AsyncServerState:
        return self.algorithm.init_state(self.exp.init_params.reshape(-1))

    def clock(self) -> float:
        """Wall seconds since the run began (earlier runs included after a resume)."""
        return self.elapsed_before + time.monotonic() - self.started

    # --- GetTask: dispatch (the handler is the base class's) -----------------------------------
    def _task(self, node: int) -> tuple[object, list[bytes]]:
        """A joined ``node``'s task (lock held): its task in flight again (it restarted), a new
        one if its rule lets it start now, else WAIT."""
        if not self.closing and self.running:
            task = self.tasks.get(node)
            if task is None:
                task = self._dispatch(node)
            if task is not None:
                return self._train_header(task), self.frames[task.version]
        return self._wait()

    def _count_down(self, n: int, node: int) -> None:
        with self.lock:
            self.bytes_down += n
            self.acct.download([node], n)

    @staticmethod
    def _train_header(task: LiveTask):
        return schema.TaskHeader(kind=schema.TaskHeader.TRAIN, round=task.key, steps=task.steps)

    def _dispatch(self, node: int) -> LiveTask | None:
        """Start a task for idle ``node`` if its rule allows it now (lock held)."""
        algo, t = self.algorithm, self.clock()
        if len(self.tasks) >= self.concurrency or self.sizes[node] == 0:
            return None
        if self.schedule is not None and self.schedule.group[node] >= 0:
            return None                                    # waits in its arrival group
        if algo.trigger == "period":
            if node not in self.invited:
                return None
            self.invited.discard(node)
        if algo.self_dispatch and self.ready_s[node] > t:
            return None
        count = self.client_tasks[[node]]
        if self.compass is not None:
            speed = float(self.schedule.speed[node])
            steps = self.compass.max_local_steps if math.isnan(speed) else self.compass.assign(self.schedule, node, t)
        else:
            chosen = algo.task_steps(self.cfg.seed, np.array([node]), count)
            steps = 0 if chosen is None else int(chosen[0])
        task = LiveTask(int(count[0]), self.state.version, t, int(steps))
        self.client_tasks[node] += 1
        if task.version not in self.frames:
            self.frames[task.version] = [schema.TaskFrame(model=f).SerializeToString() for f in model_frames(
                self.state.params, round=task.version, run_id=self.cfg.runtime.run_id,
                chunk_bytes=self.limits.chunk_bytes)]
        if not self.tasks and self.idle_since is not None:
            self.acct.server_idle(t - self.idle_since)
            self.idle_since = None
        self.tasks[node] = task
        self.acct.assigned(np.array([node]), t)
        return task

    # --- PutUpdate: arrivals (the handler is the base class's) ---------------------------------
    def _accept(self, node: int, bound: int | None, meta: object, tensor: torch.Tensor,
                size: int) -> None:
        with self.lock:
            t = self.clock()
            task = self.tasks.get(node)
            if task is None or task.key != meta.round:
                raise Refused(f"update from {node} for task {meta.round} is not expected", bound,
                              strike=False)
            self._finish(node, t)
            self.bytes_up += size
            self.acct.upload([node], size)
            self.acct.completed([node])
            self.last_arrival = time.monotonic()
            if self.closing:                               # the run has its updates: not applied
                return
            staleness = self.state.version - task.version
            entry: Entry | None = None
            if self.algorithm.accepts(staleness):
                self.acct.accepted(staleness)
                self.accepted += 1
                entry = (node, tensor, staleness)
            else:
                self.acct.discard()
            entries = self._arrival(node, task, entry, t)
            if entries is not None:
                self._apply(entries)

    def _client_failed(self, node: int) -> None:
        """A rejected upload ends ``node``'s task like a lost one (lock held)."""
        if node in self.tasks:
            self._drop_task(node, self.clock())

    def _finish(self, node: int, t: float) -> None:
        """``node``'s task ends (delivered or dropped): free its slot (lock held)."""
        del self.tasks[node]
        self.acct.finished(np.array([node]), t)
        if self.algorithm.self_dispatch:
            self.ready_s[node] = t + float(self.algorithm.think_time(
                self.cfg.seed, np.array([node]), self.client_tasks[[node]])[0])
        if not self.tasks:
            self.idle_since = t
        self._gc_frames()

    def _gc_frames(self) -> None:
        keep = {task.version for task in self.tasks.values()}
        for v in [v for v in self.frames if v not in keep and v != self.state.version]:
            del self.frames[v]

    def _arrival(self, node: int, task: LiveTask, entry: Entry | None, t: float) -> list[Entry] | None:
        """What the rule does with a delivered task: the updates to apply now, or None."""
        algo = self.algorithm
        if self.schedule is not None:
            return self._compass_arrival(node, task, entry, t)
        if entry is None:
            return None
        self.buffer.append(entry)
        due = 1 if algo.trigger == "arrival" else getattr(algo, "buffer_size", None)
        if len(self.buffer) == due:
            entries, self.buffer = self.buffer, []
            return entries
        return None

    def _compass_arrival(self, node: int, task: LiveTask, entry: Entry | None, t: float) -> list[Entry] | None:
        sched = self.schedule
        sched.speed[node] = self.compass.update_speed(float(sched.speed[node]), (t - task.dispatch_s) / task.steps)
        g = int(sched.group[node])
        if g < 0:                                          # first task: applied alone
            return [entry] if entry is not None else None
        group = sched.groups[g]
        if not group.open or t >= group.latest_s:          # late: general buffer
            sched.leave(node)
            if entry is not None:
                self.buffer.append(entry)
            return None
        group.members.remove(node)
        group.arrived.append(node)
        if entry is not None:
            self.group_buffer.setdefault(g, []).append(entry)
        return self._close_group(g) if not group.members else None

    def _close_group(self, g: int) -> list[Entry] | None:
        self.schedule.release(g)
        entries, self.buffer = self.buffer + self.group_buffer.pop(g, []), []
        return entries or None

    def _apply(self, entries: list[Entry]) -> None:
        """One model update from ``entries`` (lock held; FedFix may apply none)."""
        if entries:
            messages = torch.stack([m for _, m, _ in entries])
        else:
            messages = self.state.params.new_zeros((0, self.numel))
        clients = np.array([c for c, _, _ in entries], dtype=np.int64)
        staleness = np.array([s for _, _, s in entries], dtype=np.int64)
        self.state = self.algorithm.aggregate(self.state, messages, staleness, clients, self.sizes, lr=self.lr)
        self.last_staleness = float(staleness.mean()) if entries else None
        if self.state.version >= self.cfg.stop.rounds:
            self.closing = True
        self._gc_frames()
        self.lock.notify_all()

    # --- timers: FedFix periods, FedCompass groups, lost tasks ---------------------------------
    def _timers(self, t: float) -> float:
        """Fire what is due at ``t`` (lock held); returns the next timer's time."""
        algo = self.algorithm
        timeout = self.cfg.runtime.round_timeout_s
        for node in [c for c, task in self.tasks.items() if t - task.dispatch_s > timeout]:
            log.warning("client %d: task %d not delivered in %.0f s; dropped", node, self.tasks[node].key, timeout)
            self._drop_task(node, t)
        nxt = min((task.dispatch_s + timeout for task in self.tasks.values()), default=math.inf)
        if algo.trigger == "period" and not self.closing:
            while t >= self.boundary and not self.closing:
                entries, self.buffer = self.buffer, []
                self._apply(entries)
                self.invited = {c for c in self.clients if c not in self.tasks}
                self.boundary += algo.delta_t_s
            nxt = min(nxt, self.boundary)
        if self.schedule is not None and not self.closing:
            for g in sorted(self.schedule.groups):
                group = self.schedule.groups.get(g)
                if group is None or not group.open or group.latest_s > t:
                    continue
                if group.arrived:
                    if (entries := self._close_group(g)) is not None:
                        self._apply(entries)
                else:
                    group.open = False
            nxt = min([nxt] + [g.latest_s for g in self.schedule.groups.values() if g.open])
        return nxt

    def _drop_task(self, node: int, t: float) -> None:
        """``node``'s task is lost (not delivered in time, or its upload was rejected)."""
        self.lost += 1
        self._finish(node, t)
        if self.schedule is not None:
            g = self.schedule.leave(node)
            group = self.schedule.groups.get(g)
            if group is not None and group.open and not group.members and not self.closing:
                if (entries := self._close_group(g)) is not None:
                    self._apply(entries)

    # --- the main thread: timers, evaluation, checkpoints, stop rules ---------------------------
    def _rounds(self, start: float) -> dict[str, Any]:
        self._wait_for_clients(start)
        self.started = time.monotonic()              # the clock starts once the clients have joined
        cfg, algo = self.cfg, self.algorithm
        with self.lock:
            t = self.clock()
            self.idle_since = t
            if algo.self_dispatch:
                self.ready_s = t + algo.think_time(cfg.seed, np.arange(self.exp.num_nodes), self.client_tasks)
            if algo.trigger == "period":
                self.invited = set(self.clients)
                self.boundary = t + algo.delta_t_s
            first = self._snapshot() if self.state.version == 0 and not self.metrics.rows else None
            self.running = True
            self.lock.notify_all()
        if first is not None:
            self.metrics.append(self._row(first))
        every, stop = cfg.eval.every, cfg.stop
        stalled_after = cfg.runtime.join_timeout_s + cfg.runtime.round_timeout_s
        last_progress, last_version = time.monotonic(), self.state.version
        self.last_arrival = time.monotonic()
        stopped_by, best, reached = "rounds", None, {}
        while True:
            with self.lock:
                nxt = self._timers(self.clock())
                due = (self.state.version // every + 1) * every if self.state.version < stop.rounds else stop.rounds
                wait = min(max(0.0, nxt - self.clock()), 0.5)
                self.lock.wait_for(lambda due=due: self.state.version >= due, timeout=wait)
                self._timers(self.clock())
                if self.state.version != last_version:
                    last_progress, last_version = time.monotonic(), self.state.version
                silent = time.monotonic() - self.last_arrival
                if not self.closing and silent > cfg.runtime.quorum_timeout_s:
                    raise RunFailed(f"no upload accepted for runtime.quorum_timeout_s "
                                    f"({cfg.runtime.quorum_timeout_s:g} s); {len(self.clients)} "
                                    f"clients joined, {len(self.tasks)} tasks in flight")
                if self.state.version < due:
                    if time.monotonic() - last_progress > stalled_after:
                        raise RunFailed(f"no model update for {stalled_after:g} s (runtime."
                                        "join_timeout_s + round_timeout_s)")
                    elif stop.max_sim_time_s is None or self.clock() < stop.max_sim_time_s:
                        continue
                    else:
                        stopped_by = "max_sim_time_s"
                snap = self._snapshot()
            row = self._row(snap)
            self.metrics.append(row)
            self._checkpoint_snapshot(snap)
            if os.environ.get("GOSSAMER_TEST_KILL_AT_ROUND") and int(os.environ["GOSSAMER_TEST_KILL_AT_ROUND"]) <= row["round"]:
                os.kill(os.getpid(), signal.SIGKILL)       # tests: die like kill -9
            acc = row["test_accuracy"]
            best = acc if best is None else max(best, acc)
            for goal in cfg.eval.targets + ([stop.target_accuracy] if stop.target_accuracy else []):
                if acc >= goal and str(goal) not in reached:
                    reached[str(goal)] = {"time_s": row["sim_time_s"], "round": row["round"],
                                          "bytes": row["bytes_up"] + row["bytes_down"]}
            if stopped_by != "rounds":
                break
            if stop.target_accuracy is not None and acc >= stop.target_accuracy and stop.stop_at_target:
                stopped_by = "target_accuracy"
                break
            if stop.max_sim_time_s is not None and row["sim_time_s"] >= stop.max_sim_time_s:
                stopped_by = "max_sim_time_s"
                break
            if row["round"] >= stop.rounds:
                break
        return self._summary(stopped_by, start, reached)

    def _snapshot(self) -> dict[str, Any]:
        """Everything a row and a checkpoint need, copied under the lock."""
        extra = {f.name: getattr(self.state, f.name) for f in dataclasses.fields(self.state)
                 if f.name not in ("params", "version")}
        return {"params": self.state.params.clone(), "version": self.state.version,
                "extra": {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in extra.items()},
                "time": self.clock(), "bytes_up": self.bytes_up, "bytes_down": self.bytes_down,
                "mean_staleness": self.last_staleness, "in_flight": len(self.tasks),
                "accepted": self.accepted, "discarded": self.acct.discarded, "lost": self.lost,
                "client_tasks": self.client_tasks.copy(), "accounting": self.acct.state_dict(),
                "speed": self.schedule.speed.copy() if self.schedule is not None else None,
                "clients": sorted(self.clients.items())}

    def _row(self, snap: dict[str, Any]) -> dict[str, Any]:
        acc, loss = self.exp.evaluator.evaluate(snap["params"].reshape(1, -1))
        return {"round": snap["version"], "sim_time_s": snap["time"], "bytes_up": snap["bytes_up"],
                "bytes_down": snap["bytes_down"], "test_accuracy": float(acc[0]), "test_loss": float(loss[0]),
                "updates": snap["version"], "mean_staleness": snap["mean_staleness"],
                "in_flight": snap["in_flight"], "accepted": snap["accepted"],
                "discarded": snap["discarded"], "lost_messages": snap["lost"]}

    def _summary(self, stopped_by: str, start: float, reached: dict[str, Any]) -> dict[str, Any]:
        last, stop = self.metrics.rows[-1], self.cfg.stop
        target = stop.target_accuracy
        hit = reached.get(str(target)) if target is not None else None
        with self.lock:
            acct = self.acct.summary()
        summary = {"name": self.cfg.name, "algorithm": self.cfg.algorithm.name, "executor": "runtime",
                   "num_nodes": self.exp.num_nodes, "num_params": self.numel,
                   "rounds": int(last["round"]), "server_updates": int(last["round"]),
                   "stopped_by": stopped_by, "final_test_accuracy": float(last["test_accuracy"]),
                   "target_accuracy": target, "time_to_target_s": hit["time_s"] if hit else None,
                   "rounds_to_target": hit["round"] if hit else None,
                   "time_to_targets": {str(g): reached.get(str(g)) for g in self.cfg.eval.targets},
                   "bytes_sent_total": self.bytes_up, "bytes_received_total": self.bytes_down,  # as the simulator
                   "bytes_up_total": self.bytes_up, "bytes_down_total": self.bytes_down,
                   "sim_time_s": float(last["sim_time_s"]),
                   "wall_time_s": self.elapsed_before + time.monotonic() - start,
                   "accepted_updates": self.accepted, "lost_messages": self.lost,
                   "concurrency": self.concurrency, "rejected_messages": self.rejected, **acct}
        write_json(self.run_dir / "summary.json", summary)
        save_checkpoint(self.run_dir / "model.pt", {"params": self.state.params}, keep_previous=False)
        return summary

    # --- checkpoints ----------------------------------------------------------------------------
    def _checkpoint(self, start: float) -> None:                # the synchronous hook; unused here
        self._checkpoint_snapshot(self._snapshot())

    def _checkpoint_snapshot(self, snap: dict[str, Any]) -> None:
        save_checkpoint(self.run_dir / "checkpoints" / "server.pt", {
            "round": snap["version"], "params": snap["params"], "extra": snap["extra"],
            "bytes_up": snap["bytes_up"], "bytes_down": snap["bytes_down"],
            "clients": torch.tensor(snap["clients"], dtype=torch.int64).reshape(-1, 2),
            "elapsed": snap["time"], "accepted": snap["accepted"], "lost": snap["lost"],
            "client_tasks": torch.from_numpy(snap["client_tasks"]),
            "speed": None if snap["speed"] is None else torch.from_numpy(snap["speed"]),
            "accounting": {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v
                           for k, v in snap["accounting"].items()}})

    def _restore(self) -> None:
        if not hasattr(self, "acct"):                  # from Coordinator.__init__: once our fields exist
            self._restore_pending = True
            return
        path = self.run_dir / "checkpoints" / "server.pt"
        if not checkpoint_exists(path):
            self.metrics.load_existing(-1)
            return
        state = load_checkpoint(path)
        self.state = dataclasses.replace(self._init_state(), params=state["params"],
                                         version=int(state["round"]), **dict(state["extra"]))
        self.bytes_up, self.bytes_down = int(state["bytes_up"]), int(state["bytes_down"])
        self.elapsed_before = float(state["elapsed"])
        # clients are not restored: updates resume once they have joined again
        self.accepted, self.lost = int(state["accepted"]), int(state["lost"])
        self.client_tasks = state["client_tasks"].numpy().copy()
        if state["speed"] is not None and self.schedule is not None:
            self.schedule.speed = state["speed"].numpy().copy()
        self.acct.load_state_dict(state["accounting"])
        self.closing = self.state.version >= self.cfg.stop.rounds
        self.metrics.load_existing(self.state.version)
        log.info("resumed after model update %d", self.state.version)
