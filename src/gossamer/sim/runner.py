"""The run loop: drive rounds, evaluate on cadence, record metrics, checkpoint, stop, resume."""

from __future__ import annotations

import os
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gossamer import devices
from gossamer.config import ExperimentConfig, dump
from gossamer.experiment import build_trackers
from gossamer.metrics.runstore import (
    MetricsWriter,
    atomic_write_text,
    checkpoint_exists,
    environment,
    load_checkpoint,
    save_checkpoint,
    write_json,
)
from gossamer.privacy.plan import calibrated
from gossamer.sim.allocator import tune_allocator
from gossamer.sim.drivers import Driver, driver_for
from gossamer.sim.experiment import Experiment, build_experiment

if TYPE_CHECKING:
    import torch

CHECKPOINT = "checkpoint.pt"


class Runner:
    """Owns a run directory and executes one experiment in the simulator."""

    def __init__(self, cfg: ExperimentConfig, run_dir: Path, *,
                 on_row: Callable[[dict[str, Any]], None] | None = None,
                 start_time: float | None = None) -> None:
        self.cfg, self.run_dir, self.on_row = cfg, Path(run_dir), on_row
        self.start_time = time.perf_counter() if start_time is None else start_time
        tune_allocator()
        self.exp: Experiment = build_experiment(cfg)
        self.shard = None                   # sharded over torch.distributed ranks (sim/sharded/)
        self.driver: Driver
        if sharded():
            from gossamer.sim.sharded import build_driver

            self.shard, self.driver = build_driver(self.exp)
        else:
            self.driver = driver_for(self.exp.algorithm.pattern)(self.exp)
        # only rank 0 of a sharded run writes the run directory; the others write their rows
        # to a folder of their own that is removed at the end
        self.primary = self.shard is None or self.shard.primary
        self._scratch = None if self.primary else tempfile.TemporaryDirectory(prefix="gossamer-rank-")
        out = self.run_dir if self.primary else Path(self._scratch.name)
        # rows are fsynced with each checkpoint and at the end (MetricsWriter.sync)
        self.metrics = MetricsWriter(out / "metrics.csv", self.driver.columns, durable=False)
        # every evaluated node's accuracy (DL): nodes.csv, beside metrics.csv, never in it
        self.node_metrics = MetricsWriter(out / "nodes.csv", ["round", "node", self.driver.node_metric],
                                          durable=False)
        self.stopped_by: str | None = None
        self.time_to_target: float | None = None
        self.rounds_to_target: int | None = None
        self.best_accuracy: float | None = None
        self.targets_reached: dict[str, dict[str, float | int]] = {}
        self.last_row: dict[str, Any] | None = None
        self.loop_time = 0.0
        # experiment trackers log rank 0's rows: the other ranks would log the run again
        self.trackers = build_trackers(cfg.output.trackers) if self.primary else []

    # --- files -------------------------------------------------------------------------------
    def prepare(self, resume: bool) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        ckpt = self.run_dir / "checkpoints" / CHECKPOINT
        if resume and checkpoint_exists(ckpt):
            state = load_checkpoint(ckpt)             # falls back to checkpoint.prev.pt if damaged
            self.driver.load_state_dict(state["driver"])
            for key in ("time_to_target", "rounds_to_target", "best_accuracy", "last_row"):
                setattr(self, key, state["runner"][key])
            self.targets_reached = dict(state["runner"].get("targets_reached", {}))
            self.loop_time = float(state["runner"]["loop_time"])
            if self.primary:
                self.metrics.load_existing(self.driver.round)
                if self.node_metrics.path.exists():
                    self.node_metrics.load_existing(self.driver.round)
            return
        if not self.primary:
            return
        if resume:                                   # interrupted before the first checkpoint
            self.metrics.load_existing(-1)
            self.metrics.rows.clear()
            (self.run_dir / "metrics.csv").unlink(missing_ok=True)
            self.node_metrics.path.unlink(missing_ok=True)
        atomic_write_text(self.run_dir / "config.yaml", dump(self.cfg))
        write_json(self.run_dir / "environment.json", environment(self.exp.device))

    def checkpoint(self) -> None:
        if not self.primary and not self.driver.collective_state:    # rank 0 saves
            return
        driver = self.driver.state_dict()    # sharded DL: every rank, to gather the rows
        if not self.primary:
            return
        state = {"driver": driver,
                 "runner": {"time_to_target": self.time_to_target,
                            "rounds_to_target": self.rounds_to_target,
            "time_to_targets": {str(g): self.targets_reached.get(str(g)) for g in self.cfg.eval.targets},
                            "best_accuracy": self.best_accuracy, "last_row": self.last_row,
                            "targets_reached": self.targets_reached,
                            "loop_time": self.loop_time}}
        self.metrics.sync()                          # the rows this checkpoint covers, first
        self.node_metrics.sync()
        save_checkpoint(self.run_dir / "checkpoints" / CHECKPOINT, state)

    # --- loop --------------------------------------------------------------------------------
    def _record(self, row: dict[str, Any]) -> None:
        nodes, self.driver.node_accuracy = self.driver.node_accuracy, None   # DL: every node
        if nodes is not None:
            metric = self.driver.node_metric
            self.node_metrics.append_many([{"round": row["round"], "node": int(i), metric: float(a)}
                                           for i, a in zip(*nodes, strict=True)])
        self.metrics.append(row)
        self.last_row = row
        for tracker in self.trackers:
            tracker.on_row(row)
        acc = row.get("test_accuracy")
        if acc is not None:
            self.best_accuracy = acc if self.best_accuracy is None else max(self.best_accuracy, acc)
            target = self.cfg.stop.target_accuracy
            if target is not None and acc >= target and self.time_to_target is None:
                self.time_to_target, self.rounds_to_target = row["sim_time_s"], row["round"]
            for goal in self.cfg.eval.targets:
                if acc >= goal and str(goal) not in self.targets_reached:
                    self.targets_reached[str(goal)] = {"time_s": row["sim_time_s"], "round": row["round"],
                                                       "bytes": row["bytes_up"] + row["bytes_down"]}
        if self.on_row is not None:
            self.on_row(row)

    def _should_stop(self) -> str | None:
        stop, d = self.cfg.stop, self.driver
        if stop.target_accuracy is not None and self.time_to_target is not None and stop.stop_at_target:
            return "target_accuracy"
        if stop.max_sim_time_s is not None and d.sim_time >= stop.max_sim_time_s:
            return "max_sim_time_s"
        if d.round >= stop.rounds:
            return "rounds"
        return None

    def run(self) -> dict[str, Any]:
        loop_start = time.perf_counter()
        d, every = self.driver, self.cfg.eval.every
        ckpt_every = self.cfg.output.checkpoint_every
        for tracker in self.trackers:
            tracker.on_start(self.run_dir, self.cfg.to_dict(), resumed=self.last_row is not None)
        if d.round == 0 and self.last_row is None:
            self._record(d.evaluate())
        kill_at = int(os.environ.get("GOSSAMER_TEST_KILL_AT_ROUND", "0"))
        faults = self.exp.faults
        while (reason := self._should_stop()) is None:
            if faults is not None:
                faults.round = d.round + 1           # stamps the transitions this round applies
            d.run_round()
            final = self._final_round()
            if d.round % every == 0 or final:
                self._record(d.evaluate())
            if ckpt_every and (d.round % ckpt_every == 0):
                self.loop_time += time.perf_counter() - loop_start
                loop_start = time.perf_counter()
                self.checkpoint()
            if kill_at and d.round == kill_at and _kill_rank(self.shard):   # tests: die like kill -9
                os.kill(os.getpid(), signal.SIGKILL)
        self.stopped_by = reason
        if self.last_row is None or self.last_row["round"] != d.round:
            self._record(d.evaluate())
        self.loop_time += time.perf_counter() - loop_start
        if ckpt_every:
            self.checkpoint()
        self.metrics.sync()
        self.node_metrics.sync()
        summary = self.summary()
        params = self.driver.global_params()       # on every rank: a sharded driver reduces
        if not self.primary:
            self._scratch.cleanup()
            return summary
        self.save_final_model(params)
        if faults is not None and faults.enabled and faults.records_transitions:
            atomic_write_text(self.run_dir / "faults.csv", faults.transitions_csv())
        for name, text in d.extra_files().items():     # e.g. contributions.csv
            atomic_write_text(self.run_dir / name, text)
        write_json(self.run_dir / "summary.json", summary)
        for tracker in self.trackers:
            tracker.on_end(summary)
        return summary

    def _final_round(self) -> bool:
        stop, d = self.cfg.stop, self.driver
        return d.round >= stop.rounds or (stop.max_sim_time_s is not None
                                          and d.sim_time >= stop.max_sim_time_s)

    def save_final_model(self, params: torch.Tensor | None) -> None:
        if self.exp.model is None:                 # grank: no model, its logs are in the checkpoint
            return
        self.exp.spec.load_into(self.exp.model, params)
        state = {k: v.detach().clone() for k, v in self.exp.model.state_dict().items()}
        save_checkpoint(self.run_dir / "model.pt", state, keep_previous=False)

    def summary(self) -> dict[str, Any]:
        d, row = self.driver, self.last_row or {}
        out = {
            "name": self.cfg.name,
            "algorithm": self.cfg.algorithm.name,
            "num_nodes": self.exp.num_nodes,
            "num_params": self.exp.spec.numel if self.exp.spec is not None else 0,
            "message_bytes": self.exp.message_bytes,
            "rounds": d.round,
            "stopped_by": self.stopped_by,
            "final_test_accuracy": row.get("test_accuracy"),
            "final_test_loss": row.get("test_loss"),
            "best_test_accuracy": self.best_accuracy,
            "target_accuracy": self.cfg.stop.target_accuracy,
            "time_to_target_s": self.time_to_target,
            "rounds_to_target": self.rounds_to_target,
            "time_to_targets": {str(g): self.targets_reached.get(str(g)) for g in self.cfg.eval.targets},
            "bytes_sent_total": d.bytes_up,
            "bytes_received_total": d.bytes_down,
            "sim_time_s": d.sim_time,
            "wall_time_s": time.perf_counter() - self.start_time,
            "loop_time_s": self.loop_time,
            "node_steps": d.node_steps,
            # how models ran (models/functional.py); grank runs none
            "forward": dict(self.exp.trainer.forward.path) if self.exp.trainer is not None else {},
            # dense layers some round trained as low-rank factors (model.dense; docs/models.md)
            **({"low_rank_layers": sorted(layers)}
               if (layers := getattr(self.exp.trainer, "low_rank_layers", None)) else {}),
            **{f"{k}": v for k, v in d.timers.items()},
        }
        faults, adv = self.exp.faults, self.exp.adversary
        if faults is not None and faults.enabled:
            out["faults_applied"] = _plain(faults.applied_events())
            if faults.records_transitions:          # every node down/up: counts here, rows in faults.csv
                out["fault_transitions"] = dict(faults.transition_counts(), file="faults.csv")
        if adv is not None and adv.enabled:
            out["byzantine_nodes"] = [int(i) for i in adv.byzantine.nonzero()[0]]
        if self.shard is not None:
            out["ranks"] = self.shard.world
        if d.steps_ledger is not None and "epsilon" in row:    # sample-level DP outside sync FL
            out.update(dp_epsilon=row["epsilon"], dp_delta=self.cfg.privacy.dp.delta)
        out.update(d.summary())
        out.update(calibrated(self.exp.cfg))            # privacy.dp.target_epsilon's noise
        return out


def sharded() -> bool:
    """Whether this process is one rank of a sharded run: torchrun started it
    (``WORLD_SIZE`` > 1) or ``gossamer run --ranks`` did (``GOSSAMER_SHARDED``, also for 1 rank,
    whose sums then run in the same order as with several)."""
    return os.environ.get("GOSSAMER_SHARDED") == "1" or int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def _kill_rank(shard: Any) -> bool:
    """Tests: whether this process is the one ``GOSSAMER_TEST_KILL_RANK`` names (any by default)."""
    wanted = os.environ.get("GOSSAMER_TEST_KILL_RANK")
    return wanted is None or (shard.rank if shard is not None else 0) == int(wanted)


def _plain(value: Any) -> Any:
    """JSON-ready copy: numpy scalars and arrays as Python numbers and lists."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def run_simulation(cfg: ExperimentConfig, run_dir: Path, *, resume: bool, progress: bool,
                   start_time: float | None = None) -> dict[str, Any]:
    """What ``gossamer run`` and ``gossamer.run`` do: build the experiment, record the run
    directory's mode once it builds, prepare (or resume), run with a progress bar; the summary."""
    from gossamer.metrics.progress import Progress
    from gossamer.metrics.rundir import record

    with devices.cuda_settings(devices.resolve(cfg.device), cfg.precision):
        runner = Runner(cfg, run_dir, start_time=start_time)
        bar = Progress(cfg.stop.rounds, enabled=progress and runner.primary)
        runner.on_row = bar.update
        if runner.primary:
            run_dir.mkdir(parents=True, exist_ok=True)
            record(run_dir, "simulator")
        runner.prepare(resume)
        bar.start(runner.driver.round)
        try:
            return runner.run()
        finally:
            bar.close()
