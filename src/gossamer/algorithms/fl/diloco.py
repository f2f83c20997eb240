"""DiLoCo: FedAvg's round with an inner AdamW kept on every worker and a Nesterov outer step.

Douillard et al., "DiLoCo: Distributed Low-Communication Training of Language Models",
arXiv:2311.08105 (Algorithm 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from gossamer.algorithms.fl.adam_state import KeptAdamState
from gossamer.algorithms.fl.fedavg import FedAvg
from gossamer.algorithms.fl.server_opt import ServerOptimizerName


@dataclass(frozen=True)
class DiLoCo(KeptAdamState, FedAvg):
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
    missing_state = "diloco needs the workers' inner optimizer state"
