"""Personalized FL: every client keeps its own model besides (or instead of) the global one.

The synchronous FL driver holds the personal models of the whole population (``[N, P]``,
checkpointed), trains the selected clients' ones after each round's global training with
:meth:`personal_objective`, and evaluates every client's personal model on its own test rows
(``partition.test_fraction``). Algorithms never see the trainer: they only say what the
personal step is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from gossamer.algorithms.fl.fedavg import FedAvg
from gossamer.algorithms.local import LocalObjective


@dataclass(frozen=True)
class Ditto(FedAvg):
    """Ditto (Tian Li, Shengyuan Hu, Ahmad Beirami, et al., "Ditto: Fair and Robust Federated
    Learning Through Personalization", ICML 2021, arXiv:2012.04221): the global model is
    FedAvg's; each selected client also takes local steps on its personal model ``v`` for
    ``F_k(v) + lam / 2 ||v - w||^2``, with ``w`` the global model it received this round (the
    same local schedule as the global update). ``v`` starts at the initial global model and is
    never sent. ``lam = 0`` is local training from the first global model; large ``lam`` keeps
    ``v`` at the global model."""

    personalized: ClassVar[bool] = True
    lam: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lam < 0:
            raise ValueError("lam must be >= 0")

    def personal_objective(self, received: torch.Tensor) -> LocalObjective:
        """The personal step's objective: the proximal term towards the received model."""
        return LocalObjective(prox_mu=self.lam, anchor=received) if self.lam else LocalObjective()


@dataclass(frozen=True)
class LocalOnly(FedAvg):
    """Local training only: each selected client trains its own model on its own data, from
    the initial model, and nothing is ever sent (the lower baseline of personalized FL). The
    global model stays the initial one."""

    personalized: ClassVar[bool] = True
    communicates: ClassVar[bool] = False

    def personal_objective(self, received: torch.Tensor) -> LocalObjective:
        return LocalObjective()
