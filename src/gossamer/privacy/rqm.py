"""Renyi DP of the Randomized Quantization Mechanism, computed exactly from its definition.

Youn, Hu, Ziani, Abernethy 2023, "Randomized Quantization is All You Need for Differential
Privacy in Federated Learning", arXiv:2306.11913 (the mechanism: ``compression/rqm.py``). For
one coordinate, RQM's output is a level index with a distribution ``P(x)`` over ``m`` levels;
its RDP of order ``alpha`` is ``sup_{x, x' in [-c, c]} D_alpha(P(x) || P(x'))``, which this
module computes exactly:

- :func:`rqm_pmf` gives ``P(x)`` in ``O(m^2)`` from the two independent kept neighbours of
  ``x`` (geometric gaps), not by enumerating the ``2^(m-2)`` kept sets (tests check both agree);
- ``P(x)`` is affine in ``x`` on each cell between consecutive levels, and
  ``sum_k P_k^alpha Q_k^(1-alpha)`` is jointly convex for ``alpha > 1``, so the supremum is
  attained at a pair of cell ends: ``-c``, ``c`` and the levels inside ``(-c, c)``
  (:func:`rqm_rdp` takes the maximum over all such pairs, in both orders).

A vector of ``P`` coordinates is ``P`` independent uses on the same data, and a client released
in ``k`` rounds composes ``k`` times: ``rdp = k P rdp_1``, converted to (epsilon, delta) by
opacus' ``get_privacy_spent`` (the conversion of its RDP accountant).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch


def rqm_levels(c: float, extension: float, levels: int) -> np.ndarray:
    """The level values ``B(i) = -(c + D) + i 2 (c + D) / (m - 1)``, float64 ``[m]``."""
    top = c + extension
    return -top + np.arange(levels, dtype=np.float64) * (2.0 * top / (levels - 1))


def rqm_pmf(x: float, *, c: float, extension: float, levels: int, q: float) -> np.ndarray:
    """The exact output distribution ``[m]`` of RQM on a scalar ``x`` (clipped to ``[-c, c]``).

    With ``B(j) <= x < B(j+1)``, the lower kept level is ``i <= j`` with probability
    ``q (1-q)^(j-i)`` (``(1-q)^j`` for ``i = 0``, always kept), the upper one ``k >= j + 1``
    with ``q (1-q)^(k-j-1)`` (``(1-q)^(m-2-j)`` for ``k = m - 1``), independently; ``x`` goes
    to ``k`` with probability ``(x - B(i)) / (B(k) - B(i))``."""
    m = levels
    b = rqm_levels(c, extension, m)
    x = min(max(float(x), -c), c)
    j = int(min(max(np.searchsorted(b, x, side="right") - 1, 0), m - 2))
    lo = np.arange(j + 1)
    hi = np.arange(j + 1, m)
    p_lo = q * (1 - q) ** (j - lo).astype(np.float64)
    p_lo[0] = (1 - q) ** j
    p_hi = q * (1 - q) ** (hi - j - 1).astype(np.float64)
    p_hi[-1] = (1 - q) ** (m - 2 - j)
    up = (x - b[lo])[:, None] / (b[hi][None, :] - b[lo][:, None])      # [lower, upper]
    joint = p_lo[:, None] * p_hi[None, :]
    pmf = np.zeros(m)
    pmf[lo] = (joint * (1 - up)).sum(axis=1)
    pmf[hi] = (joint * up).sum(axis=0)
    return pmf


def _log_renyi(log_p: np.ndarray, log_q: np.ndarray, alpha: float) -> np.ndarray:
    """``D_alpha(P || Q)`` for pmfs given by their logs, over leading axes (last axis: outcomes)."""
    with np.errstate(invalid="ignore"):
        terms = alpha * log_p - (alpha - 1) * log_q
    terms = np.where(np.isneginf(log_p), -np.inf, terms)          # P_k = 0 adds nothing
    return torch.logsumexp(torch.from_numpy(terms), dim=-1).numpy() / (alpha - 1)


def rqm_breakpoints(c: float, extension: float, levels: int) -> np.ndarray:
    """The inputs where ``P(x)`` may bend: ``-c``, ``c`` and the levels strictly inside."""
    b = rqm_levels(c, extension, levels)
    return np.unique(np.concatenate([[-c, c], b[(b > -c) & (b < c)]]))


def rqm_rdp(orders: Sequence[float] | float, *, c: float, extension: float, levels: int,
            q: float) -> np.ndarray:
    """RDP of one coordinate at each order ``alpha > 1``: the exact supremum over inputs in
    ``[-c, c]`` (the maximum over pairs of breakpoints, see the module docstring)."""
    orders = np.atleast_1d(np.asarray(orders, dtype=np.float64))
    if np.any(orders <= 1):
        raise ValueError("Renyi DP orders must be > 1")
    points = rqm_breakpoints(c, extension, levels)
    pmfs = np.stack([rqm_pmf(x, c=c, extension=extension, levels=levels, q=q) for x in points])
    with np.errstate(divide="ignore"):
        logs = np.log(pmfs)
    return np.array([float(_log_renyi(logs[:, None, :], logs[None, :, :], a).max())
                     for a in orders])


def default_orders() -> list[float]:
    """The orders opacus' RDP accountant uses."""
    from opacus.accountants import RDPAccountant

    return list(RDPAccountant.DEFAULT_ALPHAS)


def rdp_to_epsilon(orders: Sequence[float], rdp: Sequence[float], delta: float) -> float:
    """(epsilon at ``delta``) from an RDP curve, by opacus' ``get_privacy_spent``."""
    from opacus.accountants.analysis.rdp import get_privacy_spent

    rdp = np.asarray(rdp, dtype=np.float64)
    if not np.isfinite(rdp).any():
        return float("inf")
    with warnings.catch_warnings():   # "optimal order at the edge": eps stays a valid bound
        warnings.simplefilter("ignore", UserWarning)
        eps, _ = get_privacy_spent(orders=list(orders), rdp=rdp, delta=delta)
    return float(eps)


def rqm_epsilon(*, c: float, extension: float, levels: int, q: float, coordinates: int,
                releases: int, delta: float, orders: Sequence[float] | None = None) -> float:
    """Epsilon at ``delta`` of ``releases`` RQM releases of a ``coordinates``-long vector."""
    if releases <= 0:
        return 0.0
    orders = default_orders() if orders is None else list(orders)
    rdp = rqm_rdp(orders, c=c, extension=extension, levels=levels, q=q)
    return rdp_to_epsilon(orders, releases * coordinates * rdp, delta)


class RQMLedger:
    """Client-level accounting of RQM uploads: each client's number of releases; epsilon is
    the bound for the most released client (selection is data-independent, so conditioning on
    it is sound; no amplification by subsampling is claimed)."""

    def __init__(self, *, c: float, extension: float, levels: int, q: float, coordinates: int,
                 delta: float, num_clients: int) -> None:
        self.delta, self.coordinates = delta, coordinates
        self.orders = default_orders()
        self.rdp = rqm_rdp(self.orders, c=c, extension=extension, levels=levels, q=q)
        self.releases = np.zeros(num_clients, dtype=np.int64)
        self._cached: float | None = 0.0

    def released(self, clients: np.ndarray) -> None:
        """``clients`` each sent one RQM-quantized update."""
        np.add.at(self.releases, np.asarray(clients, dtype=np.int64), 1)
        self._cached = None

    def epsilon(self) -> float:
        if self._cached is None:
            k = int(self.releases.max(initial=0))
            self._cached = 0.0 if k == 0 else rdp_to_epsilon(
                self.orders, k * self.coordinates * self.rdp, self.delta)
        return self._cached

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"releases": torch.from_numpy(self.releases.copy())}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.releases = state["releases"].numpy().astype(np.int64).copy()
        self._cached = None
