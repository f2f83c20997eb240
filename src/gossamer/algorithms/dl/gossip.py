"""Asynchronous gossip learning: models random-walk between peers, merging and training on the way.

Ormándi, Hegedűs, Jelasity, "Gossip Learning with Linear Models on Fully Distributed Data",
Concurrency and Computation: Practice and Experience 2013, arXiv:1109.1396; Hegedűs, Danner,
Jelasity, "Gossip Learning as a Decentralized Alternative to Federated Learning", DAIS 2019.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from gossamer.algorithms.base import Algorithm


@dataclass(frozen=True)
class GossipLearning(Algorithm):
    """Each node wakes on its own clock (Poisson, mean ``period_s``) and exchanges with a random
    neighbour: ``push`` sends its model, ``pull`` asks for the neighbour's, ``push_pull`` does
    both. A node that receives a model merges it with its own and then trains on local data.

    ``merge``: ``average`` (plain mean) or ``age_weighted`` (weights proportional to the
    models' ages, i.e. the number of local updates each has seen; the result takes the
    larger age), as in Hegedűs et al. 2019.
    """

    family = "dl"
    pattern = "async_gossip"

    mode: Literal["push", "pull", "push_pull"] = "push"
    merge: Literal["average", "age_weighted"] = "age_weighted"
    period_s: float = 1.0
    poisson: bool = True

    def __post_init__(self) -> None:
        if self.period_s <= 0:
            raise ValueError("period_s must be > 0")

    def merge_models(self, own: torch.Tensor, own_age: torch.Tensor, received: torch.Tensor,
                     received_age: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Merge rows ``own`` and ``received`` ``[B, P]`` with ages ``[B]``; returns (model, age)."""
        if self.merge == "average":
            return (own + received) / 2, torch.maximum(own_age, received_age)
        total = own_age + received_age
        w_recv = torch.where(total > 0, received_age / total.clamp(min=1e-12), torch.full_like(total, 0.5))
        merged = own + w_recv.unsqueeze(1).to(own.dtype) * (received - own)
        return merged, torch.maximum(own_age, received_age)
