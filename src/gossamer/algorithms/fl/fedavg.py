"""FedAvg and the synchronous FL family built on it.

FedAvg: McMahan et al., "Communication-Efficient Learning of Deep Networks from
Decentralized Data", AISTATS 2017, arXiv:1602.05629. Options shared by the family:
FedProx's proximal term (Li et al., "Federated Optimization in Heterogeneous Networks",
MLSys 2020, arXiv:1812.06127), server optimizers (FedAvgM, FedAdagrad, FedAdam, FedYogi;
:mod:`gossamer.algorithms.fl.server_opt`), momentum in local training as in Cheng et al.,
"Momentum Benefits Non-IID Federated Learning Simply and Provably", ICLR 2024,
arXiv:2306.16504, and a round deadline with over-selection.

What a synchronous executor (simulator driver or runtime server/client) calls, in order:
``select`` -> ``broadcast`` (the payload sent to every selected client) -> on each client
``local_objective`` and local training, then ``client_update`` (the upload and the
client's new persistent state) -> ``aggregate`` on the server.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from gossamer.algorithms.base import Algorithm
from gossamer.algorithms.fl.payload import Payload
from gossamer.algorithms.fl.server_opt import ServerOptimizer, ServerOptimizerName, from_fields
from gossamer.algorithms.local import LocalObjective


@dataclass
class ServerState:
    """The server's model ``[P]`` and the number of completed rounds."""

    params: torch.Tensor
    round: int = 0
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


# what the uploads' mean must stand for: a subclass redefining any of these uploads or
# aggregates something else (SCAFFOLD's control variates, FedAMD's anchors)
_MEAN_PATH = ("client_message", "client_update", "weights", "average_delta", "aggregate")


@dataclass(frozen=True)
class FedAvg(Algorithm):
    """Federated averaging with client sampling, sample weighting and a server optimizer.

    Each round a ``client_fraction`` of the available clients (at least ``min_clients``)
    trains from the global model and uploads its model, as in the paper; the server takes
    the step ``delta`` = (sample- or uniformly-) weighted average model minus global model
    and applies ``server_optimizer`` (``sgd``: ``x += server_lr * delta``, so ``server_lr =
    1`` is exactly the average; ``momentum``, ``nesterov``, ``adamw``, ``adagrad``, ``adam``,
    ``yogi``: see :mod:`gossamer.algorithms.fl.server_opt`, with ``server_momentum``,
    ``server_beta2``, ``server_tau``, ``server_weight_decay``).

    ``prox_mu`` adds FedProx's proximal term ``mu/2 ||w - x||^2`` to every local objective.
    ``momentum_beta`` (Cheng et al. 2023, FedAvg-M) makes clients step along
    ``beta * g + (1 - beta) * m``, where ``m`` is the server's momentum, broadcast with the
    model and updated each round to the clients' average direction
    ``(x - y_i) / (lr * K_i)`` (``K_i`` local steps, ``lr`` the local learning rate).

    ``deadline_s`` drops clients whose upload would arrive after that many simulated
    seconds; ``over_selection`` (e.g. 0.3) selects that many more clients than needed and
    keeps the first arrivals, as in production FL (Bonawitz et al. 2019).

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
    server_optimizer: ServerOptimizerName = "sgd"
    server_momentum: float = 0.9
    server_beta2: float = 0.99
    server_tau: float = 1e-3
    server_weight_decay: float = 0.0
    prox_mu: float = 0.0
    momentum_beta: float | None = None
    deadline_s: float | None = None
    over_selection: float = 0.0

    def __post_init__(self) -> None:
        from gossamer.aggregators import AGGREGATORS

        if self.aggregator not in AGGREGATORS:
            raise ValueError(f"unknown aggregator {self.aggregator!r}; known: "
                             f"{', '.join(AGGREGATORS.names())}")
        if not 0 < self.client_fraction <= 1:
            raise ValueError("client_fraction must be in (0, 1]")
        if self.min_clients < 1:
            raise ValueError("min_clients must be >= 1")
        if self.prox_mu < 0:
            raise ValueError("prox_mu must be >= 0")
        if self.momentum_beta is not None and not 0 < self.momentum_beta <= 1:
            raise ValueError("momentum_beta must be in (0, 1]")
        if self.deadline_s is not None and self.deadline_s <= 0:
            raise ValueError("deadline_s must be > 0")
        if self.over_selection < 0:
            raise ValueError("over_selection must be >= 0")
        _ = self.optimizer                                          # validates server_* fields

    @property
    def optimizer(self) -> ServerOptimizer:
        return from_fields(self)

    # --- shapes of what travels --------------------------------------------------------------
    @property
    def download_names(self) -> tuple[str, ...]:
        """The server vectors each selected client receives beside the model (:class:`Payload`)."""
        return ("momentum",) if self.momentum_beta is not None else ()

    @property
    def upload_vectors(self) -> int:
        """Model-sized vectors in each client's upload."""
        return 1

    @property
    def uses_global_model(self) -> bool:
        return bool(self.prox_mu) or self.momentum_beta is not None

    @property
    def client_state_vectors(self) -> int:
        """Model-sized vectors each client keeps between rounds (0: stateless clients)."""
        return 0

    @property
    def mean_of_models(self) -> bool:
        """Whether :meth:`aggregate` needs no more of the uploads than their weighted mean
        (:meth:`mean_weights` ``@`` models): then an executor may hand :meth:`aggregate_mean`
        that mean, taken wherever the trained models lie, instead of ``[B, P]`` upload rows.
        False for a subclass that redefines what is uploaded or how it is aggregated."""
        plain = all(getattr(type(self), m) is getattr(FedAvg, m) for m in _MEAN_PATH)
        return plain and self.aggregator == "mean" and self.momentum_beta is None

    # --- server --------------------------------------------------------------------------------
    def init_state(self, params: torch.Tensor, num_clients: int = 1) -> ServerState:
        extra = self.optimizer.init(params)
        if self.momentum_beta is not None:
            extra["momentum"] = torch.zeros_like(params)
        return ServerState(params.clone(), 0, extra)

    def expected_clients(self, candidates: int) -> int:
        """How many clients :meth:`select` picks from ``candidates`` available ones."""
        if self.client_fraction >= 1:
            return candidates
        return min(candidates, max(self.min_clients, round(self.client_fraction * candidates)))

    def wanted(self, candidates: int) -> int:
        """How many uploads a round waits for (``select`` may pick more: over-selection)."""
        return self.expected_clients(candidates)

    def select(self, candidates: np.ndarray, generator: np.random.Generator) -> np.ndarray:
        """Pick ``max(min_clients, round(fraction * |candidates|))`` clients (times ``1 +
        over_selection``, capped by the candidates), sorted by id."""
        k = self.expected_clients(len(candidates))
        if self.over_selection:
            k = min(len(candidates), int(np.ceil(k * (1 + self.over_selection))))
        if k >= len(candidates) or len(candidates) == 0:
            return np.sort(candidates)
        return np.sort(generator.choice(candidates, size=k, replace=False))

    def broadcast(self, state: ServerState) -> Payload:
        """What each selected client receives: the model, and client momentum's vector."""
        if self.momentum_beta is None:
            return Payload(state.params)
        return Payload(state.params, {"momentum": state.extra["momentum"]})

    # --- client ----------------------------------------------------------------------------------
    def init_client_state(self, numel: int) -> torch.Tensor | None:
        """A client's persistent state ``[client_state_vectors * P]`` before its first round."""
        return None

    def local_objective(self, payload: Payload, client_state: torch.Tensor | None
                        ) -> LocalObjective | None:
        """Terms added to local gradients for clients that received ``payload``."""
        if self.momentum_beta is None:
            return LocalObjective(self.prox_mu, payload.model) if self.prox_mu else None
        beta = self.momentum_beta
        return LocalObjective(self.prox_mu, payload.model if self.prox_mu else None,
                              (1 - beta) * payload["momentum"], grad_scale=beta)

    def client_message(self, trained: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """What each client uploads: its trained model ``[B, P]``."""
        return trained

    def client_update(self, trained: torch.Tensor, payload: Payload,
                      client_state: torch.Tensor | None, steps: np.ndarray, lr: float
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(uploads [B, upload_vectors * P], new client states or None)`` after training."""
        return self.client_message(trained, payload.model.expand_as(trained)), None

    # --- aggregation -------------------------------------------------------------------------
    def weights(self, num_samples: np.ndarray, dtype: torch.dtype,
                device: torch.device | None = None) -> torch.Tensor:
        if self.weighting == "samples":
            return torch.as_tensor(np.asarray(num_samples), dtype=dtype, device=device)
        return torch.ones(len(num_samples), dtype=dtype, device=device)

    def mean_weights(self, num_samples: np.ndarray, dtype: torch.dtype = torch.float32,
                     device: torch.device | None = None) -> torch.Tensor:
        """The weights ``[B]`` (summing to 1) of the mean :meth:`aggregate` takes."""
        weights = self.weights(num_samples, dtype, device)
        return weights / weights.sum()

    def average_delta(self, state: ServerState, models: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The round's step: weighted mean (or robust rule) of ``models - global``."""
        if self.aggregator == "mean":
            return (weights / weights.sum()) @ models - state.params
        from gossamer.aggregators import aggregate

        # rules see updates (model - global): Flag and Bristle are not translation-invariant
        extra = {}
        if self.aggregator == "bristle" and "center" not in self.aggregator_params:
            extra["center"] = torch.zeros_like(state.params)      # the global model
        return aggregate(self.aggregator, models - state.params, weights,
                         **self.aggregator_params, **extra)

    def aggregate(self, state: ServerState, uploads: torch.Tensor, num_samples: np.ndarray,
                  steps: np.ndarray | None = None, lr: float | None = None) -> ServerState:
        """New server state from client uploads ``[B, upload_vectors * P]``, their sample
        counts ``[B]`` and (for momentum) local step counts ``[B]`` and the local lr."""
        if uploads.shape[0] == 0:
            return ServerState(state.params, state.round + 1, state.extra)
        numel = state.params.numel()
        models = uploads[:, :numel]
        weights = self.weights(num_samples, models.dtype, models.device)
        delta = self.average_delta(state, models, weights)
        momentum = None
        if self.momentum_beta is not None:
            momentum = self.momentum_update(state, models, weights, steps, lr)
        return self._server_step(state, delta, momentum)

    def aggregate_mean(self, state: ServerState, mean: torch.Tensor) -> ServerState:
        """:meth:`aggregate` from the uploads' mean ``[P]`` (:attr:`mean_of_models` only)."""
        return self._server_step(state, mean - state.params)

    def _server_step(self, state: ServerState, delta: torch.Tensor,
                     momentum: torch.Tensor | None = None) -> ServerState:
        buffers = {k: v for k, v in state.extra.items() if k.startswith("server_")}
        params, buffers = self.optimizer.step(state.params, delta, buffers)
        extra = {**state.extra, **buffers}
        if momentum is not None:
            extra["momentum"] = momentum
        return ServerState(params, state.round + 1, extra)

    def momentum_update(self, state: ServerState, models: torch.Tensor, weights: torch.Tensor,
                        steps: np.ndarray | None, lr: float | None) -> torch.Tensor:
        """Cheng et al.'s ``g = mean_i (x - y_i) / (lr * K_i)`` over clients that stepped."""
        if steps is None or lr is None:
            raise ValueError("momentum_beta needs the clients' local step counts and lr")
        k = torch.as_tensor(np.asarray(steps), dtype=models.dtype, device=models.device)
        ok = k > 0
        if not bool(ok.any()):
            return state.extra["momentum"]
        w = weights[ok] / weights[ok].sum()
        directions = (state.params - models[ok]) / (lr * k[ok]).unsqueeze(1)
        return w @ directions


@dataclass(frozen=True)
class FedProx(FedAvg):
    """FedAvg with the proximal term ``mu/2 ||w - x||^2`` in every local objective (Li et al. 2020)."""

    prox_mu: float = 0.01


@dataclass(frozen=True)
class FedAvgM(FedAvg):
    """FedAvg with server momentum ``v = beta v + delta; x += lr v`` (Hsu et al. 2019)."""

    server_optimizer: ServerOptimizerName = "momentum"


@dataclass(frozen=True)
class FedAdagrad(FedAvg):
    """FedAvg with an Adagrad server step (Reddi et al. 2021)."""

    server_optimizer: ServerOptimizerName = "adagrad"
    server_lr: float = 0.01


@dataclass(frozen=True)
class FedAdam(FedAvg):
    """FedAvg with an Adam server step, no bias correction (Reddi et al. 2021)."""

    server_optimizer: ServerOptimizerName = "adam"
    server_lr: float = 0.01


@dataclass(frozen=True)
class FedYogi(FedAvg):
    """FedAvg with a Yogi server step (Reddi et al. 2021)."""

    server_optimizer: ServerOptimizerName = "yogi"
    server_lr: float = 0.01


@dataclass(frozen=True)
class FedAvgMomentum(FedAvg):
    """FedAvg-M of Cheng et al. 2023: clients step along ``beta g + (1 - beta) m``."""

    momentum_beta: float | None = 0.9
