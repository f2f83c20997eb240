"""Asynchronous FL (FedAsync, FedBuff, FedCompass, ...) sharded over ranks (docs/scale.md).

The event schedule never depends on model values (a task's end time comes from its client's
profile and the counter-based draws), so every rank runs the same schedule and the same
protocol: who is dispatched, when each upload arrives, when the server updates. What is
split is training: when the first pending task arrives, every rank trains the pending tasks
whose clients it owns (one batched call, batch shapes fixed by the population so a task
trains the same bits on any rank), and one ``all_gather`` hands every rank all their
uploads, with their losses and steps, in task order. Every rank then merges the same
uploads in the same order and holds the same server model.
"""

from __future__ import annotations

import numpy as np
import torch

from gossamer.sim.drivers.async_fl import AsyncFLDriver, SimTask
from gossamer.sim.experiment import Experiment
from gossamer.sim.sharded.base import Shard, gather_rows


class ShardedAsyncFLDriver(AsyncFLDriver):
    """:class:`AsyncFLDriver` whose tasks train on the rank that owns their client."""

    def __init__(self, exp: Experiment, shard: Shard) -> None:
        if exp.population is None:         # a registered population's cohorts keep batch_size
            exp.trainer.batch_width = "population"
        super().__init__(exp)
        self.shard = shard

    def _train_pending(self, first: SimTask) -> None:
        shard = self.shard
        pending = [first] + [x for x in self.tasks if x.delivered and x.message is None]
        nodes = np.array([x.plan.client for x in pending], dtype=np.int64)
        owner = shard.owner(nodes)
        mine = [x for x, k in zip(pending, owner, strict=True) if k == shard.rank]
        numel = pending[0].start.numel()
        dtype = pending[0].start.dtype
        # each own task's upload, then its loss and steps (float32 losses, and step counts
        # below 2^24, are exact in the model's dtype)
        send = torch.empty(len(mine), numel + 2, dtype=dtype)
        if mine:
            messages, result = self._train_tasks(mine, first)
            send[:, :numel] = messages
            send[:, numel] = result.loss.to(dtype)
            send[:, numel + 1] = torch.from_numpy(np.asarray(result.steps)).to(dtype)
        with self.timer("communicate_s"):
            counts = np.bincount(owner, minlength=shard.world).tolist()
            got = gather_rows(shard, send, counts, f"update {self.state.version + 1}'s training")
        # gathered rank by rank; each rank's rows in pending order
        order = np.argsort(owner, kind="stable")
        for row, i in zip(got, order.tolist(), strict=True):
            task = pending[i]
            task.message, task.start = row[:numel].clone(), None
            task.loss, task.trained_steps = float(row[numel]), int(row[numel + 1])
