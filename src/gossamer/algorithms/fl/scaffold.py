"""SCAFFOLD: control variates correct client drift.

Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated Learning",
ICML 2020, arXiv:1910.06378 (Algorithm 1, control-variate option II); with
``momentum_beta``, SCAFFOLD-M of Cheng et al., "Momentum Benefits Non-IID Federated Learning
Simply and Provably", ICLR 2024, arXiv:2306.16504.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from gossamer.algorithms.fl.fedavg import FedAvg, ServerState
from gossamer.algorithms.fl.payload import Payload
from gossamer.algorithms.local import LocalObjective


@dataclass(frozen=True)
class Scaffold(FedAvg):
    """SCAFFOLD with server control variate ``c`` and one control variate ``c_i`` per client.

    The server sends ``(x, c)``; client ``i`` takes ``K_i`` local steps along
    ``g - c_i + c``, then sets ``c_i+ = c_i - c + (x - y_i) / (K_i * lr)`` (option II) and
    uploads ``(y_i, c_i+ - c_i)``. The server steps the model with the averaged update
    (``server_lr`` is the paper's global step size ``eta_g``; any server optimizer works)
    and sets ``c += (1 / N) * sum_i (c_i+ - c_i)`` over the ``N`` clients of the federation.
    Downloads and uploads are two model-sized vectors each.

    With ``momentum_beta`` (SCAFFOLD-M), clients step along ``beta * (g - c_i + c) +
    (1 - beta) * m`` with the server momentum ``m`` (a third downloaded vector) and
    ``c_i+`` is the average of the local gradients; that average is recovered exactly from
    the trajectory, ``(x - y_i) / (lr K_i beta) - (1 - beta) m / beta + c_i - c``, which is
    option II when ``beta = 1``. A client without local steps keeps its ``c_i``.
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.aggregator != "mean":
            raise ValueError("scaffold supports aggregator: mean only (control variates are averaged)")

    @property
    def download_names(self) -> tuple[str, ...]:
        return ("control",) + (("momentum",) if self.momentum_beta is not None else ())

    @property
    def upload_vectors(self) -> int:
        return 2

    @property
    def client_state_vectors(self) -> int:
        return 1

    def init_state(self, params: torch.Tensor, num_clients: int = 1) -> ServerState:
        state = super().init_state(params, num_clients)
        state.extra["control"] = torch.zeros_like(params)
        state.extra["num_clients"] = torch.tensor(float(num_clients), device=params.device)
        return state

    def broadcast(self, state: ServerState) -> Payload:
        vectors = {"control": state.extra["control"]}
        if self.momentum_beta is not None:
            vectors["momentum"] = state.extra["momentum"]
        return Payload(state.params, vectors)

    def init_client_state(self, numel: int) -> torch.Tensor:
        return torch.zeros(numel)

    def local_objective(self, payload: Payload, client_state: torch.Tensor | None
                        ) -> LocalObjective:
        if client_state is None:
            raise ValueError("scaffold needs the clients' control variates")
        correction = payload["control"] - client_state             # c - c_i, [B, P]
        anchor = payload.model if self.prox_mu else None
        if self.momentum_beta is None:
            return LocalObjective(self.prox_mu, anchor, correction)
        beta = self.momentum_beta
        return LocalObjective(self.prox_mu, anchor, beta * correction + (1 - beta) * payload["momentum"],
                              grad_scale=beta)

    def client_update(self, trained: torch.Tensor, payload: Payload,
                      client_state: torch.Tensor | None, steps: np.ndarray, lr: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        x, c = payload.model, payload["control"]
        assert client_state is not None
        k = torch.as_tensor(np.asarray(steps), dtype=trained.dtype, device=trained.device).unsqueeze(1)
        stepped = k > 0
        beta = 1.0 if self.momentum_beta is None else self.momentum_beta
        new_c = (x - trained) / (lr * k.clamp(min=1) * beta) + client_state - c
        if self.momentum_beta is not None:
            new_c = new_c - (1 - beta) / beta * payload["momentum"]
        new_c = torch.where(stepped, new_c, client_state)
        return torch.cat([trained, new_c - client_state], dim=1), new_c

    def aggregate(self, state: ServerState, uploads: torch.Tensor, num_samples: np.ndarray,
                  steps: np.ndarray | None = None, lr: float | None = None) -> ServerState:
        new = super().aggregate(state, uploads, num_samples, steps, lr)
        if uploads.shape[0] == 0:
            return new
        numel = state.params.numel()
        delta_c = uploads[:, numel:2 * numel].sum(0) / state.extra["num_clients"]
        new.extra["control"] = state.extra["control"] + delta_c
        return new


@dataclass(frozen=True)
class ScaffoldMomentum(Scaffold):
    """SCAFFOLD-M of Cheng et al. 2023 (``momentum_beta`` defaults to 0.9)."""

    momentum_beta: float | None = 0.9
