"""FedAvg: sample clients, train locally, average their updates at the server.

McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
Data", AISTATS 2017, arXiv:1602.05629.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from gossamer.algorithms.base import Algorithm


@dataclass
class ServerState:
    """The server's model ``[P]`` and the number of completed rounds."""

    params: torch.Tensor
    round: int = 0
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class FedAvg(Algorithm):
    """Federated averaging with client sampling, sample weighting and a server learning rate.

    Each round a ``client_fraction`` of the available clients (at least ``min_clients``)
    trains from the global model and uploads its model, as in the paper; the server moves
    the global model by ``server_lr`` times the step to the (sample- or uniformly-) weighted
    average model. ``server_lr = 1`` is exactly that average.

    ``aggregator`` replaces the weighted average by a robust rule from
    :mod:`gossamer.aggregators` (``median``, ``trimmed_mean``, ``krum``, ...), configured by
    ``aggregator_params`` (e.g. ``{f: 2}``); the client weights are passed to it. Rules work on
    the updates (client model minus global model), so ``bristle`` keeps the clients that
    moved least (the server has no data to score them on: kept updates are averaged by
    weight) and ``flag`` sees update directions.
    """

    family = "fl"
    pattern = "sync_fl"

    client_fraction: float = 1.0
    min_clients: int = 1
    server_lr: float = 1.0
    weighting: Literal["samples", "uniform"] = "samples"
    aggregator: str = "mean"
    aggregator_params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from gossamer.aggregators import AGGREGATORS

        if self.aggregator not in AGGREGATORS:
            raise ValueError(f"unknown aggregator {self.aggregator!r}; known: "
                             f"{', '.join(AGGREGATORS.names())}")
        if not 0 < self.client_fraction <= 1:
            raise ValueError("client_fraction must be in (0, 1]")
        if self.min_clients < 1:
            raise ValueError("min_clients must be >= 1")
        if self.server_lr <= 0:
            raise ValueError("server_lr must be > 0")

    def init_state(self, params: torch.Tensor) -> ServerState:
        return ServerState(params.clone())

    def expected_clients(self, candidates: int) -> int:
        """How many clients :meth:`select` picks from ``candidates`` available ones."""
        if self.client_fraction >= 1:
            return candidates
        return min(candidates, max(self.min_clients, round(self.client_fraction * candidates)))

    def select(self, candidates: np.ndarray, generator: np.random.Generator) -> np.ndarray:
        """Pick ``max(min_clients, round(fraction * |candidates|))`` clients, sorted by id."""
        if self.client_fraction >= 1 or len(candidates) == 0:
            return np.sort(candidates)
        k = self.expected_clients(len(candidates))
        return np.sort(generator.choice(candidates, size=k, replace=False))

    def client_message(self, trained: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """What each client uploads: its trained model ``[B, P]``."""
        return trained

    def aggregate(self, state: ServerState, models: torch.Tensor, num_samples: np.ndarray) -> ServerState:
        """New server state from client models ``[B, P]`` and their sample counts ``[B]``."""
        if models.shape[0] == 0:
            return ServerState(state.params, state.round + 1, state.extra)
        if self.weighting == "samples":
            weights = torch.as_tensor(num_samples, dtype=models.dtype)
        else:
            weights = torch.ones(models.shape[0], dtype=models.dtype)
        if self.aggregator == "mean":
            average = (weights / weights.sum()) @ models
        else:
            from gossamer.aggregators import aggregate

            # rules see updates (model - global): Flag and Bristle are not translation-invariant
            extra = {}
            if self.aggregator == "bristle" and "center" not in self.aggregator_params:
                extra["center"] = torch.zeros_like(state.params)      # the global model
            average = state.params + aggregate(self.aggregator, models - state.params, weights,
                                               **self.aggregator_params, **extra)
        if self.server_lr != 1.0:
            average = state.params + self.server_lr * (average - state.params)
        return ServerState(average, state.round + 1, state.extra)
