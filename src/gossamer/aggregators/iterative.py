"""Iterative rules: geometric median (RFA) and centered clipping.

Both iterate on all groups at once; a group that meets its stopping rule is frozen while the
others go on, so a batch gives what per-group calls give.

References:
    - Geometric median (RFA): Pillutla, Kakade, Harchaoui, "Robust Aggregation for Federated
      Learning", IEEE Trans. Signal Processing 2022, arXiv:1912.13445.
    - Centered clipping: Karimireddy, He, Jaggi, "Learning from History for Byzantine Robust
      Optimization", ICML 2021, arXiv:2012.10333.
"""

from __future__ import annotations

import torch

from gossamer.aggregators.base import (
    as_float,
    as_int,
    check_n,
    finish,
    group_vector,
    median,
    prepare,
    rule,
    weighted_sum,
)


def check_geometric_median(
    n, *, f: int = 0, iters: int = 100, eps: float = 1e-6, tol: float = 1e-7
) -> None:
    check_n(n)
    as_int("f", f, lo=0)
    as_int("iters", iters, lo=0)
    as_float("eps", eps, positive=True)
    as_float("tol", tol)


@rule("geometric_median", check_geometric_median)
def geometric_median(
    updates: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    f: int = 0,
    iters: int = 100,
    eps: float = 1e-6,
    tol: float = 1e-7,
) -> torch.Tensor:
    """Weighted geometric median by smoothed Weiszfeld (RFA; Pillutla et al. 2022, arXiv:1912.13445).

    Starting from the weighted mean, repeats ``z <- sum_i b_i x_i / sum_i b_i`` with
    ``b_i = w_i / max(eps, |z - x_i|)`` (``eps`` is the smoothing ``nu``) for at most ``iters``
    rounds, stopping (per group) once the objective's relative decrease is at most ``tol``.
    """
    x, w, batched = prepare(updates, weights)
    check_geometric_median(x.shape[1], f=f, iters=iters, eps=eps, tol=tol)
    z = weighted_sum(w, x)
    dist = (x - z[:, None, :]).norm(dim=2)
    obj = (w * dist).sum(dim=1)
    active = torch.ones_like(obj, dtype=torch.bool)
    for _ in range(iters):
        b = w / dist.clamp_min(eps)
        z_new = weighted_sum(b / b.sum(dim=1, keepdim=True), x)
        dist_new = (x - z_new[:, None, :]).norm(dim=2)
        new = (w * dist_new).sum(dim=1)
        done = (obj - new).abs() <= tol * new
        z = torch.where(active[:, None], z_new, z)
        dist = torch.where(active[:, None], dist_new, dist)
        obj = torch.where(active, new, obj)
        active = active & ~done
        if not bool(active.any()):
            break
    return finish(z, batched, updates.dtype)


def check_centered_clipping(
    n, *, f: int = 0, tau: float = 10.0, iters: int = 1, center=None
) -> None:
    check_n(n)
    as_int("f", f, lo=0)
    as_float("tau", tau, positive=True)
    as_int("iters", iters, lo=0)


@rule("centered_clipping", check_centered_clipping)
def centered_clipping(
    updates: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    f: int = 0,
    tau: float = 10.0,
    iters: int = 1,
    center: torch.Tensor | None = None,
) -> torch.Tensor:
    """Centered clipping (Karimireddy et al. 2021, arXiv:2012.10333).

    Repeats ``iters`` times ``v <- v + sum_i w_i clip(x_i - v, tau)``, where ``clip`` scales a
    vector to norm at most ``tau``. The paper centres on the previous aggregate (momentum);
    this pure function takes it as ``center`` (``[P]``, or ``[G, P]`` for a batch: e.g. each
    receiving node's own model) and defaults to the coordinate-wise median of each group.
    """
    x, w, batched = prepare(updates, weights)
    check_centered_clipping(x.shape[1], f=f, tau=tau, iters=iters)
    v = median(x, dim=1) if center is None else group_vector("center", center, x, batched)
    for _ in range(iters):
        diff = x - v[:, None, :]
        norm = diff.norm(dim=2)
        scale = torch.where(norm > tau, tau / norm.clamp_min(1e-300), torch.ones_like(norm))
        v = v + weighted_sum(w * scale, diff)
    return finish(v, batched, updates.dtype)
