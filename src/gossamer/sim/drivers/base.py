"""Shared driver state: the round counter, the simulated clock, byte counters, timers."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from gossamer import devices
from gossamer.sim.experiment import Experiment


class Driver:
    """Runs one algorithm pattern round by round; subclasses fill ``run_round``/``evaluate``."""

    columns: list[str] = ["round", "sim_time_s", "bytes_up", "bytes_down", "test_accuracy",
                          "test_loss", "train_loss"]
    node_metric = "test_accuracy"        # the nodes.csv column of node_accuracy (grank: ndcg)
    # state_dict and global_params are collectives that every rank of a sharded run must call
    collective_state = False

    def __init__(self, exp: Experiment) -> None:
        self.exp = exp
        self.device = exp.device                 # where the population lives (gossamer/devices.py)
        self.round = 0
        self.sim_time = 0.0
        self.bytes_up = 0
        self.bytes_down = 0
        # the last round's mean training loss; a tensor (on the run's device) until a row or a
        # checkpoint reads it, so a round needs no device-to-host read for it
        self.train_loss: float | torch.Tensor | None = None
        self.node_steps = 0                      # local SGD steps summed over nodes
        self.timers: dict[str, float] = {"train_s": 0.0, "communicate_s": 0.0, "eval_s": 0.0}
        # (node ids, accuracies) of the last evaluation, for drivers that measure every node
        # (DL); the runner writes them to nodes.csv and clears them
        self.node_accuracy: tuple[np.ndarray, np.ndarray] | None = None
        # sample-level DP-SGD outside synchronous FL (which keeps its own ledger): every node's
        # steps, recorded by the trainer, and epsilon in each metrics row (docs/privacy.md)
        self.steps_ledger = None
        if exp.algorithm.pattern != "sync_fl" and exp.trainer is not None:
            from gossamer.privacy import sample_ledger

            self.steps_ledger = sample_ledger(exp.cfg, exp.trainer.sizes)
            if self.steps_ledger is not None:
                exp.trainer.ledger = self.steps_ledger
                self.columns = self.columns + ["epsilon"]

    def _index(self, array: np.ndarray) -> torch.Tensor:
        """Host indices or a host mask as a tensor on the run's device (``index_select`` and
        ``index_copy_`` want their index beside the data)."""
        return devices.from_host(array, self.device)

    @contextmanager
    def timer(self, key: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timers[key] += time.perf_counter() - start

    def run_round(self) -> None:
        raise NotImplementedError

    def evaluate(self) -> dict[str, Any]:
        raise NotImplementedError

    def base_row(self) -> dict[str, Any]:
        row = {"round": self.round, "sim_time_s": self.sim_time, "bytes_up": self.bytes_up,
               "bytes_down": self.bytes_down, "train_loss": self._train_loss()}
        if self.steps_ledger is not None:        # a collective on ranks: every rank builds rows
            row["epsilon"] = self.steps_ledger.epsilon()
        return row

    def _train_loss(self) -> float | None:
        return float(self.train_loss) if isinstance(self.train_loss, torch.Tensor) else self.train_loss

    # --- checkpointing: tensors and plain values only, loaded with weights_only=True ---------
    def state_dict(self) -> dict[str, Any]:
        return {"round": self.round, "sim_time": self.sim_time, "bytes_up": self.bytes_up,
                "bytes_down": self.bytes_down, "train_loss": self._train_loss(),
                "node_steps": self.node_steps,
                "availability": _to_tensor(self.exp.availability.state_dict()),
                "faults": _to_tensor(self.exp.faults.state_dict()) if self.exp.faults is not None else None,
                "steps_ledger": self.steps_ledger.state_dict() if self.steps_ledger is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.round, self.sim_time = int(state["round"]), float(state["sim_time"])
        self.bytes_up, self.bytes_down = int(state["bytes_up"]), int(state["bytes_down"])
        self.train_loss = state["train_loss"]
        self.node_steps = int(state["node_steps"])
        self.exp.availability.load_state_dict(_to_numpy(state["availability"]))
        if self.exp.faults is not None and state.get("faults") is not None:
            self.exp.faults.load_state_dict(_to_numpy(state["faults"]))
        if self.steps_ledger is not None and state.get("steps_ledger") is not None:
            self.steps_ledger.load_state_dict(state["steps_ledger"])

    def summary(self) -> dict[str, Any]:
        return {}

    def extra_files(self) -> dict[str, str]:
        """Further files of the run (name -> text), written atomically when it ends."""
        return {}


def _to_tensor(v: Any) -> Any:
    """Numpy arrays (also inside dicts and lists) as tensors, so checkpoints load weights-only."""
    if isinstance(v, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(v))
    if isinstance(v, dict):
        return {k: _to_tensor(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(_to_tensor(x) for x in v)
    return v


def _to_numpy(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.cpu().numpy()
    if isinstance(v, dict):
        return {k: _to_numpy(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(_to_numpy(x) for x in v)
    return v
