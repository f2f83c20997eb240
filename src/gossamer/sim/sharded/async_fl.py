"""Asynchronous FL (FedAsync, FedBuff, FedCompass, ...) sharded over ranks (docs/scale.md).

The event schedule never depends on model values (a task's end time comes from its client's
profile and the counter-based draws), so every rank runs the same schedule and the same
protocol: who is dispatched, when each upload arrives, when the server updates. What is
split is training: when the first pending task arrives, every rank trains the pending tasks
whose clients it owns (one batched call, batch shapes fixed by the population so a task
trains the same bits on any rank), and :class:`~.owned.OwnedTraining` hands every rank all their
trained models, with their losses and steps, in task order. Every rank then forms the same
uploads (a model attack crafts from the whole batch), merges them in the same order and holds
the same server model.
"""

from __future__ import annotations

import numpy as np
import torch

from gossamer.sim.drivers.async_fl import AsyncFLDriver, SimTask
from gossamer.sim.experiment import Experiment
from gossamer.sim.sharded.base import Shard
from gossamer.sim.sharded.owned import OwnedTraining


class ShardedAsyncFLDriver(AsyncFLDriver):
    """:class:`AsyncFLDriver` whose tasks train on the rank that owns their client."""

    def __init__(self, exp: Experiment, shard: Shard) -> None:
        if exp.population is None:         # a registered population's cohorts keep batch_size
            exp.trainer.batch_width = "population"
        super().__init__(exp)
        self.shard = shard
        self.owned = OwnedTraining(shard, exp.spec.numel, exp.init_params.dtype)

    def _train_pending(self, first: SimTask) -> None:
        pending = [first] + [x for x in self.tasks if x.delivered and x.message is None]
        nodes = np.array([x.plan.client for x in pending], dtype=np.int64)

        rows = torch.stack([x.start for x in pending])

        def train(mine: np.ndarray):
            result = self._trained([pending[i] for i in mine.tolist()], rows[torch.from_numpy(mine)], first)
            return result.params, result

        trained, _, steps, losses = self.owned(nodes, train, f"update {self.state.version + 1}'s training")
        with self.timer("train_s"):         # every rank: the attack sees every trained model
            messages = self._messages(pending, rows, trained, steps, first)
        for i, task in enumerate(pending):
            task.message, task.start = messages[i].clone(), None
            task.loss, task.trained_steps = float(losses[i]), int(steps[i])
