"""Gradient tracking sharded over ranks (docs/scale.md): :class:`ShardedSyncDLDriver`'s
rounds plus each node's tracker, as :class:`~gossamer.sim.drivers.gradient_tracking.
GradientTrackingDriver` keeps it in one process.

Each rank holds the corrections of the nodes it owns. After training, its nodes' directions
``y_i`` mix with the round's matrix exactly as the models then do: through a second pair of
shared rows where the ranks share a machine, else with the neighbours' directions sent point
to point before each step (the models' halo plan). Each mixed row sums the same terms in the
same order as one product over the population, so trackers and models are bit-identical for
any number of ranks; checkpoints hold every node's correction, gathered on rank 0.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from gossamer import wire
from gossamer.algorithms.dl.dpsgd import mix_into
from gossamer.algorithms.local import LocalObjective
from gossamer.protocols.sync_dl import check_gradient_tracking
from gossamer.sim.experiment import Experiment
from gossamer.sim.sharded.barrier import barrier
from gossamer.sim.sharded.base import Shard
from gossamer.sim.sharded.dl import ShardedSyncDLDriver
from gossamer.training.trainer import local_steps


class ShardedGradientTrackingDriver(ShardedSyncDLDriver):
    """Gradient tracking over the nodes of one rank (see the module)."""

    def __init__(self, exp: Experiment, shard: Shard) -> None:
        super().__init__(exp, shard)
        algo, numel = exp.algorithm, exp.spec.numel
        check_gradient_tracking(exp.trainer.sizes, self.gathered)
        self.correction = algo.init_correction(self.own, numel, self.params.dtype, self.device)
        self.message_bytes = wire.encoded_size(algo.message_vectors * numel)
        self.lr = exp.trainer.optimizer.lr
        self.steps_per_node = local_steps(exp.trainer.schedule, exp.trainer.sizes)[shard.lo:shard.hi]
        self._start: torch.Tensor | None = None            # own rows before training, then y
        self._trained = np.zeros(0, dtype=np.int64)        # positions among the own rows
        self._directions = self._shared_pair("the trackers' rows")   # one host: every node's y, twice

    def _local_objective(self, train_ids: np.ndarray) -> LocalObjective:
        if self._start is None:
            self._start = torch.empty_like(self.params)
        self._start.copy_(self.params)
        self._trained = train_ids - self.shard.lo
        rows = self.correction if len(train_ids) == self.own \
            else self.correction[torch.from_numpy(self._trained)]
        return self.exp.algorithm.local_objective(rows)

    def _mix(self, mixing) -> None:
        algo = self.exp.algorithm
        assert self._start is not None
        self._round_plan(mixing)                    # the directions mix as the models do
        steps = np.zeros(self.own, dtype=np.int64)
        steps[self._trained] = self.steps_per_node[self._trained]
        y = algo.directions(self._start, self.params, steps, self.lr, self.correction, out=self._start)
        if self.round_gossip_steps:
            algo.remove_directions(self.correction, y)
            algo.add_mixed(self.correction, self._mix_directions(y))
        super()._mix(mixing)

    def _mix_directions(self, y: torch.Tensor) -> torch.Tensor:
        """This rank's rows of ``W^Q y`` for the own rows ``y`` of every rank's directions."""
        lo, hi, steps = self.shard.lo, self.shard.hi, self.round_gossip_steps
        if self._directions is not None:           # as the models mix in shared memory
            rows, cur = self._directions, 0
            rows[0, lo:hi] = y
            for step in range(steps):
                barrier(self.shard, f"round {self.round + 1}'s tracker mixing step {step + 1}")
                mix_into(self.plan.mixing, rows[cur], rows[1 - cur, lo:hi])
                cur = 1 - cur
            return rows[cur, lo:hi]
        plan, a = self.plan, self.plan.below                # the models' halo plan
        src = self._halo_rows(plan)
        dst = torch.empty_like(src)
        src[a:a + self.own] = y
        for step in range(steps):
            self._fetch_halo(src, step)
            mix_into(plan.mixing, src, dst[a:a + self.own])
            src, dst = dst, src
        return src[a:a + self.own]

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["correction"] = self._on_primary(self.correction)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.correction = state["correction"][self.shard.lo:self.shard.hi].to(self.device, copy=True)


__all__ = ["ShardedGradientTrackingDriver"]
