"""A decentralized node's merge over the models it holds, by any registered rule.

The simulator (all nodes at once, ``[G, k, P]``) and a runtime peer (one node, ``G = 1``)
call this same function, so a robust D-PSGD merge is one definition in both executors.
"""

from __future__ import annotations

import torch

from gossamer.aggregators.base import AGGREGATORS, aggregate
from gossamer.aggregators.check import check_aggregator


def can_merge(name: str, k: int, params: dict) -> bool:
    """Whether rule ``name`` runs on the ``k`` models a node holds (its own included)."""
    try:
        check_aggregator(name, k, **params)
    except ValueError:
        return False
    return True


def needs_losses(name: str) -> bool:
    """Whether the rule scores candidates by their loss on the node's local data (Bristle)."""
    return bool(getattr(AGGREGATORS.get(name), "needs_losses", False))


def merge_held(name: str, held: torch.Tensor, weights: torch.Tensor, params: dict,
               losses: torch.Tensor | None = None) -> torch.Tensor:
    """Merge ``held [G, k, P]`` (row 0 of each group is the node's own model) with the node's
    mixing weights ``[G, k]`` into ``[G, P]``.

    ``mean`` is the weighted average (one D-PSGD row of ``W X``). Other rules run on the
    differences to the node's own model and the result is added back, so direction-based
    rules (Flag) see update directions, Bristle keeps the models closest to the node's own
    and ``centered_clipping`` clips around it (unless ``params`` names a center); rules that
    need losses get ``losses [G, k]`` when given.
    """
    weights = weights.to(held.dtype)
    if name == "mean":
        return torch.bmm(weights.unsqueeze(1), held).squeeze(1)
    extra: dict = {}
    if losses is not None and needs_losses(name):
        extra["losses"] = losses
    own = held[:, :1]
    if name == "centered_clipping" and "center" not in params:
        extra["center"] = torch.zeros_like(own[:, 0])        # clip around the node's own model
    # the rule sees updates relative to the node's own model (row 0 becomes zero): Flag and
    # Bristle are not translation-invariant; the others give the same result either way
    return (own[:, 0] + aggregate(name, held - own, weights, **params, **extra)).to(held.dtype)
