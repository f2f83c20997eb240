"""Graph values: `Topology` (an undirected simple graph on nodes 0..N-1 stored as an edge array)
and `Links` (the directed links one round of communication uses)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

if TYPE_CHECKING:
    import networkx as nx


def canonical_edges(num_nodes: int, edges: np.ndarray) -> np.ndarray:
    """Return edges as sorted, deduplicated int64 [E, 2] rows with u < v (self-loops are an error)."""
    pairs = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    if pairs.size and (pairs.min() < 0 or pairs.max() >= num_nodes):
        raise ValueError(f"edge endpoints must lie in 0..{num_nodes - 1}")
    if np.any(pairs[:, 0] == pairs[:, 1]):
        raise ValueError("self-loops are not allowed in a topology")
    # One integer per pair turns dedup + lexicographic order into a 1-D sort.
    keys = np.minimum(pairs[:, 0], pairs[:, 1]) * num_nodes + np.maximum(pairs[:, 0], pairs[:, 1])
    if np.all(keys[1:] > keys[:-1]) and np.all(pairs[:, 0] < pairs[:, 1]):
        return pairs.copy()
    # Sort-based dedup: np.unique is ~50x slower than np.sort for 10^7 keys in numpy 2.4.
    keys = np.sort(keys)
    keep = np.ones(keys.shape[0], dtype=bool)
    np.not_equal(keys[1:], keys[:-1], out=keep[1:])
    keys = keys[keep]
    return np.stack([keys // num_nodes, keys % num_nodes], axis=1)


@dataclass(frozen=True, eq=False, repr=False)
class Topology:
    """An undirected simple graph: `edges` is int64 [E, 2], each edge once with u < v, sorted.

    Construction canonicalises any edge array (order, direction, duplicates); neighbour
    lists are a CSR structure built once on first use.
    """

    num_nodes: int
    edges: np.ndarray

    def __post_init__(self) -> None:
        if isinstance(self.num_nodes, bool) or int(self.num_nodes) != self.num_nodes:
            raise ValueError(f"num_nodes must be an integer, got {self.num_nodes!r}")
        if self.num_nodes < 1:
            raise ValueError(f"num_nodes must be >= 1, got {self.num_nodes}")
        edges = canonical_edges(int(self.num_nodes), self.edges)
        edges.setflags(write=False)
        object.__setattr__(self, "num_nodes", int(self.num_nodes))
        object.__setattr__(self, "edges", edges)

    @property
    def num_edges(self) -> int:
        """Number of undirected edges E."""
        return int(self.edges.shape[0])

    @cached_property
    def _csr(self) -> tuple[np.ndarray, np.ndarray]:
        n = self.num_nodes
        # Lower neighbours first, then upper: scipy's stable COO->CSR then leaves rows sorted.
        src = np.concatenate([self.edges[:, 1], self.edges[:, 0]])
        dst = np.concatenate([self.edges[:, 0], self.edges[:, 1]])
        ones = np.ones(src.shape[0], dtype=np.int8)
        matrix = sp.coo_array((ones, (src, dst)), shape=(n, n)).tocsr()
        matrix.sort_indices()
        indptr = matrix.indptr.astype(np.int64)
        indices = matrix.indices.astype(np.int64)
        indptr.setflags(write=False)
        indices.setflags(write=False)
        return indptr, indices

    @property
    def indptr(self) -> np.ndarray:
        """CSR row pointer [N+1]: neighbours of i are `indices[indptr[i]:indptr[i+1]]`."""
        return self._csr[0]

    @property
    def indices(self) -> np.ndarray:
        """CSR column indices [2E]: every node's neighbours, ascending within a node."""
        return self._csr[1]

    def neighbors(self, node: int) -> np.ndarray:
        """Sorted neighbour ids of `node`."""
        return self.indices[self.indptr[node] : self.indptr[node + 1]]

    def degrees(self) -> np.ndarray:
        """Degree of every node, int64 [N]."""
        return np.diff(self.indptr)

    def adjacency(self) -> sp.csr_matrix:
        """0/1 adjacency matrix as float64 scipy CSR [N, N]."""
        data = np.ones(self.indices.shape[0], dtype=np.float64)
        n = self.num_nodes
        return sp.csr_matrix((data, self.indices, self.indptr), shape=(n, n))

    def is_connected(self) -> bool:
        """True when every node can reach every other node."""
        count, _ = connected_components(self.adjacency(), directed=False)
        return count == 1

    def to_networkx(self) -> nx.Graph:
        """The same graph as a `networkx.Graph` with integer nodes 0..N-1."""
        import networkx as nx

        graph = nx.Graph()
        graph.add_nodes_from(range(self.num_nodes))
        graph.add_edges_from(self.edges.tolist())
        return graph

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Topology):
            return NotImplemented
        return self.num_nodes == other.num_nodes and np.array_equal(self.edges, other.edges)

    def __hash__(self) -> int:
        return hash((self.num_nodes, self.edges.tobytes()))

    def __repr__(self) -> str:
        return f"Topology(num_nodes={self.num_nodes}, num_edges={self.num_edges})"


@dataclass(frozen=True, eq=False, repr=False)
class Links:
    """Directed communication links of one round: a model travels ``src[e] -> dst[e]``.

    ``src`` and ``dst`` are int64 ``[L]``, sorted by receiver then sender (the row order of a
    mixing matrix), without duplicates or self-links. An undirected `Topology` is the special
    case with every edge in both directions (`from_topology`).
    """

    num_nodes: int
    src: np.ndarray
    dst: np.ndarray

    def __post_init__(self) -> None:
        n = int(self.num_nodes)
        src = np.asarray(self.src, dtype=np.int64).ravel()
        dst = np.asarray(self.dst, dtype=np.int64).ravel()
        if src.shape != dst.shape:
            raise ValueError(f"src and dst must have the same length, got {src.size} and {dst.size}")
        if src.size and (min(src.min(), dst.min()) < 0 or max(src.max(), dst.max()) >= n):
            raise ValueError(f"link endpoints must lie in 0..{n - 1}")
        if np.any(src == dst):
            raise ValueError("self-links are not allowed")
        keys = dst * n + src
        if not np.all(keys[1:] > keys[:-1]):
            keys = np.sort(keys)
            keep = np.ones(keys.shape[0], dtype=bool)
            np.not_equal(keys[1:], keys[:-1], out=keep[1:])
            keys = keys[keep]
            src, dst = keys % n, keys // n
        for a in (src, dst):
            a.setflags(write=False)
        object.__setattr__(self, "num_nodes", n)
        object.__setattr__(self, "src", src)
        object.__setattr__(self, "dst", dst)

    @classmethod
    def from_topology(cls, topology: Topology) -> Links:
        """Both directions of every edge of an undirected graph."""
        dst = np.repeat(np.arange(topology.num_nodes, dtype=np.int64), topology.degrees())
        return cls(topology.num_nodes, topology.indices.astype(np.int64), dst)

    @property
    def num_links(self) -> int:
        """Number of directed links L."""
        return int(self.src.shape[0])

    @cached_property
    def in_degrees(self) -> np.ndarray:
        """Models each node receives, int64 [N]."""
        return np.bincount(self.dst, minlength=self.num_nodes).astype(np.int64)

    @cached_property
    def out_degrees(self) -> np.ndarray:
        """Models each node sends, int64 [N]."""
        return np.bincount(self.src, minlength=self.num_nodes).astype(np.int64)

    @cached_property
    def _out_csr(self) -> tuple[np.ndarray, np.ndarray]:
        order = np.argsort(self.src * self.num_nodes + self.dst, kind="stable")
        indptr = np.zeros(self.num_nodes + 1, dtype=np.int64)
        np.cumsum(self.out_degrees, out=indptr[1:])
        return indptr, self.dst[order]

    def out_neighbors(self, node: int) -> np.ndarray:
        """Sorted ids of the nodes ``node`` sends to."""
        indptr, indices = self._out_csr
        return indices[indptr[node] : indptr[node + 1]]

    @property
    def out_indptr(self) -> np.ndarray:
        """CSR row pointer [N+1] over senders: ``node`` sends to ``out_indices[out_indptr[node]:...]``."""
        return self._out_csr[0]

    @property
    def out_indices(self) -> np.ndarray:
        """Receivers grouped by sender, ascending within a sender, int64 [L]."""
        return self._out_csr[1]

    def adjacency(self) -> sp.csr_matrix:
        """0/1 matrix [N, N] with entry (dst, src) for every link (the mixing matrix pattern)."""
        n = self.num_nodes
        data = np.ones(self.num_links, dtype=np.float64)
        return sp.csr_matrix((data, (self.dst, self.src)), shape=(n, n))

    def is_symmetric(self) -> bool:
        """True when every link has its reverse (an undirected graph)."""
        n = self.num_nodes
        return np.array_equal(np.sort(self.src * n + self.dst), self.dst * n + self.src)

    def is_strongly_connected(self) -> bool:
        """True when every node can reach every other node along the links."""
        count, _ = connected_components(self.adjacency(), directed=True, connection="strong")
        return count == 1

    def undirected(self) -> Topology:
        """The graph with every link made an undirected edge."""
        return Topology(self.num_nodes, np.stack([self.src, self.dst], axis=1))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Links):
            return NotImplemented
        return (self.num_nodes == other.num_nodes and np.array_equal(self.src, other.src)
                and np.array_equal(self.dst, other.dst))

    def __hash__(self) -> int:
        return hash((self.num_nodes, self.src.tobytes(), self.dst.tobytes()))

    def __repr__(self) -> str:
        return f"Links(num_nodes={self.num_nodes}, num_links={self.num_links})"
