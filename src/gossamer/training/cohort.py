"""Training over a registered population: each call materializes only its cohort's data.

:class:`CohortTrainer` has :class:`~gossamer.training.trainer.BatchedTrainer`'s ``train`` and
``samples`` for a population of ``source.n`` clients whose data exist only when they act
(``population/clients.py``): a call generates the data of the clients it trains, binds them to
one reused batched trainer (its workspaces stay allocated between calls) and trains them there,
with each client's data order drawn from its own id, as in a materialized population.
"""

from __future__ import annotations

import numpy as np
import torch

from gossamer.population.clients import ClientSource
from gossamer.training.trainer import BatchedTrainer, LocalObjective, TrainResult


class LazySizes:
    """Training samples per client of a source, computed on demand (a column of length N)."""

    def __init__(self, source: ClientSource) -> None:
        self.source = source

    def __len__(self) -> int:
        return self.source.n

    def __getitem__(self, ids: np.ndarray | int) -> np.ndarray:
        if np.ndim(ids) == 0:
            return self.source.sizes(np.array([int(ids)]))[0]
        return self.source.sizes(np.asarray(ids, dtype=np.int64))


class CohortTrainer:
    """A batched trainer over a lazy population (see the module)."""

    def __init__(self, source: ClientSource, inner: BatchedTrainer) -> None:
        self.source, self.inner = source, inner
        inner.batch_width = "configured"    # a client's batches never depend on its cohort
        self.sizes = LazySizes(source)
        self.spec, self.schedule, self.optimizer = inner.spec, inner.schedule, inner.optimizer
        self.seed, self.kernel, self.dp, self.forward = inner.seed, inner.kernel, inner.dp, inner.forward

    @property
    def nodes_per_pass(self) -> int:
        return self.inner.nodes_per_pass

    @property
    def device(self) -> torch.device:
        return self.inner.device

    def place(self, device: torch.device, autocast: torch.dtype | None = None, reserved: int = 0) -> None:
        """Train on ``device`` (:meth:`BatchedTrainer.place`); each call's cohort data move there."""
        self.inner.place(device, autocast, reserved)

    def _bind(self, nodes: np.ndarray) -> np.ndarray:
        """Generate and bind the data of ``nodes``; returns their positions in the bound cohort."""
        x, y, sizes = self.source.data(nodes)          # generated on the host, then moved
        x, y = x.to(self.inner.device), y.to(self.inner.device)
        ends = np.cumsum(sizes)
        shards = [np.arange(e - s, e, dtype=np.int64) for s, e in zip(sizes.tolist(), ends.tolist(), strict=True)]
        self.inner.bind(x, y, shards, ids=np.asarray(nodes, dtype=np.int64))
        return np.arange(len(nodes), dtype=np.int64)

    def samples(self, nodes: np.ndarray, keys: np.ndarray | int,
                steps: np.ndarray | None = None) -> np.ndarray:
        """Samples each node would process (:meth:`BatchedTrainer.samples`), from the sizes alone:
        ``steps x batch`` in step mode, ``epochs x size`` in epoch mode."""
        nodes = np.asarray(nodes, dtype=np.int64)
        sizes, sched = self.source.sizes(nodes), self.schedule
        if steps is not None:
            return np.where(sizes > 0, np.asarray(steps, dtype=np.int64) * sched.batch_size, 0)
        if sched.steps is not None:
            return np.where(sizes > 0, sched.steps * sched.batch_size, 0).astype(np.int64)
        return int(sched.epochs or 1) * sizes

    def reserve(self, nodes: np.ndarray, dtype: torch.dtype = torch.float32) -> None:
        """Nothing to reserve: a cohort's data exist only during its call."""

    def train(self, params: torch.Tensor, nodes: np.ndarray, keys: np.ndarray | int,
              inplace: bool = False, steps: np.ndarray | None = None,
              objective: LocalObjective | None = None,
              mean_weights: torch.Tensor | None = None,
              mean_groups: np.ndarray | None = None) -> TrainResult:
        """:meth:`BatchedTrainer.train` of the rows ``params`` of clients ``nodes``."""
        nodes = np.asarray(nodes, dtype=np.int64)
        keys = np.broadcast_to(np.asarray(keys, dtype=np.int64), nodes.shape)
        local = self._bind(nodes)
        return self.inner.train(params, local, keys, inplace=inplace, steps=steps, objective=objective,
                                mean_weights=mean_weights, mean_groups=mean_groups)
