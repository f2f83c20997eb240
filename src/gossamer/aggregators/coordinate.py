"""Mean and the coordinate-wise rules (median, trimmed mean).

Reference: Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards
Optimal Statistical Rates", ICML 2018, arXiv:1803.01498.
"""

from __future__ import annotations

import math

import torch

from gossamer.aggregators.base import (
    as_int,
    check_f_only,
    check_n,
    finish,
    need,
    prepare,
    rule,
    weighted_sum,
)
from gossamer.aggregators.base import median as _median


@rule("mean", check_f_only)
def mean(updates: torch.Tensor, weights: torch.Tensor | None = None, *, f: int = 0) -> torch.Tensor:
    """Weighted mean (uniform when ``weights`` is None). Not robust: one outlier moves it."""
    x, w, batched = prepare(updates, weights)
    check_f_only(x.shape[1], f=f)
    return finish(weighted_sum(w, x), batched, updates.dtype)


@rule("median", check_f_only)
def median(
    updates: torch.Tensor, weights: torch.Tensor | None = None, *, f: int = 0
) -> torch.Tensor:
    """Coordinate-wise median (Yin et al. 2018, arXiv:1803.01498); ignores ``weights``.

    For an even number of rows the median is the mean of the two middle values (as
    ``numpy.median`` and Flower's ``aggregate_median``; ``torch.median`` returns the lower one).
    """
    x, _, batched = prepare(updates, weights)
    check_f_only(x.shape[1], f=f)
    return finish(_median(x, dim=1), batched, updates.dtype)


def _trim_count(n: int, f, beta) -> int:
    if f is not None and beta is not None:
        raise ValueError("trimmed_mean takes f or beta, not both")
    if beta is not None:
        try:
            b = float(beta)
        except (TypeError, ValueError):
            raise ValueError(f"beta must be a number in [0, 0.5), got {beta!r}") from None
        if not 0.0 <= b < 0.5:
            raise ValueError(f"beta must be in [0, 0.5), got {beta!r}")
        return math.floor(b * n)
    return as_int("f", 0 if f is None else f, lo=0)


def check_trimmed_mean(n, *, f: int | None = None, beta: float | None = None) -> None:
    n = check_n(n)
    t = _trim_count(n, f, beta)
    need(n > 2 * t, "trimmed_mean", "n > 2f", n, f=t)


@rule("trimmed_mean", check_trimmed_mean)
def trimmed_mean(
    updates: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    f: int | None = None,
    beta: float | None = None,
) -> torch.Tensor:
    """Coordinate-wise trimmed mean (Yin et al. 2018, arXiv:1803.01498); ignores ``weights``.

    Drops the ``f`` largest and ``f`` smallest values of each coordinate and averages the rest.
    Give ``f`` (int) or ``beta`` (fraction, ``f = floor(beta * n)``, as Flower's
    ``proportiontocut`` and ``scipy.stats.trim_mean``); requires ``n > 2f``.
    """
    x, _, batched = prepare(updates, weights)
    n = x.shape[1]
    check_trimmed_mean(n, f=f, beta=beta)
    t = _trim_count(n, f, beta)
    s, _ = torch.sort(x, dim=1)
    return finish(s[:, t : n - t].mean(dim=1), batched, updates.dtype)
