"""Streaming DiLoCo and CO2 on the simulated clock (protocols/islands.py decides).

Streaming DiLoCo: workers keep their models, one fragment is exchanged per round and merged
``overlap`` inner steps later. CO2 (``one_step_late``): the whole model's exchange flies during
the next round and steps the outer model at that round's end, from which every worker goes on."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from gossamer import wire
from gossamer.algorithms.fl.fedavg import ServerState
from gossamer.algorithms.local import LocalObjective
from gossamer.protocols.islands import (
    OVERLAP_KEY,
    delay,
    downlink,
    merged,
    model_parts,
    outer_apply,
    round_seconds,
    synced_fragment,
)
from gossamer.protocols.upload import upload_keys
from gossamer.sim.drivers.base import Driver
from gossamer.sim.experiment import Experiment
from gossamer.training.trainer import AdamW


class IslandsDriver(Driver):
    columns = Driver.columns + ["participants", "fragment", "exchange_bytes"]

    def __init__(self, exp: Experiment) -> None:
        super().__init__(exp)
        algo, cfg = exp.algorithm, exp.cfg
        self.algorithm = algo
        if cfg.local.steps is None or cfg.local.steps % algo.fragments:
            raise ValueError(f"{cfg.algorithm.name}: local.steps (H) must be set and divisible by "
                             f"fragments ({algo.fragments})")
        self.every = cfg.local.steps // algo.fragments             # inner steps per round
        self.late = delay(algo) == 1                               # CO2
        if not self.late and algo.overlap > self.every:
            raise ValueError(f"{cfg.algorithm.name}: overlap ({algo.overlap}) must be at most "
                             f"H / fragments ({self.every}) inner steps")
        if (exp.faults is not None and exp.faults.enabled) or exp.availability.model != "always" \
                or (exp.adversary is not None and exp.adversary.model_attack):
            raise ValueError(f"{cfg.algorithm.name}: every worker takes part in every exchange "
                             "here; faults, availability other than always and attacks are not "
                             "modelled for it yet")
        self.workers = np.flatnonzero(exp.trainer.sizes > 0)
        numel = exp.spec.numel
        self.state: ServerState = algo.init_state(exp.init_params.reshape(-1), exp.num_nodes)
        self.local = self.state.params.expand(len(self.workers), -1).clone()
        self.inner = torch.zeros(len(self.workers), AdamW.state_width(numel), device=self.device)
        self.parts = [p.to(self.device) for p in model_parts(algo, exp.spec, self.state.params)]
        self.weights = algo.mean_weights(exp.trainer.sizes[self.workers], self.local.dtype, self.device)
        self.pending: torch.Tensor | None = None      # the fragment's new global value, to merge
        self.in_flight: torch.Tensor | None = None    # CO2: the previous round's mean outer gradient
        self.pending_fragment = -1
        self.exchange_s = 0.0                           # the pending exchange's duration
        self.fragment = -1
        self.exchange_bytes = 0

    def _train(self, steps: int, key: int) -> np.ndarray:
        """``steps`` inner steps of every worker from its own model, in place; their samples."""
        if steps == 0:
            return np.zeros(len(self.workers))
        result = self.exp.trainer.train(self.local, self.workers, key, inplace=True,
                                        steps=np.full(len(self.workers), steps),
                                        objective=LocalObjective(optimizer_state=self.inner))
        self.node_steps += int(result.steps.sum())
        self.train_loss = float(result.loss.mean())
        return result.samples

    def _merge(self) -> None:
        if self.pending is None:
            return
        index, alpha = self.parts[self.pending_fragment], self.algorithm.alpha
        self.local[:, index] = merged(alpha, self.local[:, index], self.pending)
        self.pending = None

    def run_round(self) -> None:
        exp, algo, r = self.exp, self.algorithm, self.round + 1
        system = exp.system
        if self.late:
            with self.timer("train_s"):
                samples = self._train(self.every, r)
            # the outer step at the round's end needs the previous exchange
            self.sim_time += round_seconds(system.compute_s(self.workers, samples),
                                           np.zeros(len(self.workers)), self.exchange_s)
            with self.timer("communicate_s"):
                self._exchange(r)
            self.round = r
            return
        with self.timer("train_s"):
            # the previous exchange flies during the first `overlap` steps (their batches from
            # their own shuffle), then every worker merges it and takes the round's other steps
            first = np.zeros(len(self.workers))
            overlapped = algo.overlap if self.pending is not None else 0
            if overlapped:
                first = self._train(overlapped, r + OVERLAP_KEY)
                self._merge()
            rest = self._train(self.every - overlapped, r)
        before = system.compute_s(self.workers, first)
        after = system.compute_s(self.workers, rest)
        self.sim_time += round_seconds(before, after, self.exchange_s)
        with self.timer("communicate_s"):
            self._exchange(r)
        self.round = r

    def _exchange(self, r: int) -> None:
        """The workers' outer gradients of this round's fragment, averaged (decoded when
        compressed), re-encoded by the server, decoded by everyone; the outer step on it."""
        exp, algo = self.exp, self.algorithm
        p = synced_fragment(r, algo.fragments)
        index = self.parts[p]
        sent = self.local[:, index] - self.state.params[index]
        mean, up, down = self._average(sent, r)
        if self.late:                      # CO2: the previous round's mean steps the outer model
            if self.in_flight is not None:
                self.state = outer_apply(algo, self.state, self.parts, r - 1, self.in_flight)
            self.in_flight = mean
            self.local[:] = self.state.params
        else:
            self.state = outer_apply(algo, self.state, self.parts, r, mean)
            self.pending, self.pending_fragment = self.state.params[index].clone(), p
        system = exp.system
        self.exchange_s = float(system.upload_s(self.workers, up).max()
                                + system.download_s(self.workers, down).max())
        self.fragment, self.exchange_bytes = p, int(np.sum(up))
        self.bytes_up += self.exchange_bytes
        self.bytes_down += down * len(self.workers)
        if not self.late and algo.overlap == 0:    # nothing to overlap: merged before the next round
            self._merge()

    def _average(self, sent: torch.Tensor, r: int) -> tuple[torch.Tensor, np.ndarray, int]:
        """The workers' weighted mean of ``sent`` as everyone decodes it, each worker's upload
        bytes and the download bytes: compressed up, averaged, re-encoded down when
        ``compression.uplink`` is set."""
        exp = self.exp
        if exp.uplink is None:
            up = np.full(len(self.workers), wire.encoded_size(sent.shape[1]), dtype=np.int64)
            mean = self.weights @ sent
        else:
            enc = exp.uplink.compress(sent, seed=exp.cfg.seed, keys=upload_keys(self.workers, r))
            up = wire.HEADER_BYTES + enc.nbytes
            mean = self.weights @ exp.uplink.decompress(enc)
        mean, _, down = downlink(exp.uplink, mean, exp.cfg.seed, r)
        return mean, up, down

    def evaluate(self) -> dict[str, Any]:
        with self.timer("eval_s"):
            acc, loss = self.exp.evaluator.evaluate(self.state.params.reshape(1, -1))
        row = self.base_row()
        row.update(test_accuracy=float(acc[0]), test_loss=float(loss[0]),
                   participants=len(self.workers), fragment=self.fragment,
                   exchange_bytes=self.exchange_bytes)
        return row

    def global_params(self) -> torch.Tensor:
        return self.state.params

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(params=self.state.params, server_round=self.state.round,
                     server_extra=dict(self.state.extra), local=self.local.clone(),
                     inner=self.inner.clone(), pending=self.pending, in_flight=self.in_flight,
                     pending_fragment=self.pending_fragment, exchange_s=self.exchange_s,
                     fragment=self.fragment, exchange_bytes=self.exchange_bytes)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        dev = self.device                      # checkpoints load on the host
        self.state = ServerState(state["params"].to(dev), int(state["server_round"]),
                                 {k: v.to(dev) if isinstance(v, torch.Tensor) else v
                                  for k, v in state["server_extra"].items()})
        self.local, self.inner = state["local"].to(dev, copy=True), state["inner"].to(dev, copy=True)
        self.pending = None if state["pending"] is None else state["pending"].to(dev, copy=True)
        self.pending_fragment = int(state["pending_fragment"])
        self.in_flight = None if state.get("in_flight") is None else state["in_flight"].to(dev, copy=True)
        self.exchange_s = float(state["exchange_s"])
        self.fragment, self.exchange_bytes = int(state["fragment"]), int(state["exchange_bytes"])
