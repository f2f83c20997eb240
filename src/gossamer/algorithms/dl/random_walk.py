"""Random-walk (token) learning: models travel the graph and train at every node they visit.

A token (a model) sits at one node, takes local SGD steps on that node's data and moves to
a neighbour chosen by a walk: the simple random walk, the Metropolis-Hastings walk (uniform
target), or the self-repellent random walk (SRRW) of Hu, Doshi, Eun, "Accelerating
Distributed Stochastic Optimization via Self-Repellent Random Walks", ICLR 2024,
arXiv:2401.09665, built on either of the first two.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from gossamer.algorithms.base import Algorithm

Walk = Literal["simple", "metropolis_hastings", "srrw"]
BaseWalk = Literal["simple", "metropolis_hastings"]


@dataclass(frozen=True)
class Candidates:
    """Where tokens may go next, one padded row per token.

    ``nodes`` int64 ``[T, D]`` (``-1`` pads) lists each token's neighbours and, for walks
    with self-loops, its own node last; ``base`` float64 ``[T, D]`` holds the base chain's
    transition probabilities ``P[u, j]`` (0 on pads; each row sums to 1).
    """

    nodes: np.ndarray
    base: np.ndarray


@dataclass(frozen=True)
class RandomWalk(Algorithm):
    """``num_tokens`` models walk the graph; at each visit a token trains on the node's data
    (``local:`` of the config) and hops to a neighbour drawn from the walk's kernel.

    ``walk``: ``simple`` (``P_ij = 1/d_i``, stationary ``mu_i ∝ d_i``),
    ``metropolis_hastings`` (``P_ij = 1/max(d_i, d_j)`` with the rest on a self-loop,
    ``mu`` uniform) or ``srrw``: the non-Markovian kernel
    ``K[x]_ij ∝ P_ij (x_j / mu_j)^(-alpha)`` over the ``base`` chain ``P``, where ``x`` is the
    token's empirical visit measure (started at ``mu`` with the weight of one visit) and
    ``mu`` the base chain's stationary distribution. ``alpha = 0`` is the base chain; larger
    ``alpha`` pushes the token away from over-visited nodes, so ``x`` approaches ``mu``
    faster (Hu et al. 2024).

    ``reweight`` scales each visit's update by ``(n_i / n) / mu_i`` (shard share over the
    walk's long-run visit share), so a walk whose target is not the data distribution
    (the simple walk on an irregular graph) still optimizes the sample-weighted objective.
    The simulator applies it to the visit's displacement, which for one plain SGD step is
    the same as scaling the step size.
    """

    family = "dl"
    pattern = "random_walk"

    walk: Walk = "simple"
    base: BaseWalk = "metropolis_hastings"
    alpha: float = 0.0
    num_tokens: int = 1
    reweight: bool = True

    def __post_init__(self) -> None:
        if self.alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")
        if self.alpha and self.walk != "srrw":
            raise ValueError(f"alpha applies to walk: srrw only (walk is {self.walk})")
        if self.num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {self.num_tokens}")

    @property
    def chain(self) -> BaseWalk:
        """The Markov chain the walk is built on (the walk itself unless SRRW)."""
        return self.base if self.walk == "srrw" else self.walk  # type: ignore[return-value]

    @property
    def self_repellent(self) -> bool:
        return self.walk == "srrw" and self.alpha > 0

    # --- the chain -----------------------------------------------------------------------------
    def check_degrees(self, degrees: np.ndarray) -> None:
        """A walk cannot leave a node without neighbours: raise a ValueError naming it."""
        lonely = np.flatnonzero(np.asarray(degrees) == 0)
        if len(degrees) > 1 and len(lonely):
            raise ValueError(f"node {int(lonely[0])} has no neighbours; a random walk "
                             "needs every node connected")

    def target(self, degrees: np.ndarray) -> np.ndarray:
        """Stationary distribution ``mu`` ``[N]`` of the base chain (float64)."""
        degrees = np.asarray(degrees, dtype=np.float64)
        if self.chain == "simple" and degrees.sum() > 0:
            return degrees / degrees.sum()
        return np.full(len(degrees), 1.0 / len(degrees))

    def candidates(self, indptr: np.ndarray, indices: np.ndarray, nodes: np.ndarray) -> Candidates:
        """The base chain's rows for the tokens at ``nodes`` ``[T]`` (CSR neighbours)."""
        nodes = np.asarray(nodes, dtype=np.int64)
        degrees = np.diff(indptr)
        deg = degrees[nodes]
        width = int(deg.max(initial=0))
        slot = np.arange(width)[None, :]
        valid = slot < deg[:, None]
        pos = np.minimum(indptr[nodes][:, None] + slot, max(len(indices) - 1, 0))
        neigh = np.where(valid, indices[pos] if len(indices) else 0, -1)
        if self.chain == "simple":
            base = np.where(valid, 1.0 / np.maximum(deg, 1)[:, None], 0.0)
            lonely = deg == 0                      # one node, no neighbours: stay
            cand = np.concatenate([neigh, np.where(lonely, nodes, -1)[:, None]], axis=1)
            return Candidates(cand, np.concatenate([base, lonely[:, None].astype(np.float64)], axis=1))
        other = degrees[np.maximum(neigh, 0)]
        base = np.where(valid, 1.0 / np.maximum(np.maximum(deg[:, None], other), 1), 0.0)
        stay = np.clip(1.0 - base.sum(axis=1), 0.0, 1.0)
        return Candidates(np.concatenate([neigh, nodes[:, None]], axis=1),
                          np.concatenate([base, stay[:, None]], axis=1))

    def kernel(self, cand: Candidates, visits: np.ndarray, mu: np.ndarray) -> np.ndarray:
        """Transition probabilities ``[T, D]`` over ``cand.nodes`` given each token's visit
        counts ``visits`` ``[T, N]`` (the SRRW kernel; the base chain when ``alpha = 0``).

        With ``x = (mu + visits) / (1 + n)``, ``(x_j / mu_j)^(-alpha)`` is computed in log space
        as ``-alpha log(1 + visits_j / mu_j)`` (the common ``1 + n`` cancels on normalizing).
        """
        probs = cand.base.copy()
        if not self.self_repellent:
            return probs
        j = np.maximum(cand.nodes, 0)
        counts = np.take_along_axis(np.asarray(visits, dtype=np.float64), j, axis=1)
        log_w = np.where(probs > 0, np.log(np.where(probs > 0, probs, 1.0))
                         - self.alpha * np.log1p(counts / mu[j]), -np.inf)
        log_w -= log_w.max(axis=1, keepdims=True)
        w = np.exp(log_w)
        return w / w.sum(axis=1, keepdims=True)

    @staticmethod
    def choose(cand: Candidates, probs: np.ndarray, allowed: np.ndarray,
               uniforms: np.ndarray) -> np.ndarray:
        """Next node per token: inverse-CDF draw from ``probs`` restricted to ``allowed``
        ``[T, D]`` and renormalized; ``-1`` where no allowed candidate has mass."""
        p = np.where(allowed & (cand.nodes >= 0), probs, 0.0)
        total = p.sum(axis=1)
        cdf = np.cumsum(p, axis=1)
        pick = (cdf <= (uniforms * total)[:, None]).sum(axis=1)
        pick = np.minimum(pick, p.shape[1] - 1)
        # Rounding may land on a zero-mass slot at the end: take the last slot with mass.
        last = p.shape[1] - 1 - np.argmax(p[:, ::-1] > 0, axis=1)
        pick = np.where(np.take_along_axis(p, pick[:, None], axis=1)[:, 0] > 0, pick, last)
        nxt = np.take_along_axis(cand.nodes, pick[:, None], axis=1)[:, 0]
        return np.where(total > 0, nxt, -1)

    def step_weights(self, num_samples: np.ndarray, mu: np.ndarray) -> np.ndarray:
        """Importance weight of a visit per node ``[N]``: ``(n_i / n) / mu_i`` (1 without
        ``reweight``), so the expected update follows the sample-weighted objective."""
        n = np.asarray(num_samples, dtype=np.float64)
        if not self.reweight or n.sum() == 0:
            return np.ones(len(n))
        return (n / n.sum()) / mu

    # --- analysis ------------------------------------------------------------------------------
    def kernel_matrix(self, indptr: np.ndarray, indices: np.ndarray,
                      visits: np.ndarray | None = None) -> np.ndarray:
        """The dense ``[N, N]`` kernel of a token with visit counts ``visits`` ``[N]`` (tests
        and small-graph analysis; the simulator never builds it)."""
        n = len(indptr) - 1
        nodes = np.arange(n)
        cand = self.candidates(indptr, indices, nodes)
        counts = np.zeros(n) if visits is None else np.asarray(visits, dtype=np.float64)
        probs = self.kernel(cand, np.broadcast_to(counts, (n, n)), self.target(np.diff(indptr)))
        out = np.zeros((n, n))
        rows = np.broadcast_to(nodes[:, None], cand.nodes.shape)
        ok = cand.nodes >= 0
        np.add.at(out, (rows[ok], cand.nodes[ok]), probs[ok])
        return out


@dataclass(frozen=True)
class SRRW(RandomWalk):
    """:class:`RandomWalk` preset to the self-repellent walk over the Metropolis-Hastings chain."""

    walk: Walk = "srrw"
    alpha: float = 10.0


def total_variation(freq: np.ndarray, mu: np.ndarray) -> np.ndarray:
    """``0.5 * sum |freq - mu|`` over the last axis (visit frequencies against the target)."""
    return 0.5 * np.abs(np.asarray(freq) - np.asarray(mu)).sum(axis=-1)


__all__ = ["SRRW", "Candidates", "RandomWalk", "total_variation"]
