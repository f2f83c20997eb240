"""D-PSGD: every node trains locally, then averages with its neighbours through a mixing matrix.

Lian et al., "Can Decentralized Algorithms Outperform Centralized Algorithms? A Case
Study for Decentralized Parallel Stochastic Gradient Descent", NeurIPS 2017,
arXiv:1705.09056.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from gossamer.algorithms.base import Algorithm


@dataclass(frozen=True)
class DPSGD(Algorithm):
    """Decentralized parallel SGD: local training, then ``gossip_steps`` mixing steps ``X <- W X``.

    ``W`` is the doubly stochastic mixing matrix of the topology (``topology.mixing``,
    Metropolis-Hastings by default). In the simulator ``W`` is one sparse ``[N, N]`` matrix;
    in the runtime a node applies its own row to the models it received.

    ``aggregator`` replaces each node's weighted average by a robust rule of
    :mod:`gossamer.aggregators` over the models it holds (its own and its neighbours'),
    weighted by its row of ``W``; ``aggregator_params`` configures it (e.g. ``{f: 1}``).
    ``centered_clipping`` clips the others around the node's own model.
    """

    family = "dl"
    pattern = "sync_dl"

    gossip_steps: int = 1
    aggregator: str = "mean"
    aggregator_params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from gossamer.aggregators import AGGREGATORS

        if self.gossip_steps < 1:
            raise ValueError("gossip_steps must be >= 1")
        if self.aggregator not in AGGREGATORS:
            raise ValueError(f"unknown aggregator {self.aggregator!r}; known: "
                             f"{', '.join(AGGREGATORS.names())}")

    def mix_row(self, weights: torch.Tensor, models: torch.Tensor,
                losses: torch.Tensor | None = None) -> torch.Tensor:
        """One node's merge, the runtime's per-process form of :meth:`mix`: its row of ``W``
        (``[k]``) and the models it holds (``[k, P]``, its own first). With a robust
        ``aggregator`` the rule runs over them instead (a node whose rule cannot run on ``k``
        models keeps its own); ``losses [k]`` feed rules that score candidates (Bristle)."""
        from gossamer.aggregators import can_merge, merge_held

        if self.aggregator == "mean":
            return weights.to(models.dtype) @ models
        if not can_merge(self.aggregator, models.shape[0], self.aggregator_params):
            return models[0]
        scores = None if losses is None else losses[None]
        return merge_held(self.aggregator, models[None], weights[None], self.aggregator_params, scores)[0]

    def mix(self, mixing: torch.Tensor, params: torch.Tensor,
            out: torch.Tensor | None = None) -> torch.Tensor:
        """``gossip_steps`` products of the (sparse or dense) mixing matrix with rows ``[N, P]``.

        ``out``, a scratch tensor shaped like ``params``, avoids allocating: the two buffers
        alternate between steps and the returned tensor is one of them.
        """
        src = params
        dst = torch.empty_like(params) if out is None else out
        for _ in range(self.gossip_steps):
            torch.mm(mixing, src, out=dst)
            src, dst = dst, src
        return src
