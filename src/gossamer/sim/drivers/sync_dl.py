"""Synchronous decentralized rounds: every online node trains, then models are mixed.

The round's mixing is one sparse product ``X <- W X``; offline nodes keep their row and
their online neighbours fold the missing weight onto themselves. A round lasts as long
as the slowest online node's compute plus sending its model to each online neighbour.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from gossamer.sim.drivers.base import Driver
from gossamer.sim.experiment import Experiment
from gossamer.topology import renormalize_for_available, to_torch_sparse


class SyncDLDriver(Driver):
    columns = Driver.columns + ["acc_min", "acc_median", "acc_max", "avg_model_accuracy",
                                "avg_model_loss", "consensus_distance"]

    def __init__(self, exp: Experiment) -> None:
        super().__init__(exp)
        n = exp.num_nodes
        init = exp.init_params
        self.params = init.expand(n, -1).clone() if init.dim() == 1 else init.clone()
        self._spare: torch.Tensor | None = None      # mixing output buffer, reused every round
        self.degrees = exp.topology.degrees()
        self.has_data = exp.trainer.sizes > 0
        cfg = exp.cfg.eval
        if cfg.nodes is not None and cfg.nodes < n:
            from gossamer import rng
            pick = rng.generator(exp.cfg.seed, rng.STREAM_EVAL, 1).permutation(n)[: cfg.nodes]
            self.eval_nodes = np.sort(pick)
        else:
            self.eval_nodes = np.arange(n)

    def _mixing(self, online: np.ndarray) -> torch.Tensor:
        if online.all():
            return self.exp.mixing
        return to_torch_sparse(renormalize_for_available(self.exp.mixing_scipy, online))

    def _online_degrees(self, online: np.ndarray) -> np.ndarray:
        """Number of online neighbours of every online node (0 for offline nodes)."""
        if online.all():
            return self.degrees
        topo = self.exp.topology
        rows = np.repeat(np.arange(len(online)), np.diff(topo.indptr))
        counts = np.bincount(rows, weights=online[topo.indices], minlength=len(online))
        return counts.astype(np.int64) * online

    def run_round(self) -> None:
        exp, r = self.exp, self.round + 1
        online = exp.availability.at(self.sim_time)
        train_ids = np.flatnonzero(online & self.has_data)
        samples = np.zeros(exp.num_nodes)
        with self.timer("train_s"):
            if len(train_ids) == exp.num_nodes:      # everyone trains: update rows in place
                result = exp.trainer.train(self.params, train_ids, r, inplace=True)
            elif len(train_ids):
                rows = self.params[train_ids]
                result = exp.trainer.train(rows, train_ids, r, inplace=True)
                self.params[train_ids] = rows
            if len(train_ids):
                samples[train_ids] = result.samples
                self.node_steps += int(result.steps.sum())
                self.train_loss = float(result.loss.mean())
        with self.timer("communicate_s"):
            if self._spare is None:
                self._spare = torch.empty_like(self.params)
            mixed = exp.algorithm.mix(self._mixing(online), self.params, out=self._spare)
            if mixed is not self.params:                # the buffers swapped roles
                self._spare, self.params = self.params, mixed
        steps = exp.algorithm.gossip_steps
        degree = self._online_degrees(online)
        sent = int(degree.sum()) * steps * exp.message_bytes
        self.bytes_up += sent
        self.bytes_down += sent
        nodes = np.arange(exp.num_nodes)
        send_s = steps * (degree * exp.message_bytes / exp.system.bandwidth_up_Bps
                          + exp.system.latency_s)
        recv_s = steps * degree * exp.message_bytes / exp.system.bandwidth_down_Bps
        node_s = exp.system.compute_s(nodes, samples) + np.maximum(send_s, recv_s)
        self.sim_time += float(node_s[online].max()) if online.any() else 0.0
        if not online.any():
            self.sim_time = float(max(self.sim_time, exp.availability.next_switch.min()))
        self.round = r

    def evaluate(self) -> dict[str, Any]:
        row = self.base_row()
        with self.timer("eval_s"):
            acc, loss = self.exp.evaluator.evaluate(self.params[self.eval_nodes])
            mean = self.params.mean(0, keepdim=True)
            consensus = consensus_distance(self.params, mean)
            row.update(test_accuracy=float(acc.mean()), test_loss=float(loss.mean()),
                       acc_min=float(acc.min()), acc_median=float(acc.median()),
                       acc_max=float(acc.max()), consensus_distance=consensus)
            if self.exp.cfg.eval.average_model:
                avg_acc, avg_loss = self.exp.evaluator.evaluate(mean)
                row.update(avg_model_accuracy=float(avg_acc[0]), avg_model_loss=float(avg_loss[0]))
        return row

    def global_params(self) -> torch.Tensor:
        return self.params.mean(0)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["params"] = self.params
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.params = state["params"].clone()

    def summary(self) -> dict[str, Any]:
        return {"spectral_gap": self.exp.spectral_gap, "num_edges": int(len(self.exp.topology.edges))}


def consensus_distance(params: torch.Tensor, mean: torch.Tensor, chunk_bytes: int = 16 << 20) -> float:
    """(1/N) sum_i ||x_i - mean||^2, in row chunks so no population-sized temporary is made.

    Kong et al., "Consensus Control for Decentralized Deep Learning", ICML 2021.
    """
    rows = max(1, chunk_bytes // (params.shape[1] * params.element_size()))
    total = 0.0
    for start in range(0, params.shape[0], rows):
        diff = params[start:start + rows] - mean
        total += float(diff.square_().sum())
    return total / params.shape[0]
