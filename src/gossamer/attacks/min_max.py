"""Min-Max and Min-Sum: the AGR-agnostic attacks of Shejwalkar & Houmansadr (2021).

Shejwalkar, Houmansadr (2021), "Manipulating the Byzantine: Optimizing Model Poisoning Attacks
and Defenses for Federated Learning", NDSS 2021 (arXiv id unverified in REFERENCES.md).

Every Byzantine row of a group is ``m = mean_h + gamma * p``, with ``mean_h`` the mean of the
group's honest rows and ``p`` a perturbation direction: ``-std_h`` (``"std"``, sample std,
ddof = 1), ``-mean_h / ||mean_h||`` (``"unit"``; 0 when ``mean_h = 0``) or ``-sign(mean_h)``
(``"sign"``). ``gamma`` is the largest value for which ``m`` looks no farther from the honest
rows ``g_i`` than they are from each other:

- Min-Max: ``max_i ||m - g_i|| <= max_{i,j} ||g_i - g_j||``;
- Min-Sum: ``sum_i ||m - g_i||^2 <= max_i sum_j ||g_i - g_j||^2``.

The paper's search finds it: test ``gamma = gamma_init``; move up on success, down on failure,
by a step that starts at ``gamma_init / 2`` and halves each time; stop once the last success
and the next candidate are within ``tau`` (or after ``max_iter`` tests). Both constraints hold
on an interval containing 0 (m = mean_h is feasible), so the result is feasible and within
``2 * tau`` of the largest feasible gamma, but never above ``2 * gamma_init``; it is 0 when no
tested gamma is feasible. All groups are searched at once; each test costs ``O(G * B)``
because ``||m - g_i||^2 = gamma^2 ||p||^2 - 2 gamma <p, c_i> + ||c_i||^2`` with
``c_i = g_i - mean_h``.

Definitional notes: Min-Sum's threshold is the paper's ``max_i`` (the authors' released code
compares with ``min_i``, a stricter bound). Groups without honest rows use all their rows.
"""

from __future__ import annotations

import torch

from gossamer.attacks.core import (
    POSITIVE,
    POSITIVE_INT,
    centered,
    group_of,
    masked_mean,
    masked_std,
    one_of,
    reference_rows,
    register,
)

PERTURBATIONS = ("std", "unit", "sign")
_CHECKS = {
    "perturbation": one_of(*PERTURBATIONS),
    "gamma_init": POSITIVE,
    "tau": POSITIVE,
    "max_iter": POSITIVE_INT,
}


def _direction(mean: torch.Tensor, c: torch.Tensor, ref: torch.Tensor, kind: str) -> torch.Tensor:
    """``[G, P]`` perturbation ``p`` (already pointing away from the honest direction)."""
    if kind == "std":
        return -masked_std(c, ref)
    if kind == "unit":
        norm = mean.norm(dim=1, keepdim=True)
        return -mean / norm.clamp_min(torch.finfo(torch.float64).tiny)
    return -torch.sign(mean)


def _search(
    feasible, groups: int, gamma_init: float, tau: float, max_iter: int, device
) -> torch.Tensor:
    """The paper's halving search for the largest feasible gamma, run on all groups at once.

    ``feasible(gamma [G]) -> [G] bool``. Returns ``[G]`` float64 gammas.
    """
    gamma = torch.full((groups,), float(gamma_init), dtype=torch.float64, device=device)
    succ = torch.zeros_like(gamma)
    active = (succ - gamma).abs() > tau
    step = gamma_init / 2
    for _ in range(max_iter):
        if not bool(active.any()):
            break
        ok = feasible(gamma)
        succ = torch.where(active & ok, gamma, succ)
        gamma = torch.where(active, torch.where(ok, gamma + step, gamma - step), gamma)
        step /= 2
        active &= (succ - gamma).abs() > tau
    return succ


def _attack(updates, byzantine, rule, perturbation, gamma_init, tau, max_iter) -> torch.Tensor:
    ref = reference_rows(byzantine)
    mean = masked_mean(updates, ref)
    c = centered(updates, ref, mean)  # zero outside ref
    p = _direction(mean, c, ref, perturbation)
    a = (c * c).sum(dim=2)  # [G, B] ||c_i||^2
    b = torch.bmm(c, p.unsqueeze(2)).squeeze(2)  # [G, B] <p, c_i>
    pp = (p * p).sum(dim=1, keepdim=True)  # [G, 1]
    gram = torch.bmm(c, c.transpose(1, 2))
    pair = ref.unsqueeze(2) & ref.unsqueeze(1)
    dist = ((a.unsqueeze(2) + a.unsqueeze(1) - 2 * gram).clamp_min(0.0)) * pair  # [G, B, B]
    neg_inf = torch.tensor(-torch.inf, dtype=torch.float64, device=updates.device)

    if rule == "min_max":
        bound = dist.amax(dim=(1, 2))

        def feasible(gamma: torch.Tensor) -> torch.Tensor:
            d = gamma[:, None] ** 2 * pp - 2 * gamma[:, None] * b + a
            return torch.where(ref, d, neg_inf).amax(dim=1) <= bound

    else:
        bound = torch.where(ref, dist.sum(dim=2), neg_inf).amax(dim=1)

        def feasible(gamma: torch.Tensor) -> torch.Tensor:
            d = gamma[:, None] ** 2 * pp - 2 * gamma[:, None] * b + a
            return (d * ref).sum(dim=1) <= bound

    gamma = _search(feasible, updates.shape[0], gamma_init, tau, max_iter, updates.device)
    return (mean + gamma[:, None] * p)[group_of(byzantine)]


@register("min_max", **_CHECKS)
def min_max(
    updates: torch.Tensor,
    byzantine: torch.Tensor,
    *,
    generator=None,
    perturbation: str = "std",
    gamma_init: float = 10.0,
    tau: float = 1e-5,
    max_iter: int = 100,
) -> torch.Tensor:
    """Min-Max (Shejwalkar & Houmansadr, NDSS 2021): the largest ``gamma`` with
    ``max_i ||m - g_i|| <= max_{i,j} ||g_i - g_j||`` over the honest rows (module docstring)."""
    return _attack(updates, byzantine, "min_max", perturbation, gamma_init, tau, max_iter)


@register("min_sum", **_CHECKS)
def min_sum(
    updates: torch.Tensor,
    byzantine: torch.Tensor,
    *,
    generator=None,
    perturbation: str = "std",
    gamma_init: float = 10.0,
    tau: float = 1e-5,
    max_iter: int = 100,
) -> torch.Tensor:
    """Min-Sum (Shejwalkar & Houmansadr, NDSS 2021): the largest ``gamma`` with
    ``sum_i ||m - g_i||^2 <= max_i sum_j ||g_i - g_j||^2`` over the honest rows."""
    return _attack(updates, byzantine, "min_sum", perturbation, gamma_init, tau, max_iter)
