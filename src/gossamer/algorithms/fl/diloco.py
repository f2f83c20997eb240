"""DiLoCo: FedAvg's round with an inner AdamW kept on every worker and a Nesterov outer step.

Douillard et al., "DiLoCo: Distributed Low-Communication Training of Language Models",
arXiv:2311.08105 (Algorithm 1).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch

from gossamer.algorithms.fl.fedavg import FedAvg
from gossamer.algorithms.fl.server_opt import ServerOptimizerName
from gossamer.algorithms.local import LocalObjective


@dataclass(frozen=True)
class DiLoCo(FedAvg):
    """Each outer step, every selected worker takes ``H`` inner AdamW steps (``local.steps:
    H``, ``local.optimizer: adamw``) from the global model on its own data; the outer gradient
    is the global model minus the workers' average, and the outer optimizer is SGD with
    Nesterov momentum (the paper's ``server_lr`` 0.7, ``server_momentum`` 0.9; any server
    optimizer can be chosen). Each worker keeps its inner AdamW state (``m``, ``v``, step
    count) across outer steps, on the worker: it is never sent. The outer average is uniform
    over workers by default, as in the paper (``weighting: samples`` weights by data).
    Participation, deadlines, faults, compression and the rest of the synchronous family
    apply unchanged."""

    server_optimizer: ServerOptimizerName = "nesterov"
    server_lr: float = 0.7
    server_momentum: float = 0.9
    weighting: Literal["samples", "uniform"] = "uniform"
    local_optimizer = "adamw"

    @property
    def client_state_vectors(self) -> int:
        return 2                                  # m and v (and one step count)

    def init_client_state(self, numel: int) -> torch.Tensor:
        return torch.zeros(2 * numel + 1)         # AdamW.state_width(numel)

    def local_objective(self, payload: torch.Tensor, client_state: torch.Tensor | None
                        ) -> LocalObjective:
        if client_state is None:
            raise ValueError("diloco needs the workers' inner optimizer state")
        base = super().local_objective(payload, None) or LocalObjective()
        return replace(base, optimizer_state=client_state)

    def client_update(self, trained: torch.Tensor, payload: torch.Tensor,
                      client_state: torch.Tensor | None, steps: np.ndarray, lr: float
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Uploads the trained model; the new inner state is ``client_state``, which local
        training (:attr:`LocalObjective.optimizer_state`) updated in place."""
        uploads, _ = super().client_update(trained, payload, None, steps, lr)
        return uploads, client_state
