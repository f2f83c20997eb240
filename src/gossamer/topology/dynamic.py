"""Time-varying communication graphs: one graph per round, reproducible from (seed, round).

- ``resample: every_round``: a random generator (``random_regular``, ``erdos_renyi``, ...)
  re-drawn every round with a seed hashed from (seed, round), so any process can compute
  round r's graph alone and a resumed run needs no state.
- ``one_peer_exponential``: at round r node i receives from i + 2^k mod N,
  k = (r - 1) mod tau, tau = ceil(log2 N): every node sends and receives one model per
  round, and the rounds cycle through the hops of the static exponential graph; with the
  1/2-1/2 weights, tau rounds average exactly when N is a power of two.
- ``peer_sampling``: every node keeps a view of ``view_size`` peers that a gossip-based
  peer-sampling service refreshes every round (:class:`PeerSampling`), and pushes its model
  to its view, as in Epidemic Learning (de Vos et al., 2023, arXiv:2310.01972).

Rounds are numbered from 1, as the drivers number them. A round's graph is an undirected
`Topology` or directed `Links`; `links(r)` gives the directed form of either.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.sparse as sp

from gossamer import rng
from gossamer.registry import Registry
from gossamer.topology.core import Links, Topology
from gossamer.topology.graphs import RANDOM_TOPOLOGIES, TOPOLOGIES, _check_params, make_topology

# Counter-based stream of topology draws; sub-streams keep the purposes apart.
STREAM_TOPOLOGY = 32
_RESAMPLE, _INIT_VIEW, _PARTNER, _PRIORITY = 1, 2, 3, 4


class DynamicTopology:
    """A communication graph per round ``r >= 1`` (subclasses define `graph`)."""

    directed = False

    def __init__(self, name: str, num_nodes: int) -> None:
        self.name, self.num_nodes = name, int(num_nodes)
        self._cached: tuple[int, Topology | Links, Links] | None = None

    @property
    def window(self) -> int:
        """Rounds checked for joint connectivity and spectral gap: ceil(log2 N), at least 1."""
        return max(1, (self.num_nodes - 1).bit_length())

    def _draw(self, r: int) -> Topology | Links:
        raise NotImplementedError

    def _at(self, r: int) -> tuple[int, Topology | Links, Links]:
        if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 1:
            raise ValueError(f"rounds are numbered from 1, got {r!r}")
        if self._cached is None or self._cached[0] != r:
            g = self._draw(int(r))
            self._cached = (int(r), g, g if isinstance(g, Links) else Links.from_topology(g))
        return self._cached

    def graph(self, r: int) -> Topology | Links:
        """Round ``r``'s graph: an undirected `Topology` or directed `Links` (the last round's is cached)."""
        return self._at(r)[1]

    def links(self, r: int) -> Links:
        """Directed links of round ``r`` (both directions of an undirected round graph)."""
        return self._at(r)[2]

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore: round r's graph is a pure function of (seed, r)."""


class Resampled(DynamicTopology):
    """A random generator re-drawn every round: round r uses seed hash(seed, r)."""

    def __init__(self, name: str, num_nodes: int, seed: int, params: dict[str, Any]) -> None:
        if name not in RANDOM_TOPOLOGIES:
            raise ValueError(f"resample: every_round re-draws a random graph, but {name!r} does not "
                             f"depend on the seed; random ones: {', '.join(sorted(RANDOM_TOPOLOGIES))}")
        super().__init__(name, num_nodes)
        self.seed, self.params = int(seed), dict(params)
        _check_params(name, TOPOLOGIES.get(name), self.params)

    def round_seed(self, r: int) -> int:
        return int(rng.hash_u64(self.seed, STREAM_TOPOLOGY, _RESAMPLE, r)[0] >> np.uint64(1))

    def _draw(self, r: int) -> Topology:
        return make_topology(self.name, self.num_nodes, self.round_seed(r), **self.params)


class OnePeerExponential(DynamicTopology):
    """Round r: node i receives from (i + 2^((r - 1) mod tau)) mod N, tau = ceil(log2 N)."""

    directed = True

    def offset(self, r: int) -> int:
        return 1 << ((r - 1) % self.window)

    def _draw(self, r: int) -> Links:
        n = self.num_nodes
        if n == 1:
            return Links(1, np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64))
        nodes = np.arange(n, dtype=np.int64)
        return Links(n, (nodes + self.offset(r)) % n, nodes)


class PeerSampling(DynamicTopology):
    """Every node pushes its model to a view of ``view_size`` peers, refreshed every round.

    The service is a gossip shuffle with ages: every entry of a view carries an age, and every
    round all entries age by one; then every node, one after another, picks its oldest entry q
    (ties broken at random) and swaps views with q: q gets the initiator's view with q itself
    replaced by a fresh (age 0) entry for the initiator, and the initiator gets q's view with
    itself, if there, replaced by q. Pointers move rather than copy and every node injects one
    fresh pointer to itself per round, so in-degrees stay close to ``view_size`` and over
    rounds every node is picked about equally often. The sequential exchanges run in
    vectorized passes of disjoint pairs (a proposal goes ahead when its random priority beats
    every other pending proposal touching either end). Views depend only on (seed, round), not
    on models, faults or availability (an offline node in a view simply does not receive);
    they are kept as state (`state_dict`) so a resumed run continues without replaying, and
    any round can be replayed.
    """

    directed = True

    def __init__(self, num_nodes: int, seed: int, view_size: int) -> None:
        super().__init__("peer_sampling", num_nodes)
        if isinstance(view_size, bool) or not isinstance(view_size, (int, np.integer)):
            raise ValueError(f"topology 'peer_sampling': view_size must be an integer, got {view_size!r}")
        if not 1 <= view_size < num_nodes:
            raise ValueError(f"topology 'peer_sampling': view_size must be in [1, {num_nodes - 1}] "
                             f"(fewer than num_nodes), got {view_size}")
        self.seed, self.view_size = int(seed), int(view_size)
        self._view_round = 0
        self._views, self._ages = self.initial_views(), np.zeros((num_nodes, view_size), dtype=np.int64)

    def initial_views(self) -> np.ndarray:
        """Round-0 views ``[N, c]``: c distinct other nodes per node, uniformly (Floyd's method)."""
        n, c = self.num_nodes, self.view_size
        nodes = np.arange(n, dtype=np.int64)
        chosen = np.empty((n, c), dtype=np.int64)
        for s in range(c):
            j = n - 1 - c + s                  # pick from {0..j}; on a repeat take j itself
            t = (rng.uniform(self.seed, STREAM_TOPOLOGY, _INIT_VIEW, nodes, s) * (j + 1)).astype(np.int64)
            repeat = (chosen[:, :s] == t[:, None]).any(axis=1)
            chosen[:, s] = np.where(repeat, j, t)
        return np.sort((nodes[:, None] + 1 + chosen) % n, axis=1)

    def exchange(self, views: np.ndarray, ages: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
        """Views and ages ``[N, c]`` after round r's shuffle (every node initiates once)."""
        n, c = views.shape
        nodes = np.arange(n, dtype=np.int64)
        views, ages = views.copy(), ages + 1
        pending = np.ones(n, dtype=bool)
        step = 0
        while pending.any():
            step += 1
            tie = rng.uniform(self.seed, STREAM_TOPOLOGY, _PARTNER, r, step, nodes[:, None] * c + np.arange(c))
            partner = views[nodes, np.argmax(ages + tie, axis=1)]          # oldest entry
            priority = np.where(pending, rng.uniform(self.seed, STREAM_TOPOLOGY, _PRIORITY, r, step, nodes), -1.0)
            best = priority.copy()
            np.maximum.at(best, partner, priority)
            go = pending & (priority == best) & (priority == best[partner])
            i, q = nodes[go], partner[go]
            to_q, to_q_age = views[i], ages[i]
            fresh = to_q == q[:, None]
            to_q, to_q_age = np.where(fresh, i[:, None], to_q), np.where(fresh, 0, to_q_age)
            to_i, to_i_age = views[q], ages[q]
            known = to_i == i[:, None]
            to_i, to_i_age = np.where(known, q[:, None], to_i), np.where(known, 0, to_i_age)
            views[q], ages[q], views[i], ages[i] = to_q, to_q_age, to_i, to_i_age
            pending[i] = False
        return views, ages

    def _state_at(self, r: int) -> tuple[np.ndarray, np.ndarray]:
        if r < self._view_round:               # an earlier round: replay without moving the state
            views, ages = self.initial_views(), np.zeros_like(self._ages)
            for k in range(1, r + 1):
                views, ages = self.exchange(views, ages, k)
            return views, ages
        while self._view_round < r:
            self._view_round += 1
            self._views, self._ages = self.exchange(self._views, self._ages, self._view_round)
        return self._views, self._ages

    def views(self, r: int) -> np.ndarray:
        """Views ``[N, c]`` used in round r (after r shuffles), each row sorted."""
        return np.sort(self._state_at(r)[0], axis=1)

    def _draw(self, r: int) -> Links:
        views = self._state_at(r)[0]
        return Links(self.num_nodes, np.repeat(np.arange(self.num_nodes), self.view_size), views.ravel())

    def state_dict(self) -> dict[str, Any]:
        return {"round": self._view_round, "views": self._views.copy(), "ages": self._ages.copy()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self._view_round = int(state["round"])
            self._views = np.asarray(state["views"], dtype=np.int64).copy()
            self._ages = np.asarray(state["ages"], dtype=np.int64).copy()
            self._cached = None


Factory = Callable[..., DynamicTopology]
DYNAMIC_TOPOLOGIES: Registry[Factory] = Registry("dynamic topology")


@DYNAMIC_TOPOLOGIES.register("one_peer_exponential")
def one_peer_exponential(num_nodes: int, seed: int) -> OnePeerExponential:
    """One model sent and received per node and round, along i + 2^k (see the module doc)."""
    return OnePeerExponential("one_peer_exponential", num_nodes)


@DYNAMIC_TOPOLOGIES.register("peer_sampling")
def peer_sampling(num_nodes: int, seed: int, *, view_size: int) -> PeerSampling:
    """Push to a view of ``view_size`` peers refreshed every round by peer sampling."""
    return PeerSampling(num_nodes, seed, view_size)


def make_dynamic(name: str, num_nodes: int, seed: int, resample: str = "never",
                 **params: Any) -> DynamicTopology | None:
    """The time-varying topology a config asks for, or None for a static one."""
    if name in DYNAMIC_TOPOLOGIES:
        if resample != "never":
            raise ValueError(f"{name} changes every round by itself; leave resample at never")
        factory = DYNAMIC_TOPOLOGIES.get(name)
        _check_params(name, factory, params)
        return factory(int(num_nodes), int(seed), **params)
    if resample == "every_round":
        return Resampled(name, num_nodes, seed, params)
    if resample != "never":
        raise ValueError(f"resample must be never or every_round, got {resample!r}")
    return None


def window_links(topology: DynamicTopology, rounds: range | None = None) -> list[Links]:
    """Links of each of ``rounds`` (default 1..window), leaving the topology's state as it was."""
    state = topology.state_dict()
    parts = [topology.links(r) for r in (rounds or range(1, topology.window + 1))]
    topology.load_state_dict(state)
    return parts


def union_links(topology: DynamicTopology, rounds: range | None = None) -> Links:
    """All links used in ``rounds`` (default 1..window)."""
    parts = window_links(topology, rounds)
    return Links(topology.num_nodes, np.concatenate([p.src for p in parts]),
                 np.concatenate([p.dst for p in parts]))


def jointly_connected(topology: DynamicTopology) -> bool:
    """True when the union of rounds 1..window is strongly connected (every node's model can
    reach every other node within one window), the rule a dynamic topology must pass."""
    return topology.num_nodes == 1 or union_links(topology).is_strongly_connected()


def window_spectral_gap(topology: DynamicTopology, mixing: Callable[[Topology | Links], sp.csr_matrix],
                        dense_max_nodes: int = 2000) -> float | None:
    """Per-round gap over the first window of B rounds: 1 - |lambda_2(W_B ... W_1)|^(1/B).

    For a static W this is the usual 1 - |lambda_2(W)|; for one-peer exponential with N a power
    of two it is 1 (the product is exact averaging) although each round alone has gap 0.
    None beyond ``dense_max_nodes`` nodes (a dense N x N product).
    """
    from gossamer.topology.mixing import spectral_gap

    n, b = topology.num_nodes, topology.window
    if n == 1:
        return 1.0
    if n > dense_max_nodes:
        return None
    state = topology.state_dict()
    product = np.eye(n)
    for r in range(1, b + 1):
        product = mixing(topology.graph(r)) @ product
    topology.load_state_dict(state)
    second = 1.0 - spectral_gap(np.asarray(product))
    if second < 1e-12:                         # exact averaging up to rounding
        return 1.0
    return float(max(0.0, 1.0 - second ** (1.0 / b)))
