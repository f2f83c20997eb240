"""The asynchronous FL coordinator on real processes: the wall-clock executor of
``protocols/async_fl.py``, the state machine the simulator's ``async_fl`` driver runs.

- **Dispatch.** Clients pull; each ask goes to the protocol alone (first come, first served,
  where the simulator offers a dispatch point's clients together). The header carries the
  data-order key (the client's own task count) and the local steps (0: the ``local`` schedule),
  so a client computes what simulated node ``i`` computes. A client asking again while its task
  is in flight (it restarted) gets the same task.
- **Arrivals** go to the protocol with wall-clock times; its timers fire from the main thread.
  A task not delivered within ``runtime.round_timeout_s``, or with a rejected upload, is lost.
- **Rounds.** One round is one model update (``stop.rounds``); every ``eval.every`` updates a
  snapshot is evaluated (rows may skip versions); ``sim_time_s`` is wall seconds.
- **Checkpoints** hold the protocol state with every row; ``--resume`` drops tasks in flight and
  updates not yet applied (their uploads are refused; clients get fresh tasks).

- **Compressed uploads** (``compression.uplink``, feedback none, ef, ef21 or dgc): a client sends
  its message minus its base (the task's start model for FedAsync, else zero) encoded, keyed by
  (client, task key); the coordinator decodes it against the task it dispatched (EF21: with its
  copy of the client's estimate, checkpointed) and hands the protocol base plus the decoded
  difference, as the simulator's driver does. Undecodable bytes are a rejected upload.
- **Client-level DP** (``privacy.dp.level: client``, FedBuff): the protocol clips each update
  of a full buffer and adds the server's noise to their sum (``noise: server``), or the clients
  clip theirs and add their noise shares keyed by (client, task key), as in the simulator;
  epsilon in each row.

- **FAVANO.** A task's header says how long until the server pulls its progress
  (``pull_in_s``); the client trains the steps that fit before then (at least one, at most
  ``max_local_steps``, from its own measured step time) and uploads at once; the protocol holds
  progress that arrives before its pull until that period end.
"""

from __future__ import annotations

import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gossamer.config import ExperimentConfig
from gossamer.metrics.runstore import save_checkpoint
from gossamer.protocols.async_fl import AsyncFLProtocol, Step, Task
from gossamer.protocols.private import build_buffer_dp
from gossamer.protocols.upload import build_pipeline, message_base
from gossamer.runtime import schema
from gossamer.runtime.codec import KIND_ENCODED, WireError, read_counted_model
from gossamer.runtime.common import RunFailed, log
from gossamer.runtime.coordinator import BaseCoordinator
from gossamer.runtime.fl_checkpoint import read_checkpoint
from gossamer.runtime.guard import Refused

ASYNC_COLUMNS = ["round", "sim_time_s", "bytes_up", "bytes_down", "test_accuracy", "test_loss",
                 "updates", "mean_staleness", "in_flight", "accepted", "discarded", "lost_messages"]


class AsyncCoordinator(BaseCoordinator):
    """Serves the Coordinator gRPC service for an :class:`~gossamer.algorithms.fl.async_fl.AsyncFL` rule."""

    pattern = "async_fl"
    columns = ASYNC_COLUMNS

    def __init__(self, cfg: ExperimentConfig, run_dir: Path, *, resume: bool = False,
                 listen: str | None = None) -> None:
        self.frames: dict[tuple[int, int], list[bytes]] = {}    # (model, version) -> task frames
        self.starts: dict[tuple[int, int], torch.Tensor] = {}   # ... and that model (FedAsync's base)
        self.closing = False                               # stop.rounds updates applied
        self.running = False                               # clients get tasks once rounds begin
        self.started = 0.0
        self.idle_since: float | None = 0.0
        super().__init__(cfg, run_dir, resume=resume, listen=listen)

    def _init_pipeline(self) -> None:
        """Compressed uploads: the stage that decodes them, and each client's EF21 estimate;
        client-level DP (DP-FedBuff), which the protocol runs on each full buffer."""
        pipe = build_pipeline(self.exp.cfg, self.algorithm, self.numel, self.exp.uplink)
        self.compress, self.private = pipe.compress, build_buffer_dp(self.exp.cfg, pipe)
        self.estimates: dict[int, torch.Tensor] = {}
        if self.private is not None:
            self.columns = ASYNC_COLUMNS + ["epsilon"]

    def _init_state(self):
        self.protocol = AsyncFLProtocol(self.algorithm, self.exp.trainer.sizes, self.cfg.seed,
                                        float(self.cfg.local.lr), self.exp.init_params, private=self.private)
        return self.protocol.state

    # the protocol holds the server state; these read through to it
    state = property(lambda self: self.protocol.state, lambda self, v: setattr(self.protocol, "state", v))
    tasks = property(lambda self: self.protocol.tasks, lambda self, v: setattr(self.protocol, "tasks", v))
    buffer = property(lambda self: self.protocol.buffer)
    lost = property(lambda self: self.protocol.lost_tasks)
    acct = property(lambda self: self.protocol.acct)

    def clock(self) -> float:
        """Wall seconds since the run began (earlier runs included after a resume)."""
        return self.elapsed_before + time.monotonic() - self.started

    # --- GetTask: dispatch (the handler is the base class's) -----------------------------------
    def _task(self, node: int, last_round: int = 0) -> tuple[object, list[bytes]]:
        """A joined ``node``'s task (lock held): its task in flight again (it restarted), a new
        one if the protocol lets it start now, else WAIT."""
        if not self.closing and self.running:
            task = self.tasks.get(node)
            if task is None:
                t, idle = self.clock(), not self.tasks
                started = self.protocol.dispatch(np.array([node]), t)
                task = started[0] if started else None
                if task is not None and idle and self.idle_since is not None:
                    self.acct.server_idle(t - self.idle_since)
                    self.idle_since = None
            if task is not None:
                # FAVANO: the seconds until the pull (a pull already due: the least, one step)
                pull = max(task.deadline_s - self.clock(), 1e-3) if math.isfinite(task.deadline_s) else 0.0
                header = schema.TaskHeader(kind=schema.TaskHeader.TRAIN, round=task.key, steps=task.steps,
                                           pull_in_s=pull)
                return header, self._frames(task)
        return self._wait()

    def _frames(self, task: Task) -> list[bytes]:
        key = (task.model, task.version)
        if key not in self.frames:
            self.starts[key] = self.protocol.start_params(task)
            self.frames[key] = self._model_task_frames(self.starts[key], task.version)
        return self.frames[key]

    def _count_down(self, n: int, node: int) -> None:
        with self.lock:
            self.bytes_down += n
            self.acct.download([node], n)

    # --- PutUpdate and lost tasks: events for the protocol ----------------------------------------
    def _read_upload(self, chunks) -> tuple[object, torch.Tensor, int]:
        """A float32 row of the model's size, or (compressed) one flat row of encoded bytes."""
        if self.compress is None:
            return super()._read_upload(chunks)
        meta, tensor, size = read_counted_model(chunks, expected_numel=None, run_id=self.cfg.runtime.run_id,
                                                limits=self.limits, dtype=torch.uint8)
        if meta.kind != KIND_ENCODED or tensor.dim() != 1:
            raise WireError(f"upload kind {meta.kind}, shape {list(tensor.shape)} where one flat row "
                            "of encoded bytes is expected")
        if tensor.numel() > 8 * self.numel + 4096:
            raise WireError(f"encoded upload of {tensor.numel()} bytes is larger than the model")
        return meta, tensor, size

    def _decoded(self, node: int, task: Task, tensor: torch.Tensor) -> torch.Tensor:
        """The message of an encoded upload for ``task``: its base plus the decoded difference
        (EF21: the client's new estimate, kept); :class:`WireError` if the bytes do not decode."""
        comp = self.compress
        try:
            decoded, _ = comp.from_bytes(tensor.numpy().tobytes(), self.numel, 1, node, task.key,
                                         self.estimates.get(node, torch.zeros(self.numel)))
        except ValueError as exc:
            raise WireError(str(exc)) from None
        if comp.feedback == "ef21":
            self.estimates[node] = decoded
        return message_base(self.algorithm.uploads_model, self.starts[(task.model, task.version)]) + decoded

    def _accept(self, node: int, bound: int | None, meta: object, tensor: torch.Tensor,
                size: int) -> None:
        with self.lock:
            t = self.clock()
            task = self.tasks.get(node)
            if task is None or task.key != meta.round:
                raise Refused(f"update from {node} for task {meta.round} is not expected", bound,
                              strike=False)
            if self.compress is not None:
                try:
                    tensor = self._decoded(node, task, tensor)
                except WireError as exc:
                    raise Refused(str(exc), bound) from None
            self.bytes_up += size
            self.acct.upload([node], size)
            self.last_arrival = time.monotonic()
            self._after(self.protocol.arrival(node, t, tensor), t)

    def _client_failed(self, node: int) -> None:
        """A rejected upload ends ``node``'s task like a lost one (lock held)."""
        if node in self.tasks:
            self._after(self.protocol.lost(node, self.clock()), self.clock())

    def _after(self, step: Step, t: float) -> None:
        """Bookkeeping after an event (lock held): idle time, the stop rule, stale frames."""
        if not self.tasks and self.idle_since is None:
            self.idle_since = t
        if step.update is not None and self.state.version >= self.cfg.stop.rounds:
            self.closing = True
            self.protocol.stop()
        keep = {(x.model, x.version) for x in self.tasks.values()}
        keep |= {(m, self.algorithm.model_version(self.state, m)) for m in range(self.algorithm.num_models)}
        for key in [k for k in self.frames if k not in keep]:
            del self.frames[key], self.starts[key]
        self.lock.notify_all()

    def _timers(self, t: float) -> float:
        """Drop tasks past ``runtime.round_timeout_s``, fire the protocol's due timers (lock
        held); returns the next timer's time."""
        timeout = self.cfg.runtime.round_timeout_s
        for node in [c for c, task in self.tasks.items() if t - task.start_s > timeout]:
            log.warning("client %d: task %d not delivered in %.0f s; dropped", node, self.tasks[node].key, timeout)
            self._after(self.protocol.lost(node, t), t)
        while not self.closing and self.protocol.next_timer() <= t:
            step = self.protocol.timer(t)
            self._after(step, t)
            if step.update is None:
                break
        return min([self.protocol.next_timer()] + [task.start_s + timeout for task in self.tasks.values()])

    # --- the main thread: timers, evaluation, checkpoints, stop rules ---------------------------
    def _rounds(self, start: float) -> dict[str, Any]:
        self._wait_for_clients(start)
        self.started = time.monotonic()              # the clock starts once the clients have joined
        cfg = self.cfg
        with self.lock:
            self.idle_since = self.clock()
            self.protocol.restart(self.clock())
            first = self._snapshot() if self.state.version == 0 and not self.metrics.rows else None
            self.running = True
            self.lock.notify_all()
        if first is not None:
            self.metrics.append(self._row(first))
        every, stop = cfg.eval.every, cfg.stop
        stalled_after = cfg.runtime.join_timeout_s + cfg.runtime.round_timeout_s
        last_progress, last_version = time.monotonic(), self.state.version
        self.last_arrival = time.monotonic()
        stopped_by, reached = "rounds", {}
        while True:
            with self.lock:
                nxt = self._timers(self.clock())
                due = (self.state.version // every + 1) * every if self.state.version < stop.rounds else stop.rounds
                wait = min(max(0.0, nxt - self.clock()), 0.5)
                self.lock.wait_for(lambda due=due: self.state.version >= due, timeout=wait)
                self._timers(self.clock())
                if self.state.version != last_version:
                    last_progress, last_version = time.monotonic(), self.state.version
                if not self.closing and time.monotonic() - self.last_arrival > cfg.runtime.quorum_timeout_s:
                    raise RunFailed(f"no upload accepted for runtime.quorum_timeout_s "
                                    f"({cfg.runtime.quorum_timeout_s:g} s); {len(self.clients)} "
                                    f"clients joined, {len(self.tasks)} tasks in flight")
                if self.state.version < due:
                    if time.monotonic() - last_progress > stalled_after:
                        raise RunFailed(f"no model update for {stalled_after:g} s (runtime."
                                        "join_timeout_s + round_timeout_s)")
                    if stop.max_sim_time_s is None or self.clock() < stop.max_sim_time_s:
                        continue
                    stopped_by = "max_sim_time_s"
                snap = self._snapshot()
            row = self._row(snap)
            self.metrics.append(row)
            self._checkpoint_snapshot(snap)
            if os.environ.get("GOSSAMER_TEST_KILL_AT_ROUND") and int(os.environ["GOSSAMER_TEST_KILL_AT_ROUND"]) <= row["round"]:
                os.kill(os.getpid(), signal.SIGKILL)       # tests: die like kill -9
            acc = row["test_accuracy"]
            for goal in cfg.eval.targets + ([stop.target_accuracy] if stop.target_accuracy else []):
                if acc >= goal and str(goal) not in reached:
                    reached[str(goal)] = {"time_s": row["sim_time_s"], "round": row["round"],
                                          "bytes": row["bytes_up"] + row["bytes_down"]}
            if stopped_by != "rounds":
                break
            if (rule := self._stopped(row)) is not None:
                stopped_by = rule
                break
            if row["round"] >= stop.rounds:
                break
        return self._finish(stopped_by, start, reached)

    def _snapshot(self) -> dict[str, Any]:
        """A row without its evaluation, and the checkpoint, taken under the lock (the protocol's
        tensors are replaced on update, never changed in place)."""
        p, version = self.protocol, self.state.version
        return {"protocol": p.state_dict(), "params": self.state.params, "clients": sorted(self.clients.items()),
                "ef21": {str(k): v for k, v in self.estimates.items()},
                "row": {"round": version, "sim_time_s": self.clock(), "bytes_up": self.bytes_up,
                        "bytes_down": self.bytes_down, "updates": version, "mean_staleness": p.last_staleness,
                        "in_flight": len(self.tasks), "accepted": p.accepted, "discarded": self.acct.discarded,
                        "lost_messages": p.lost_tasks,
                        **({"epsilon": p.private.ledger.epsilon()} if p.private is not None else {})}}

    def _row(self, snap: dict[str, Any]) -> dict[str, Any]:
        acc, loss = self.exp.evaluator.evaluate(snap["params"].reshape(1, -1))
        return {**snap["row"], "test_accuracy": float(acc[0]), "test_loss": float(loss[0])}

    def _finish(self, stopped_by: str, start: float, reached: dict[str, Any]) -> dict[str, Any]:
        """``summary.json`` (the common fields, then the asynchronous ones) and ``model.pt``."""
        last, target = self.metrics.rows[-1], self.cfg.stop.target_accuracy
        hit = reached.get(str(target)) if target is not None else None
        with self.lock:
            acct = self.acct.summary()
        summary = self._summary(stopped_by, self.elapsed_before + time.monotonic() - start)
        summary.update(server_updates=int(last["round"]), target_accuracy=target,
                       time_to_target_s=hit["time_s"] if hit else None,
                       rounds_to_target=hit["round"] if hit else None,
                       time_to_targets={str(g): reached.get(str(g)) for g in self.cfg.eval.targets},
                       accepted_updates=self.protocol.accepted, lost_messages=self.lost,
                       concurrency=self.protocol.concurrency, **acct)
        if self.private is not None:
            summary.update(dp_epsilon=self.private.ledger.epsilon(), dp_delta=self.cfg.privacy.dp.delta)
        self._write(summary)
        return summary

    # --- checkpoints ----------------------------------------------------------------------------
    def _checkpoint_snapshot(self, snap: dict[str, Any]) -> None:
        row = snap["row"]
        save_checkpoint(self.run_dir / "checkpoints" / "server.pt", {
            "round": row["round"], "protocol": snap["protocol"], "elapsed": row["sim_time_s"],
            "bytes_up": row["bytes_up"], "bytes_down": row["bytes_down"],
            "clients": torch.tensor(snap["clients"], dtype=torch.int64).reshape(-1, 2),
            "ef21": snap.get("ef21", {})})

    def _restore(self) -> None:
        state = read_checkpoint(self)
        if state is None:
            return
        self.protocol.load_state_dict(state["protocol"])
        # clients are not restored: updates resume once they have joined again
        self.closing = self.state.version >= self.cfg.stop.rounds
        if self.closing:
            self.protocol.stop()
        self.metrics.load_existing(self.state.version)
        log.info("resumed after model update %d", self.state.version)

