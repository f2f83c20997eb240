"""What an algorithm asks of local training, as data: the executors' trainers apply it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LocalObjective:
    """Terms an algorithm adds to every local gradient (stacked, one row per node or shared).

    The step direction is ``grad_scale * g + prox_mu * (w - anchor) + correction`` (plus weight
    decay), where ``g`` is the mini-batch gradient. FedProx sets ``prox_mu`` and the anchor
    (the global model); SCAFFOLD sets ``correction = c - c_i``; FedAvg with momentum (Cheng et
    al. 2023) sets ``grad_scale = beta`` and ``correction = (1 - beta) * m``. ``anchor`` and
    ``correction`` are ``[B, P]`` or ``[P]``.

    ``recursive_direction`` ``v`` replaces the gradient by a recursive (SARAH-style)
    estimate, as FedAMD's miners do: ``d_0 = v``, ``d_k = d_{k-1} + g(w_k; b_k) -
    g(w_{k-1}; b_k)`` with both gradients on the same mini-batch, and the step is along
    ``d_k`` (two gradient evaluations per step).

    ``optimizer_state`` ``[B, W]``: rows of a stateful local optimizer's state (AdamW: ``m``,
    ``v``, ``t``; ``AdamW.state_width``) that persist across activations; the trainer reads
    them and writes the new state back in place (DiLoCo's inner optimizer).

    ``frozen``: the model's parameters (by name) that do not move: their step is skipped
    (weight decay and momentum included). FedRep trains the head with the body frozen, then
    the body with the head frozen.

    ``l1_mu`` adds ``l1_mu * sign(w)`` (the L1 penalty's subgradient) to the parameters named in
    ``l1``; ``prox_only``, when given, limits the proximal term to the parameters it names
    (FED-PUB: L1 on its masks, the proximal term on the weights alone).
    """

    prox_mu: float = 0.0
    anchor: torch.Tensor | None = None
    correction: torch.Tensor | None = None
    grad_scale: float = 1.0
    recursive_direction: torch.Tensor | None = None
    optimizer_state: torch.Tensor | None = None
    frozen: tuple[str, ...] = ()
    l1_mu: float = 0.0
    l1: tuple[str, ...] = ()
    prox_only: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.prox_mu and self.anchor is None:
            raise ValueError("prox_mu needs an anchor")

    def rows(self, part: slice, total: int) -> LocalObjective:
        """This objective for nodes ``part`` of ``total``: per-node ``[total, P]`` tensors
        sliced, shared ``[P]`` ones kept."""
        def cut(t: torch.Tensor | None) -> torch.Tensor | None:
            return t[part] if t is not None and t.dim() == 2 and t.shape[0] == total else t

        return LocalObjective(self.prox_mu, cut(self.anchor), cut(self.correction), self.grad_scale,
                              cut(self.recursive_direction), cut(self.optimizer_state), self.frozen,
                              self.l1_mu, self.l1, self.prox_only)

    def to(self, device: torch.device) -> LocalObjective:
        """This objective with its tensors on ``device`` (``optimizer_state`` copied: the
        caller writes the trained state back into its own rows)."""
        move = lambda t: None if t is None else t.to(device)    # noqa: E731
        return dataclasses.replace(self, anchor=move(self.anchor), correction=move(self.correction),
                                   recursive_direction=move(self.recursive_direction),
                                   optimizer_state=move(self.optimizer_state))

    @property
    def recursive(self) -> bool:
        return self.recursive_direction is not None

    @property
    def adds_terms(self) -> bool:
        return bool(self.prox_mu) or self.correction is not None or bool(self.l1_mu)

    @property
    def by_name(self) -> bool:
        """Whether a term applies to some parameters only (the fused kernel has no names)."""
        return bool(self.l1_mu) or bool(self.prox_only)


__all__ = ["LocalObjective"]
