"""Data-poisoning attacks: the attacker trains honestly on poisoned data.

``label_flip`` and ``label_noise`` are registered so that a config naming them validates; the
experiment applies them to the attackers' training labels (``flip_labels``, ``noisy_labels``)
instead of crafting their updates, so ``apply_attack`` refuses them.
"""

from __future__ import annotations

import torch

from gossamer.attacks.core import PROBABILITY, register

DATA_ATTACKS = frozenset({"label_flip", "label_noise"})


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


def noisy_labels(y: torch.Tensor, num_classes: int, rate: float, generator: torch.Generator) -> torch.Tensor:
    """Label noise: each label, with probability ``rate``, replaced by a class drawn uniformly
    (possibly the same one) from ``generator`` (a new tensor)."""
    if not 0 <= rate <= 1:
        raise ValueError(f"rate must be in [0, 1], got {rate!r}")
    hit = torch.rand(y.shape, generator=generator) < rate
    drawn = torch.randint(0, num_classes, y.shape, generator=generator, dtype=y.dtype)
    return torch.where(hit, drawn, y)


@register("label_noise", rate=PROBABILITY)
def label_noise(updates: torch.Tensor, byzantine: torch.Tensor, *, generator=None, rate: float = 1.0
                ) -> torch.Tensor:
    """Data attack: a noisy-label client trains on labels of which a ``rate`` fraction are
    drawn uniformly at random; no update to craft."""
    raise ValueError(
        "attack 'label_noise' is a data attack (the attacker trains on noisy labels); "
        "apply it with noisy_labels to the training labels, not with apply_attack"
    )
