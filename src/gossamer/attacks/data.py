"""Data-poisoning attacks: the attacker trains honestly on poisoned data.

``label_flip`` is registered so that a config naming it validates; the simulator applies it
to the attackers' training labels with ``flip_labels`` instead of crafting their updates, so
``apply_attack`` refuses it.
"""

from __future__ import annotations

import torch

from gossamer.attacks.core import register

DATA_ATTACKS = frozenset({"label_flip"})


def flip_labels(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Label flipping: ``y -> num_classes - 1 - y`` (a new tensor, same dtype and device).

    >>> flip_labels(torch.tensor([0, 3, 9]), 10).tolist()
    [9, 6, 0]
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {y.dtype}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes - 1}]")
    return (num_classes - 1) - y


@register("label_flip")
def label_flip(updates: torch.Tensor, byzantine: torch.Tensor, *, generator=None) -> torch.Tensor:
    """Data attack: the attacker trains on ``flip_labels`` of its data; no update to craft."""
    raise ValueError(
        "attack 'label_flip' is a data attack (the attacker trains on flipped labels); "
        "apply it with flip_labels to the training labels, not with apply_attack"
    )
