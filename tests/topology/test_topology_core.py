import networkx as nx
import numpy as np
import pytest

from gossamer.topology import Topology


def path(n: int) -> Topology:
    return Topology(n, np.stack([np.arange(n - 1), np.arange(1, n)], axis=1))


def test_edges_are_canonicalised_and_read_only():
    topology = Topology(4, np.array([[2, 1], [1, 2], [3, 0], [0, 3], [1, 3]]))
    np.testing.assert_array_equal(topology.edges, [[0, 3], [1, 2], [1, 3]])
    assert topology.edges.dtype == np.int64
    assert topology.num_edges == 3
    with pytest.raises(ValueError):
        topology.edges[0, 0] = 1


def test_empty_edge_list_gives_isolated_nodes():
    topology = Topology(3, np.empty((0, 2)))
    assert topology.edges.shape == (0, 2)
    np.testing.assert_array_equal(topology.degrees(), [0, 0, 0])
    assert not topology.is_connected()


@pytest.mark.parametrize(
    ("num_nodes", "edges"),
    [(3, [[0, 0]]), (3, [[0, 3]]), (3, [[-1, 2]]), (0, []), (2.5, [])],
)
def test_invalid_graphs_are_rejected(num_nodes, edges):
    with pytest.raises(ValueError):
        Topology(num_nodes, np.array(edges))


def test_csr_neighbours_match_networkx():
    graph = nx.gnm_random_graph(40, 120, seed=3)
    topology = Topology(40, np.array(list(graph.edges())))
    for node in range(40):
        np.testing.assert_array_equal(topology.neighbors(node), sorted(graph.neighbors(node)))
    np.testing.assert_array_equal(topology.degrees(), [graph.degree(i) for i in range(40)])
    assert topology.indptr[-1] == 2 * topology.num_edges
    assert topology.indptr is topology.indptr  # built once


def test_adjacency_is_symmetric_zero_one():
    adjacency = path(4).adjacency().toarray()
    expected = np.array([[0, 1, 0, 0], [1, 0, 1, 0], [0, 1, 0, 1], [0, 0, 1, 0]])
    np.testing.assert_array_equal(adjacency, expected)


def test_connectivity():
    assert path(5).is_connected()
    assert Topology(1, np.empty((0, 2))).is_connected()
    assert not Topology(4, np.array([[0, 1], [2, 3]])).is_connected()


def test_to_networkx_keeps_isolated_nodes():
    graph = Topology(4, np.array([[0, 1]])).to_networkx()
    assert sorted(graph.nodes()) == [0, 1, 2, 3]
    assert sorted(graph.edges()) == [(0, 1)]


def test_equality_and_hash_follow_the_edge_set():
    a = Topology(3, np.array([[0, 1], [1, 2]]))
    b = Topology(3, np.array([[2, 1], [1, 0]]))
    assert a == b and hash(a) == hash(b)
    assert a != Topology(3, np.array([[0, 1]]))
    assert a != Topology(4, np.array([[0, 1], [1, 2]]))
    assert "num_edges=2" in repr(a)
