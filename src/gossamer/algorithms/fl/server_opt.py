"""Server optimizers: how the server turns a round's averaged update into a model step.

The round's pseudo-gradient is ``delta = average(client models) - global model`` (a descent
direction). Each rule is a pure function ``(params, delta, state) -> (params, state)`` on
flat tensors; ``state`` holds the optimizer's buffers (kept in ``ServerState.extra`` so they
checkpoint with the model).

- ``sgd``: ``x += lr * delta`` (FedAvg's server learning rate; ``lr = 1`` is plain averaging).
- ``momentum`` (FedAvgM; Hsu et al. 2019, arXiv:1909.06335): ``v = beta1 * v + delta``,
  ``x += lr * v``.
- ``nesterov``: SGD with Nesterov momentum on the pseudo-gradient ``-delta``, as
  ``torch.optim.SGD(nesterov=True)``: ``v = beta1 * v + delta``, ``x += lr * (delta + beta1 *
  v)`` (DiLoCo's outer optimizer; Douillard et al. 2023, arXiv:2311.08105).
- ``adamw``: ``torch.optim.AdamW`` on the pseudo-gradient ``-delta`` (bias-corrected, ``tau``
  as its ``eps``, ``weight_decay`` decoupled): with clients that take one SGD step of lr 1 it
  is synchronous data-parallel AdamW over the clients' batches (the baseline DiLoCo is
  compared with).
- ``adagrad``, ``adam``, ``yogi`` (FedAdagrad, FedAdam, FedYogi; Reddi et al., "Adaptive
  Federated Optimization", ICLR 2021, arXiv:2003.00295, Algorithm 2):
  ``m = beta1 * m + (1 - beta1) * delta``; ``v`` is ``v + delta^2`` (Adagrad),
  ``beta2 * v + (1 - beta2) * delta^2`` (Adam) or ``v - (1 - beta2) * delta^2 *
  sign(v - delta^2)`` (Yogi); ``x += lr * m / (sqrt(v) + tau)``. As in the paper, ``m``
  starts at 0, ``v`` at ``tau^2``, and there is no bias correction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

ServerOptimizerName = Literal["sgd", "momentum", "nesterov", "adamw", "adagrad", "adam", "yogi"]


@dataclass(frozen=True)
class ServerOptimizer:
    """Hyper-parameters of the server's step (see the module docstring for each rule)."""

    name: ServerOptimizerName = "sgd"
    lr: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError("server_lr must be > 0")
        if not 0 <= self.beta1 < 1:
            raise ValueError("server_momentum (beta1) must be in [0, 1)")
        if not 0 <= self.beta2 < 1:
            raise ValueError("server_beta2 must be in [0, 1)")
        if self.tau <= 0:
            raise ValueError("server_tau must be > 0")
        if self.weight_decay < 0 or (self.weight_decay and self.name != "adamw"):
            raise ValueError("server_weight_decay must be >= 0, and is used by server_optimizer adamw only")

    def init(self, params: torch.Tensor) -> dict[str, torch.Tensor]:
        """The optimizer's buffers for a model ``params`` ``[P]``."""
        if self.name == "sgd":
            return {}
        if self.name in ("momentum", "nesterov"):
            return {"server_v": torch.zeros_like(params)}
        if self.name == "adamw":
            return {"server_m": torch.zeros_like(params), "server_v": torch.zeros_like(params),
                    "server_t": torch.zeros((), device=params.device)}
        return {"server_m": torch.zeros_like(params),
                "server_v": torch.full_like(params, self.tau ** 2)}

    def step(self, params: torch.Tensor, delta: torch.Tensor, buffers: dict[str, torch.Tensor]
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """New ``(params, buffers)`` after one server step with pseudo-gradient ``delta``."""
        if self.name == "sgd":
            return params + self.lr * delta, buffers
        if not buffers:
            buffers = self.init(params)
        if self.name == "momentum":
            v = self.beta1 * buffers["server_v"] + delta
            return params + self.lr * v, {**buffers, "server_v": v}
        if self.name == "adamw":
            t = buffers["server_t"] + 1
            m = self.beta1 * buffers["server_m"] - (1 - self.beta1) * delta
            v = self.beta2 * buffers["server_v"] + (1 - self.beta2) * delta * delta
            steps = float(t)
            denom = (v.sqrt() / (1 - self.beta2 ** steps) ** 0.5) + self.tau
            new = params * (1 - self.lr * self.weight_decay) - self.lr / (1 - self.beta1 ** steps) * m / denom
            return new, {**buffers, "server_m": m, "server_v": v, "server_t": t}
        if self.name == "nesterov":
            v = self.beta1 * buffers["server_v"] + delta
            return params + self.lr * (delta + self.beta1 * v), {**buffers, "server_v": v}
        m = self.beta1 * buffers["server_m"] + (1 - self.beta1) * delta
        v, sq = buffers["server_v"], delta * delta
        if self.name == "adagrad":
            v = v + sq
        elif self.name == "adam":
            v = self.beta2 * v + (1 - self.beta2) * sq
        else:                                                           # yogi
            v = v - (1 - self.beta2) * sq * torch.sign(v - sq)
        new = params + self.lr * m / (v.sqrt() + self.tau)
        return new, {**buffers, "server_m": m, "server_v": v}


def from_fields(algorithm: object) -> ServerOptimizer:
    """The :class:`ServerOptimizer` an algorithm configures with its ``server_optimizer``,
    ``server_lr``, ``server_momentum``, ``server_beta2``, ``server_tau`` and
    ``server_weight_decay`` fields (a one-line ValueError for a bad combination)."""
    a = algorithm
    return ServerOptimizer(a.server_optimizer, a.server_lr, a.server_momentum, a.server_beta2,
                           a.server_tau, a.server_weight_decay)
