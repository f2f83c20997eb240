"""Graph generators registered by name, and `make_topology` to build one from a config.

Every generator has the signature `(num_nodes, seed, **params) -> Topology`; deterministic
graphs ignore the seed. Simple structured graphs are built with numpy (tests check them
against the networkx generator of the same name); random ones call networkx with the seed.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from gossamer.registry import Registry
from gossamer.topology.core import Topology
from gossamer.topology.edge_list import read_edge_list

if TYPE_CHECKING:
    import networkx as nx

Generator = Callable[..., Topology]
TOPOLOGIES: Registry[Generator] = Registry("topology")
# Generators whose graph depends on the seed: the ones `resample: every_round` can re-draw.
RANDOM_TOPOLOGIES = frozenset({"erdos_renyi", "random_regular", "barabasi_albert", "watts_strogatz"})


def make_topology(name: str, num_nodes: int, seed: int, **params: object) -> Topology:
    """Build the registered topology `name` on `num_nodes` nodes; bad parameters raise ValueError."""
    generator = TOPOLOGIES.get(name)
    if isinstance(num_nodes, bool) or not isinstance(num_nodes, (int, np.integer)):
        raise ValueError(f"topology {name!r}: num_nodes must be an integer, got {num_nodes!r}")
    if num_nodes < 1:
        raise ValueError(f"topology {name!r}: num_nodes must be >= 1, got {num_nodes}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"topology {name!r}: seed must be an integer, got {seed!r}")
    _check_params(name, generator, params)
    return generator(int(num_nodes), int(seed), **params)


def _check_params(name: str, generator: Generator, params: dict[str, object]) -> None:
    signature = inspect.signature(generator)
    accepted = [p for p in signature.parameters.values() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(params) - {p.name for p in accepted})
    if unknown:
        allowed = ", ".join(p.name for p in accepted) or "none"
        raise ValueError(
            f"topology {name!r} got unknown parameter(s) {', '.join(unknown)}; accepted: {allowed}"
        )
    missing = [p.name for p in accepted if p.default is p.empty and p.name not in params]
    if missing:
        raise ValueError(f"topology {name!r} needs parameter(s) {', '.join(missing)}")


def _nx():
    """networkx, imported on first use (it costs ~0.15 s at start-up)."""
    import networkx

    return networkx


def _from_networkx(num_nodes: int, graph: nx.Graph) -> Topology:
    return Topology(num_nodes, np.array(list(graph.edges()), dtype=np.int64).reshape(-1, 2))


def _require_int(topology: str, name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"topology {topology!r}: {name} must be an integer, got {value!r}")
    return int(value)


def _require_probability(topology: str, name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise ValueError(f"topology {topology!r}: {name} must be a number, got {value!r}")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"topology {topology!r}: {name} must be in [0, 1], got {value}")
    return float(value)


@TOPOLOGIES.register("ring")
def ring(num_nodes: int, seed: int) -> Topology:
    """Cycle 0-1-...-(N-1)-0 (a single edge for N = 2, no edges for N = 1)."""
    if num_nodes == 1:
        return Topology(1, np.empty((0, 2), dtype=np.int64))
    nodes = np.arange(num_nodes)
    return Topology(num_nodes, np.stack([nodes, (nodes + 1) % num_nodes], axis=1))


def _grid_shape(num_nodes: int, rows: int | None, cols: int | None) -> tuple[int, int]:
    if rows is None and cols is None:
        rows = max(d for d in range(1, math.isqrt(num_nodes) + 1) if num_nodes % d == 0)
    if rows is None:
        rows = num_nodes // max(_require_int("grid", "cols", cols), 1)
    if cols is None:
        cols = num_nodes // max(_require_int("grid", "rows", rows), 1)
    rows, cols = _require_int("grid", "rows", rows), _require_int("grid", "cols", cols)
    if rows < 1 or cols < 1 or rows * cols != num_nodes:
        raise ValueError(
            f"topology 'grid': rows * cols must equal num_nodes ({rows} * {cols} != {num_nodes})"
        )
    return rows, cols


@TOPOLOGIES.register("grid")
def grid(
    num_nodes: int,
    seed: int,
    *,
    rows: int | None = None,
    cols: int | None = None,
    periodic: bool = False,
) -> Topology:
    """2-D lattice with node (r, c) = r * cols + c.

    Without rows/cols the shape is the most square one (1 x N, a path, for prime N).
    """
    rows, cols = _grid_shape(num_nodes, rows, cols)
    ids = np.arange(num_nodes).reshape(rows, cols)
    pieces = [(ids[:, :-1], ids[:, 1:]), (ids[:-1, :], ids[1:, :])]
    # Like networkx, wrap a dimension only when it has more than two nodes.
    if periodic and cols > 2:
        pieces.append((ids[:, -1], ids[:, 0]))
    if periodic and rows > 2:
        pieces.append((ids[-1, :], ids[0, :]))
    edges = np.concatenate([np.stack([u.ravel(), v.ravel()], axis=1) for u, v in pieces])
    return Topology(num_nodes, edges)


@TOPOLOGIES.register("torus")
def torus(
    num_nodes: int, seed: int, *, rows: int | None = None, cols: int | None = None
) -> Topology:
    """Periodic 2-D lattice (degree 4 when rows, cols >= 3)."""
    return grid(num_nodes, seed, rows=rows, cols=cols, periodic=True)


@TOPOLOGIES.register("complete")
def complete(num_nodes: int, seed: int) -> Topology:
    """Every pair of nodes connected: N(N-1)/2 edges."""
    return Topology(num_nodes, np.stack(np.triu_indices(num_nodes, k=1), axis=1))


@TOPOLOGIES.register("star")
def star(num_nodes: int, seed: int) -> Topology:
    """Node 0 connected to every other node."""
    leaves = np.arange(1, num_nodes)
    return Topology(num_nodes, np.stack([np.zeros_like(leaves), leaves], axis=1))


@TOPOLOGIES.register("exponential")
def exponential(num_nodes: int, seed: int) -> Topology:
    """Node i linked to i +- 2^k mod N, k = 0..floor(log2(N-1)), made undirected.

    The static exponential graph of Ying et al., 2021, "Exponential Graph is Provably
    Efficient for Decentralized Deep Training" (NeurIPS), arXiv:2110.13363.
    """
    if num_nodes == 1:
        return Topology(1, np.empty((0, 2), dtype=np.int64))
    offsets = 2 ** np.arange((num_nodes - 1).bit_length())
    nodes = np.arange(num_nodes)
    targets = (nodes[:, None] + offsets[None, :]) % num_nodes
    return Topology(num_nodes, np.stack([np.repeat(nodes, offsets.size), targets.ravel()], axis=1))


@TOPOLOGIES.register("erdos_renyi")
def erdos_renyi(num_nodes: int, seed: int, *, p: float) -> Topology:
    """G(N, p): each pair independently with probability p, drawn in O(N + E) with numpy.

    Exact G(N, p) law (edge count ~ Binomial, then a uniform set of pairs); networkx's
    `gnp_random_graph` gives the same law but loops over all N^2 pairs (6 s at N = 10,000).
    """
    p = _require_probability("erdos_renyi", "p", p)
    rng = np.random.default_rng(seed)
    total = num_nodes * (num_nodes - 1) // 2
    chosen = np.sort(rng.choice(total, size=rng.binomial(total, p), replace=False, shuffle=False))
    # Pair index k enumerates (u, v), u < v, row by row; row u starts at u*N - u(u+1)/2.
    rows = np.arange(num_nodes, dtype=np.int64)
    row_start = rows * num_nodes - rows * (rows + 1) // 2
    u = np.searchsorted(row_start, chosen, side="right") - 1
    v = chosen - row_start[u] + u + 1
    return Topology(num_nodes, np.stack([u, v], axis=1))


# Above this many nodes the random generators build CSR arrays with numpy instead of calling
# networkx (pure Python: minutes and tens of GB at 10^6 nodes); below it networkx's graphs
# are kept so that earlier runs reproduce. ``method`` overrides the choice.
NUMPY_ABOVE_NODES = 50_000


def _method(topology: str, method: str, num_nodes: int) -> str:
    if method not in ("auto", "networkx", "numpy"):
        raise ValueError(f"topology {topology!r}: method must be auto, networkx or numpy, got {method!r}")
    if method == "auto":
        return "numpy" if num_nodes > NUMPY_ABOVE_NODES else "networkx"
    return method


@TOPOLOGIES.register("random_regular")
def random_regular(num_nodes: int, seed: int, *, degree: int, method: str = "auto") -> Topology:
    """Random d-regular graph. ``networkx``: `networkx.random_regular_graph(degree, N, seed=seed)`
    (uniform); ``numpy``: the pairing model (Bollobás 1980) with the self-loops and repeated
    edges of a random pairing re-paired together with as many random other pairs until none
    is left, in O(N d) vectorized work (10^6 nodes, d = 4 in about a second); ``auto``:
    networkx up to :data:`NUMPY_ABOVE_NODES` nodes, numpy above."""
    degree = _require_int("random_regular", "degree", degree)
    if not 0 <= degree < num_nodes:
        raise ValueError(
            f"topology 'random_regular': degree must be in [0, {num_nodes - 1}], got {degree}"
        )
    if degree * num_nodes % 2:
        raise ValueError(
            f"topology 'random_regular': degree * num_nodes must be even, got {degree} * {num_nodes}"
        )
    if _method("random_regular", method, num_nodes) == "networkx":
        return _from_networkx(num_nodes, _nx().random_regular_graph(degree, num_nodes, seed=seed))
    return Topology(num_nodes, _pairing_regular(num_nodes, degree, seed))


def _pairing_regular(n: int, d: int, seed: int, max_rounds: int = 1000) -> np.ndarray:
    """Edges ``[N d / 2, 2]`` of a simple d-regular graph from a random pairing of N d stubs."""
    rng = np.random.default_rng(seed)
    if d == 0:
        return np.empty((0, 2), dtype=np.int64)
    pairs = rng.permutation(np.repeat(np.arange(n, dtype=np.int64), d)).reshape(-1, 2)
    for _ in range(max_rounds):
        u, v = pairs.min(axis=1), pairs.max(axis=1)
        keys = u * n + v
        order = np.argsort(keys, kind="stable")
        repeat = np.zeros(len(keys), dtype=bool)
        repeat[order[1:]] = keys[order[1:]] == keys[order[:-1]]
        bad = (u == v) | repeat
        count = int(bad.sum())
        if count == 0:
            return np.stack([u, v], axis=1)
        # re-pair the bad pairs' stubs with those of as many random good pairs (at least a few)
        good = np.flatnonzero(~bad)
        take = np.concatenate([np.flatnonzero(bad), rng.choice(good, size=min(len(good), max(count, 8)), replace=False)])
        pairs[take] = rng.permutation(pairs[take].reshape(-1)).reshape(-1, 2)
    raise ValueError(f"topology 'random_regular': no simple {d}-regular pairing of {n} nodes found")


@TOPOLOGIES.register("barabasi_albert")
def barabasi_albert(num_nodes: int, seed: int, *, m: int, method: str = "auto") -> Topology:
    """Preferential attachment, each new node bringing m edges. ``networkx``:
    `networkx.barabasi_albert_graph`; ``numpy``: the linearized chord diagram of Bollobás and
    Riordan as generated by Batagelj and Brandes (Phys. Rev. E 71, 036113, 2005): the k-th edge
    endpoint copies a uniformly drawn earlier endpoint, resolved for all edges at once by
    pointer jumping; a self-loop is redirected to a uniform earlier node and repeated edges
    merge, so a node may bring fewer than m distinct edges; ``auto``: networkx up to
    :data:`NUMPY_ABOVE_NODES` nodes, numpy above."""
    m = _require_int("barabasi_albert", "m", m)
    if not 1 <= m < num_nodes:
        raise ValueError(f"topology 'barabasi_albert': m must be in [1, {num_nodes - 1}], got {m}")
    if _method("barabasi_albert", method, num_nodes) == "networkx":
        return _from_networkx(num_nodes, _nx().barabasi_albert_graph(num_nodes, m, seed=seed))
    return Topology(num_nodes, _chord_diagram(num_nodes, m, seed))


def _chord_diagram(n: int, m: int, seed: int) -> np.ndarray:
    """Batagelj-Brandes preferential attachment: edge e (of node e // m) joins its node to the
    node at endpoint r_e, uniform in [0, 2e); endpoint 2j is node j // m, endpoint 2j + 1 is
    edge j's target, so odd endpoints are followed until an even one is reached."""
    rng = np.random.default_rng(seed)
    e = np.arange(m, n * m, dtype=np.int64)           # node 0's edges would all be self-loops
    point = (rng.random(len(e)) * (2 * e)).astype(np.int64)
    r = np.zeros(n * m, dtype=np.int64)
    r[m:] = point
    pending = np.flatnonzero(point % 2 == 1)
    while len(pending):                               # ~log2(N m) jumps
        point[pending] = r[(point[pending] - 1) // 2]
        pending = pending[point[pending] % 2 == 1]
    source, target = e // m, (point // 2) // m
    loop = source == target
    target[loop] = (rng.random(int(loop.sum())) * source[loop]).astype(np.int64)
    return np.stack([source, target], axis=1)


@TOPOLOGIES.register("watts_strogatz")
def watts_strogatz(num_nodes: int, seed: int, *, k: int, p: float) -> Topology:
    """Small world: ring lattice with k neighbours, each edge rewired with probability p."""
    k = _require_int("watts_strogatz", "k", k)
    p = _require_probability("watts_strogatz", "p", p)
    if k % 2 or not 2 <= k < num_nodes:
        raise ValueError(
            f"topology 'watts_strogatz': k must be even and in [2, {num_nodes - 1}], got {k}"
        )
    return _from_networkx(num_nodes, _nx().watts_strogatz_graph(num_nodes, k, p, seed=seed))


@TOPOLOGIES.register("edge_list")
def edge_list(num_nodes: int, seed: int, *, path: str | os.PathLike[str]) -> Topology:
    """Read `u v` lines (node ids 0..N-1; `#` starts a comment); errors name file and line."""
    return Topology(num_nodes, read_edge_list(Path(path), num_nodes))
