"""Robust aggregation rules as pure functions over stacked updates.

Every rule has the signature ``rule(updates [B, P], weights [B] | None, **params) -> [P]``:
one row per client, optional non-negative weights (e.g. sample counts). Rules compute in
float64 and return ``updates.dtype``. Every rule accepts the keyword ``f`` (number of
Byzantine clients) so that one config can drive any rule; rules that do not use it ignore it.

Rules that select or rank rows (``median``, ``trimmed_mean``, ``krum``, ``bulyan``) ignore
``weights``; ``multi_krum`` uses them to average the selected rows. Exact ties in scores are
broken by the lexicographic order of the rows, so every rule is invariant to the order of rows.

References:
    - Coordinate-wise median / trimmed mean: Yin, Chen, Kannan, Bartlett (2018), "Byzantine-Robust
      Distributed Learning: Towards Optimal Statistical Rates", ICML 2018, arXiv:1803.01498.
    - Krum / Multi-Krum: Blanchard, El Mhamdi, Guerraoui, Stainer (2017), "Machine Learning with
      Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS 2017, arXiv:1703.02757.
    - Bulyan: El Mhamdi, Guerraoui, Rouault (2018), "The Hidden Vulnerability of Distributed
      Learning in Byzantium", ICML 2018, arXiv:1802.07927.
    - Geometric median (RFA): Pillutla, Kakade, Harchaoui (2022), "Robust Aggregation for Federated
      Learning", IEEE Trans. Signal Processing 2022, arXiv:1912.13445.
    - Centered clipping: Karimireddy, He, Jaggi (2021), "Learning from History for Byzantine Robust
      Optimization", ICML 2021, arXiv:2012.10333.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from gossamer.registry import Registry

Aggregator = Callable[..., torch.Tensor]
AGGREGATORS: Registry[Aggregator] = Registry("aggregator")


def aggregate(
    name: str, updates: torch.Tensor, weights: torch.Tensor | None = None, **params
) -> torch.Tensor:
    """Aggregate ``updates [B, P]`` (one row per client) with ``weights [B]`` into ``[P]``."""
    return AGGREGATORS.get(name)(updates, weights, **params)


# ---------------------------------------------------------------- helpers


def _check(
    updates: torch.Tensor, weights: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate; return (updates in float64, normalised float64 weights summing to 1)."""
    if updates.dim() != 2 or updates.shape[0] < 1:
        raise ValueError(f"updates must have shape [B, P] with B >= 1, got {tuple(updates.shape)}")
    x = updates.to(torch.float64)
    b = x.shape[0]
    if weights is None:
        return x, torch.full((b,), 1.0 / b, dtype=torch.float64, device=x.device)
    w = torch.as_tensor(weights, dtype=torch.float64, device=x.device)
    if w.shape != (b,):
        raise ValueError(f"weights must have shape [{b}], got {tuple(w.shape)}")
    if not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError("weights must be finite, non-negative and not all zero")
    return x, w / w.sum()


def _check_f(f: int, n: int, need: Callable[[int, int], bool], rule: str, cond: str) -> int:
    if isinstance(f, bool) or not isinstance(f, int) or f < 0:
        raise ValueError(f"f must be a non-negative int, got {f!r}")
    if not need(n, f):
        raise ValueError(f"{rule} requires {cond}; got n={n}, f={f}")
    return f


def _median(x: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise median of rows; mean of the two middle values for an even count."""
    s, _ = torch.sort(x, dim=0)
    b = s.shape[0]
    if b % 2:
        return s[b // 2]
    return (s[b // 2 - 1] + s[b // 2]) / 2


def _sq_dists(x: torch.Tensor) -> torch.Tensor:
    """Pairwise squared Euclidean distances (float64), exactly symmetric, zero diagonal."""
    sq = (x * x).sum(dim=1)
    d = sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
    d = ((d + d.T) / 2).clamp_min(0.0)
    d.fill_diagonal_(0.0)
    return d


def _order(scores: torch.Tensor, x: torch.Tensor) -> list[int]:
    """Indices sorted by score; exact ties broken by the lexicographic order of the rows."""
    keys = scores.tolist()
    if len(set(keys)) == len(keys):
        return torch.argsort(scores).tolist()
    return sorted(range(len(keys)), key=lambda i: (keys[i], x[i].tolist()))


def _krum_scores(d: torch.Tensor, k: int) -> torch.Tensor:
    """Sum of the ``k`` smallest squared distances to the *other* rows."""
    n = d.shape[0]
    if k <= 0 or n <= 1:
        return torch.zeros(n, dtype=d.dtype, device=d.device)
    off = d + torch.diag(torch.full((n,), math.inf, dtype=d.dtype, device=d.device))
    return torch.topk(off, k, dim=1, largest=False).values.sum(dim=1)


# ---------------------------------------------------------------- rules


@AGGREGATORS.register("mean")
def mean(updates: torch.Tensor, weights: torch.Tensor | None = None, *, f: int = 0) -> torch.Tensor:
    """Weighted mean (uniform when ``weights`` is None). Not robust: one outlier moves it."""
    x, w = _check(updates, weights)
    return (w @ x).to(updates.dtype)


@AGGREGATORS.register("median")
def median(
    updates: torch.Tensor, weights: torch.Tensor | None = None, *, f: int = 0
) -> torch.Tensor:
    """Coordinate-wise median (Yin et al. 2018, arXiv:1803.01498); ignores ``weights``.

    For an even number of rows the median is the mean of the two middle values (unlike
    ``torch.median``, which returns the lower one).
    """
    x, _ = _check(updates, weights)
    return _median(x).to(updates.dtype)


@AGGREGATORS.register("trimmed_mean")
def trimmed_mean(
    updates: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    f: int | None = None,
    beta: float | None = None,
) -> torch.Tensor:
    """Coordinate-wise trimmed mean (Yin et al. 2018, arXiv:1803.01498); ignores ``weights``.

    Drops the ``f`` largest and ``f`` smallest values of each coordinate and averages the rest.
    Give ``f`` (int) or ``beta`` (fraction, ``f = floor(beta * B)``); requires ``B > 2f``.
    """
    x, _ = _check(updates, weights)
    n = x.shape[0]
    if f is not None and beta is not None:
        raise ValueError("trimmed_mean takes f or beta, not both")
    if beta is not None:
        if not 0.0 <= beta < 0.5:
            raise ValueError(f"beta must be in [0, 0.5), got {beta!r}")
        f = math.floor(beta * n)
    f = _check_f(0 if f is None else f, n, lambda n, f: n > 2 * f, "trimmed_mean", "B > 2f")
    s, _ = torch.sort(x, dim=0)
    return s[f : n - f].mean(dim=0).to(updates.dtype)


@AGGREGATORS.register("krum")
def krum(updates: torch.Tensor, weights: torch.Tensor | None = None, *, f: int = 0) -> torch.Tensor:
    """Krum (Blanchard et al. 2017, arXiv:1703.02757); ignores ``weights``.

    Scores each update by the sum of squared distances to its ``n - f - 2`` closest other
    updates and returns the update with the lowest score. Requires ``n > 2f + 2``.
    """
    x, _ = _check(updates, weights)
    n = x.shape[0]
    f = _check_f(f, n, lambda n, f: n > 2 * f + 2, "krum", "n > 2f + 2")
    scores = _krum_scores(_sq_dists(x), n - f - 2)
    return updates[_order(scores, x)[0]].clone()


@AGGREGATORS.register("multi_krum")
def multi_krum(
    updates: torch.Tensor, weights: torch.Tensor | None = None, *, f: int = 0, m: int | None = None
) -> torch.Tensor:
    """Multi-Krum (Blanchard et al. 2017, arXiv:1703.02757).

    Averages (with ``weights`` renormalised over the selection) the ``m`` updates with the
    lowest Krum scores; ``m`` defaults to ``n - f``. Requires ``n > 2f + 2`` and ``1 <= m <= n``.
    """
    x, w = _check(updates, weights)
    n = x.shape[0]
    f = _check_f(f, n, lambda n, f: n > 2 * f + 2, "multi_krum", "n > 2f + 2")
    m = n - f if m is None else m
    if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= n:
        raise ValueError(f"m must be an int in [1, n={n}], got {m!r}")
    sel = _order(_krum_scores(_sq_dists(x), n - f - 2), x)[:m]
    ws = w[sel]
    if ws.sum() <= 0:
        ws = torch.ones_like(ws)
    return ((ws / ws.sum()) @ x[sel]).to(updates.dtype)


@AGGREGATORS.register("bulyan")
def bulyan(
    updates: torch.Tensor, weights: torch.Tensor | None = None, *, f: int = 0
) -> torch.Tensor:
    """Bulyan (El Mhamdi et al. 2018, arXiv:1802.07927); ignores ``weights``.

    Selects ``theta = n - 2f`` updates by iterated Krum (each round picks the lowest Krum score
    among the remaining ``r`` updates, using ``max(r - f - 2, 1)`` neighbours, and removes it),
    then for every coordinate averages the ``beta = theta - 2f`` selected values closest to the
    coordinate-wise median of the selection. Requires ``n >= 4f + 3``.
    """
    x, _ = _check(updates, weights)
    n = x.shape[0]
    f = _check_f(f, n, lambda n, f: n >= 4 * f + 3, "bulyan", "n >= 4f + 3")
    theta, beta = n - 2 * f, n - 4 * f
    d = _sq_dists(x)
    remaining = list(range(n))
    chosen: list[int] = []
    for _ in range(theta):
        idx = torch.tensor(remaining, device=x.device)
        sub = d[idx][:, idx]
        scores = _krum_scores(sub, max(len(remaining) - f - 2, 1))
        pick = remaining[_order(scores, x[idx])[0]]
        chosen.append(pick)
        remaining.remove(pick)
    s, _ = torch.sort(x[chosen], dim=0)  # sorted values: ties in distance go to the smaller
    med = _median(s)
    close = torch.argsort((s - med).abs(), dim=0, stable=True)[:beta]
    return torch.gather(s, 0, close).mean(dim=0).to(updates.dtype)


@AGGREGATORS.register("geometric_median")
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
    rounds, stopping once the objective's relative decrease is at most ``tol``.
    """
    x, w = _check(updates, weights)
    if iters < 0 or eps <= 0 or tol < 0:
        raise ValueError(f"need iters >= 0, eps > 0, tol >= 0; got {iters}, {eps}, {tol}")
    z = w @ x
    obj = (w * (x - z).norm(dim=1)).sum()
    for _ in range(iters):
        b = w / (x - z).norm(dim=1).clamp_min(eps)
        z = (b / b.sum()) @ x
        new = (w * (x - z).norm(dim=1)).sum()
        done = (obj - new).abs() <= tol * new
        obj = new
        if done:
            break
    return z.to(updates.dtype)


@AGGREGATORS.register("centered_clipping")
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
    this pure function takes it as ``center`` and defaults to the coordinate-wise median.
    """
    x, w = _check(updates, weights)
    if tau <= 0 or iters < 0:
        raise ValueError(f"need tau > 0 and iters >= 0; got tau={tau}, iters={iters}")
    if center is None:
        v = _median(x)
    else:
        v = torch.as_tensor(center, dtype=torch.float64, device=x.device)
        if v.shape != x.shape[1:]:
            raise ValueError(f"center must have shape [{x.shape[1]}], got {tuple(v.shape)}")
    for _ in range(iters):
        diff = x - v
        norm = diff.norm(dim=1)
        scale = torch.where(norm > tau, tau / norm.clamp_min(1e-300), torch.ones_like(norm))
        v = v + w @ (diff * scale[:, None])
    return v.to(updates.dtype)
