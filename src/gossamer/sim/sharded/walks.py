"""MoDeST and random walks sharded over ranks (docs/scale.md).

Neither pattern's schedule depends on model values: MoDeST's trainers and aggregators are
ranked from counters and its arrival times come from profiles and sample counts; a random
walk's next hop comes from the visit counts and a counter-based uniform. So every rank runs
the whole protocol and holds every model that moves (MoDeST's aggregates, the walks' tokens),
and only training is split: the round's trainers (MoDeST) or the tokens' visits (random walks)
train on the rank that owns their node, and :class:`~.owned.OwnedTraining` gives every rank all
trained rows with their samples, steps and losses in the call's order. Every rank then
aggregates or moves them alike, so the run equals one process's with the same batch shapes
(``trainer.batch_width = "population"``); random walks also split the tokens' evaluation.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from gossamer.sim.drivers.modest import ModestDriver
from gossamer.sim.drivers.random_walk import RandomWalkDriver
from gossamer.sim.experiment import Experiment
from gossamer.sim.sharded.base import Shard, even_ranges, gather_rows
from gossamer.sim.sharded.owned import OwnedTraining
from gossamer.training.trainer import TrainResult


class ShardedModestDriver(ModestDriver):
    """:class:`ModestDriver` whose round's trainers train on the ranks that own them."""

    def __init__(self, exp: Experiment, shard: Shard) -> None:
        exp.trainer.batch_width = "population"       # a node's batches never depend on its call
        super().__init__(exp)
        self.shard = shard
        self.owned = OwnedTraining(shard, exp.spec.numel, exp.init_params.dtype, views=True)

    def _train(self, rows_at: Callable[[np.ndarray], torch.Tensor], ids: np.ndarray, r: int) -> TrainResult:
        def train(mine: np.ndarray):
            result = super(ShardedModestDriver, self)._train(lambda at: rows_at(mine[at]), ids[mine], r)
            return result.params, result

        params, samples, steps, loss = self.owned(ids, train, f"round {r}'s training")
        return TrainResult(params, samples, steps, loss)


class ShardedRandomWalkDriver(RandomWalkDriver):
    """:class:`RandomWalkDriver` whose tokens train on the ranks that own the nodes they visit."""

    def __init__(self, exp: Experiment, shard: Shard) -> None:
        exp.trainer.batch_width = "population"
        super().__init__(exp)
        self.shard = shard
        self.owned = OwnedTraining(shard, exp.spec.numel, exp.init_params.dtype, views=True)

    def _train_visits(self, rows: torch.Tensor, nodes: np.ndarray, keys: np.ndarray, r: int
                      ) -> tuple[torch.Tensor, TrainResult]:
        def train(mine: np.ndarray):
            return super(ShardedRandomWalkDriver, self)._train_visits(
                rows[torch.from_numpy(mine)], nodes[mine], keys[mine], r)

        trained, samples, steps, loss = self.owned(nodes, train, f"round {r}'s visits")
        return trained, TrainResult(None, samples, steps, loss)

    def _evaluate_tokens(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every token's accuracy and loss: each rank evaluates an even range of the tokens."""
        shard = self.shard
        cuts = even_ranges(self.tokens, shard.world, block=1)
        a, b = cuts[shard.rank]
        measured = torch.zeros(b - a, 2, dtype=torch.float64, device=self.params.device)
        if b > a:
            acc, loss = self.exp.evaluator.evaluate(self.params[a:b])
            measured[:, 0], measured[:, 1] = acc.double(), loss.double()
        every = gather_rows(shard, measured, [hi - lo for lo, hi in cuts], f"round {self.round}'s evaluation")
        return every[:, 0].float(), every[:, 1].float()
