"""Bristle: keep the models closest to the node's own, weight them by how well they do locally.

Reference: Verbraeken, de Vos, Pouwelse, "Bristle: Decentralized Federated Learning in
Byzantine, Non-i.i.d. Environments", 2021, arXiv:2110.11006.
"""

from __future__ import annotations

import math

import torch

from gossamer.aggregators.base import (
    as_float,
    as_int,
    check_n,
    finish,
    group_vector,
    need,
    prepare,
    rank,
    rule,
    take_rows,
    tie_keys,
    weighted_sum,
)


def _keep_count(n: int, f, keep, fraction) -> int:
    f = as_int("f", f, lo=0)
    if keep is not None and fraction is not None:
        raise ValueError("bristle takes keep or fraction, not both")
    if keep is not None:
        k = as_int("keep", keep, lo=1)
        need(k <= n, "bristle", "keep <= n", n, keep=k)
        return k
    if fraction is not None:
        fr = as_float("fraction", fraction, positive=True)
        if fr > 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
        return max(1, math.floor(fr * n + 1e-9))
    need(f < n, "bristle", "f < n (it keeps the n - f closest)", n, f=f)
    return n - f


def check_bristle(
    n, *, f: int = 0, keep: int | None = None, fraction: float | None = None,
    temperature: float = 1.0, center=None, losses=None,
) -> None:
    n = check_n(n)
    _keep_count(n, f, keep, fraction)
    as_float("temperature", temperature, positive=True)


@rule("bristle", check_bristle)
def bristle(
    updates: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    f: int = 0,
    keep: int | None = None,
    fraction: float | None = None,
    temperature: float = 1.0,
    center: torch.Tensor | None = None,
    losses: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bristle's prioritizer and integrator (Verbraeken, de Vos, Pouwelse 2021, arXiv:2110.11006).

    Prioritizer: keep the ``k`` rows closest (Euclidean) to the node's own model ``center``:
    ``k = keep``, or ``max(1, floor(fraction * B))``, or by default ``B - f``. ``center`` is
    ``[P]`` (or ``[G, P]`` for a batch); by default row 0 of each group is the node's own
    model, which is then always kept (distance 0). Ties go to the row with the smaller fixed
    key, as in Krum.

    Integrator: average the kept rows with weights ``w_i * exp(-(l_i - min_kept l) /
    temperature)``, where ``l = losses`` (``[B]`` or ``[G, B]``, lower is better) scores each
    row on the node's local data and ``w`` are the given ``weights`` (uniform when None). A
    non-finite loss gets weight 0. **Without losses the kept rows are averaged by ``w``
    alone** (uniformly when ``weights`` is None). The attribute ``needs_losses = True`` asks
    the simulator to compute every candidate's loss on the receiver's local data.

    Simplifications of the paper, which (a) has the prioritizer add a few randomly chosen
    farther models (explore-exploit) and remember peers across rounds, (b) integrates each
    class (output-layer column) of each model separately by its per-class performance on a
    small i.i.d. sample relative to the node's own model, with the own model weight 1, and
    (c) freezes the non-output layers by transfer learning. Here: no exploration and no
    history (a deterministic pure function), one scalar loss per model instead of per-class
    scores, a softmin of the loss gap to the best kept model instead of the paper's score
    curve, and whole rows. Transfer learning is a model choice, outside the aggregator.
    """
    x, w, batched = prepare(updates, weights)
    g, n, _ = x.shape
    check_bristle(n, f=f, keep=keep, fraction=fraction, temperature=temperature)
    k = _keep_count(n, f, keep, fraction)
    own = x[:, 0] if center is None else group_vector("center", center, x, batched)
    dist = (x - own[:, None, :]).square().sum(dim=2)                   # [G, B]
    kept = rank(dist, tie_keys(x))[:, :k]
    wk = w.gather(1, kept)
    if losses is not None:
        loss = torch.as_tensor(losses, dtype=torch.float64, device=x.device)
        if tuple(loss.shape) != ((g, n) if batched else (n,)):
            want = [g, n] if batched else [n]
            raise ValueError(f"losses must have shape {want}, got {tuple(loss.shape)}")
        lk = loss.reshape(g, n).gather(1, kept)
        lk = torch.where(torch.isfinite(lk), lk, torch.full_like(lk, math.inf))
        best = lk.min(dim=1, keepdim=True).values
        best = torch.where(torch.isfinite(best), best, torch.zeros_like(best))
        scored = wk * torch.exp(-(lk - best) / temperature)
        wk = torch.where(scored.sum(dim=1, keepdim=True) > 0, scored, wk)
    total = wk.sum(dim=1, keepdim=True)
    wk = torch.where(total > 0, wk / total.clamp_min(1e-300), torch.full_like(wk, 1.0 / k))
    return finish(weighted_sum(wk, take_rows(x, kept)), batched, updates.dtype)


bristle.needs_losses = True  # type: ignore[attr-defined]
