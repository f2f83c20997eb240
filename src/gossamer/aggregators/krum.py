"""Distance-based selection: Krum, Multi-Krum and Bulyan.

References:
    - Krum / Multi-Krum: Blanchard, El Mhamdi, Guerraoui, Stainer, "Machine Learning with
      Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS 2017, arXiv:1703.02757.
    - Bulyan: El Mhamdi, Guerraoui, Rouault, "The Hidden Vulnerability of Distributed Learning
      in Byzantium", ICML 2018, arXiv:1802.07927.

Scores use pairwise squared distances ``[G, B, B]``; exact score ties are broken by a fixed,
position-independent key of the rows (:func:`~gossamer.aggregators.base.tie_keys`), so the rules
are invariant to the order of the rows.
"""

from __future__ import annotations

import math

import torch

from gossamer.aggregators.base import (
    as_int,
    check_n,
    finish,
    median_of_sorted,
    need,
    prepare,
    rank,
    rule,
    sq_dists,
    take_rows,
    tie_keys,
    weighted_sum,
)


def _krum_scores(d: torch.Tensor, k: int, alive: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of the ``k`` smallest squared distances ``d [G, B, B]`` from each row to the *other*
    alive rows; rows that are not alive score +inf."""
    g, n, _ = d.shape
    off = d.clone()
    off.diagonal(dim1=1, dim2=2).fill_(math.inf)
    if alive is not None:
        off.masked_fill_(~alive[:, None, :], math.inf)
    if k <= 0:
        scores = torch.zeros(g, n, dtype=d.dtype, device=d.device)
    else:
        scores = torch.topk(off, k, dim=2, largest=False).values.sum(dim=2)
    if alive is not None:
        scores = scores.masked_fill(~alive, math.inf)
    return scores


def check_krum(n, *, f: int = 0) -> None:
    n = check_n(n)
    f = as_int("f", f, lo=0)
    need(n > 2 * f + 2, "krum", "n > 2f + 2", n, f=f)


@rule("krum", check_krum)
def krum(updates: torch.Tensor, weights: torch.Tensor | None = None, *, f: int = 0) -> torch.Tensor:
    """Krum (Blanchard et al. 2017, arXiv:1703.02757); ignores ``weights``.

    Scores each row by the sum of squared distances to its ``n - f - 2`` closest other rows
    and returns the row with the lowest score. Requires ``n > 2f + 2``.
    """
    x, _, batched = prepare(updates, weights)
    n = x.shape[1]
    check_krum(n, f=f)
    best = rank(_krum_scores(sq_dists(x), n - f - 2), tie_keys(x))[:, :1]
    out = take_rows(updates if batched else updates.unsqueeze(0), best.to(updates.device))
    return finish(out[:, 0], batched, updates.dtype)


def check_multi_krum(n, *, f: int = 0, m: int | None = None) -> None:
    n = check_n(n)
    f = as_int("f", f, lo=0)
    need(n > 2 * f + 2, "multi_krum", "n > 2f + 2", n, f=f)
    if m is not None:
        m = as_int("m", m, lo=1)
        need(m <= n - f, "multi_krum", "1 <= m <= n - f", n, f=f, m=m)


@rule("multi_krum", check_multi_krum)
def multi_krum(
    updates: torch.Tensor, weights: torch.Tensor | None = None, *, f: int = 0, m: int | None = None
) -> torch.Tensor:
    """Multi-Krum (Blanchard et al. 2017, arXiv:1703.02757).

    Averages the ``m`` rows with the lowest Krum scores (as :func:`krum`), weighted by
    ``weights`` renormalised over the selection (Flower weights them by ``num_examples``);
    ``m`` defaults to ``n - f``. Requires ``n > 2f + 2`` and ``1 <= m <= n - f``.
    """
    x, w, batched = prepare(updates, weights)
    n = x.shape[1]
    check_multi_krum(n, f=f, m=m)
    m = n - f if m is None else m
    sel = rank(_krum_scores(sq_dists(x), n - f - 2), tie_keys(x))[:, :m]
    ws = w.gather(1, sel)
    total = ws.sum(dim=1, keepdim=True)
    ws = torch.where(total > 0, ws / total.clamp_min(1e-300), torch.full_like(ws, 1.0 / m))
    return finish(weighted_sum(ws, take_rows(x, sel)), batched, updates.dtype)


def check_bulyan(n, *, f: int = 0) -> None:
    n = check_n(n)
    f = as_int("f", f, lo=0)
    need(n >= 4 * f + 3, "bulyan", "n >= 4f + 3", n, f=f)


@rule("bulyan", check_bulyan)
def bulyan(
    updates: torch.Tensor, weights: torch.Tensor | None = None, *, f: int = 0
) -> torch.Tensor:
    """Bulyan (El Mhamdi et al. 2018, arXiv:1802.07927) with Krum as the selection rule;
    ignores ``weights``.

    Selects ``theta = n - 2f`` rows by iterated Krum (each round picks the lowest Krum score
    among the ``r`` remaining rows, using ``max(r - f - 2, 1)`` neighbours, and removes it),
    then for every coordinate averages the ``beta = theta - 2f`` selected values closest to
    the coordinate-wise median of the selection. This is Flower's ``aggregate_bulyan`` with
    ``aggregation_rule=aggregate_krum``. Requires ``n >= 4f + 3``.
    """
    x, _, batched = prepare(updates, weights)
    g, n, _ = x.shape
    check_bulyan(n, f=f)
    theta, beta = n - 2 * f, n - 4 * f
    d, keys = sq_dists(x), tie_keys(x)
    alive = torch.ones(g, n, dtype=torch.bool, device=x.device)
    chosen = []
    for step in range(theta):  # over selection rounds, not groups: every group at once
        r = n - step
        k = min(max(r - f - 2, 1), r - 1)
        pick = rank(_krum_scores(d, k, alive), keys)[:, :1]
        chosen.append(pick)
        alive.scatter_(1, pick, False)
    s, _ = torch.sort(take_rows(x, torch.cat(chosen, dim=1)), dim=1)
    med = median_of_sorted(s, dim=1)
    # sorted values: among values equally far from the median the smaller one comes first
    close = torch.argsort((s - med[:, None, :]).abs(), dim=1, stable=True)[:, :beta]
    return finish(torch.gather(s, 1, close).mean(dim=1), batched, updates.dtype)
