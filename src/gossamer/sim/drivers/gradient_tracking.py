"""Synchronous decentralized rounds with gradient tracking (see
:mod:`gossamer.algorithms.dl.gradient_tracking`).

A D-PSGD round (:class:`SyncDLDriver`: online nodes train, the round's mixing matrix mixes)
plus a tracker per node: local steps are corrected by ``c_i``; after training each node's
direction ``y_i = (x_i - z_i) / (K_i lr)`` is mixed with the same matrix and ``c_i <- c_i - y_i
+ (W^Q y)_i``. A message carries the model and ``y_i``, so it counts as 2 vectors. The
corrections ``[N, P]`` are in checkpoints. With mixing matrices that are doubly stochastic
(static or dynamic graphs, offline nodes) ``sum_i c_i`` stays 0, which makes the fixed point
exact; lost messages make a round's matrix only row-stochastic, and then it drifts.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from gossamer import wire
from gossamer.algorithms.local import LocalObjective
from gossamer.protocols.sync_dl import check_gradient_tracking
from gossamer.sim.drivers.sync_dl import SyncDLDriver
from gossamer.sim.experiment import Experiment
from gossamer.topology import to_torch_sparse
from gossamer.training.trainer import local_steps


class GradientTrackingDriver(SyncDLDriver):
    """Runs :class:`~gossamer.algorithms.dl.gradient_tracking.GradientTracking`."""

    def __init__(self, exp: Experiment) -> None:
        super().__init__(exp)
        algo = exp.algorithm
        check_gradient_tracking(exp.trainer.sizes, self.gathered)
        self.correction = algo.init_correction(exp.num_nodes, exp.spec.numel, self.params.dtype, self.device)
        self.message_bytes = wire.encoded_size(algo.message_vectors * exp.spec.numel)
        self.lr = exp.trainer.optimizer.lr
        self.steps_per_node = local_steps(exp.trainer.schedule, exp.trainer.sizes)
        self._start: torch.Tensor | None = None           # rows before training, then y
        self._trained = np.zeros(0, dtype=np.int64)

    def _local_objective(self, train_ids: np.ndarray) -> LocalObjective:
        if self._start is None:
            self._start = torch.empty_like(self.params)
        self._start.copy_(self.params)
        self._trained = train_ids
        rows = self.correction if len(train_ids) == self.exp.num_nodes \
            else self.correction[torch.from_numpy(train_ids)]
        return self.exp.algorithm.local_objective(rows)

    def _mix(self, mixing) -> None:
        algo, n = self.exp.algorithm, self.exp.num_nodes
        assert self._start is not None
        steps = np.zeros(n, dtype=np.int64)
        steps[self._trained] = self.steps_per_node[self._trained]
        y = algo.directions(self._start, self.params, steps, self.lr, self.correction, out=self._start)
        if self.round_gossip_steps:
            if self._spare is None:
                self._spare = torch.empty_like(self.params)
            w = self.mixing if mixing is None else to_torch_sparse(mixing)
            algo.remove_directions(self.correction, y)
            mixed = algo.mix(w, y, out=self._spare, steps=self.round_gossip_steps)
            algo.add_mixed(self.correction, mixed)
        super()._mix(mixing)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["correction"] = self.correction
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.correction = state["correction"].to(self.device, copy=True)   # loaded on the host
