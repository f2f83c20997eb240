import networkx as nx
import numpy as np
import pytest

from gossamer.topology import TOPOLOGIES, Topology, make_topology

PARAMS = {
    "ring": {},
    "grid": {},
    "torus": {},
    "complete": {},
    "star": {},
    "exponential": {},
    "erdos_renyi": {"p": 0.2},
    "random_regular": {"degree": 4},
    "barabasi_albert": {"m": 2},
    "watts_strogatz": {"k": 4, "p": 0.3},
}


def same_graph(topology: Topology, graph: nx.Graph) -> bool:
    graph = nx.convert_node_labels_to_integers(graph, ordering="sorted")
    other = Topology(graph.number_of_nodes(), np.array(list(graph.edges())).reshape(-1, 2))
    return topology == other


def test_every_generator_is_covered():
    assert set(PARAMS) | {"edge_list"} == set(TOPOLOGIES.names())


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_contract_node_count_canonical_edges_determinism(name):
    topology = make_topology(name, 30, 7, **PARAMS[name])
    assert topology.num_nodes == 30
    u, v = topology.edges[:, 0], topology.edges[:, 1]
    assert np.all(u < v) and np.all((u >= 0) & (v < 30))
    keys = u * 30 + v
    assert np.all(keys[1:] > keys[:-1])
    assert topology == make_topology(name, 30, 7, **PARAMS[name])


@pytest.mark.parametrize(
    "name", ["erdos_renyi", "random_regular", "barabasi_albert", "watts_strogatz"]
)
def test_random_generators_depend_on_seed(name):
    assert make_topology(name, 60, 0, **PARAMS[name]) != make_topology(name, 60, 1, **PARAMS[name])


def test_ring():
    topology = make_topology("ring", 10, 0)
    np.testing.assert_array_equal(topology.degrees(), np.full(10, 2))
    assert same_graph(topology, nx.cycle_graph(10))
    assert make_topology("ring", 2, 0).num_edges == 1
    assert make_topology("ring", 1, 0).num_edges == 0


def test_grid_matches_networkx_and_picks_square_shape():
    topology = make_topology("grid", 12, 0, rows=3, cols=4)
    assert topology.num_edges == 3 * 3 + 2 * 4
    assert same_graph(topology, nx.grid_2d_graph(3, 4))
    assert make_topology("grid", 12, 0) == topology
    assert make_topology("grid", 12, 0, cols=4) == topology
    assert same_graph(make_topology("grid", 7, 0), nx.path_graph(7))


def test_torus_has_degree_four():
    topology = make_topology("torus", 30, 0, rows=5, cols=6)
    np.testing.assert_array_equal(topology.degrees(), np.full(30, 4))
    assert same_graph(topology, nx.grid_2d_graph(5, 6, periodic=True))
    assert make_topology("grid", 30, 0, rows=5, cols=6, periodic=True) == topology


def test_complete_and_star():
    complete = make_topology("complete", 7, 0)
    assert complete.num_edges == 7 * 6 // 2
    assert same_graph(complete, nx.complete_graph(7))
    star = make_topology("star", 7, 0)
    assert same_graph(star, nx.star_graph(6))
    np.testing.assert_array_equal(star.degrees(), [6, 1, 1, 1, 1, 1, 1])


@pytest.mark.parametrize("n", [2, 3, 10, 16, 17, 100])
def test_exponential_neighbours_are_powers_of_two_apart(n):
    topology = make_topology("exponential", n, 0)
    offsets = [2**k for k in range(int(np.floor(np.log2(n - 1))) + 1)]
    for node in (0, n // 2, n - 1):
        expected = {(node + s * o) % n for o in offsets for s in (1, -1)} - {node}
        assert set(topology.neighbors(node).tolist()) == expected


def test_exponential_degree_for_powers_of_two():
    np.testing.assert_array_equal(make_topology("exponential", 16, 0).degrees(), np.full(16, 7))
    np.testing.assert_array_equal(make_topology("exponential", 10, 0).degrees(), np.full(10, 6))


def test_erdos_renyi_extremes_and_density():
    assert make_topology("erdos_renyi", 20, 0, p=0.0).num_edges == 0
    assert make_topology("erdos_renyi", 20, 0, p=1.0) == make_topology("complete", 20, 0)
    pairs = 200 * 199 // 2
    count = make_topology("erdos_renyi", 200, 3, p=0.1).num_edges
    assert abs(count - 0.1 * pairs) < 5 * np.sqrt(pairs * 0.1 * 0.9)


def test_random_regular_is_the_design_benchmark_graph():
    topology = make_topology("random_regular", 100, 0, degree=4)
    np.testing.assert_array_equal(topology.degrees(), np.full(100, 4))
    assert same_graph(topology, nx.random_regular_graph(4, 100, seed=0))


def test_barabasi_albert_and_watts_strogatz_match_networkx():
    ba = make_topology("barabasi_albert", 50, 2, m=3)
    assert same_graph(ba, nx.barabasi_albert_graph(50, 3, seed=2))
    assert ba.num_edges == (50 - 3) * 3
    ws = make_topology("watts_strogatz", 50, 2, k=4, p=0.2)
    assert same_graph(ws, nx.watts_strogatz_graph(50, 4, 0.2, seed=2))
    lattice = make_topology("watts_strogatz", 50, 2, k=6, p=0.0)
    np.testing.assert_array_equal(lattice.degrees(), np.full(50, 6))


@pytest.mark.parametrize(
    ("name", "num_nodes", "params", "match"),
    [
        ("random_regular", 7, {"degree": 3}, "must be even"),
        ("random_regular", 10, {"degree": 10}, "degree must be in"),
        ("random_regular", 10, {"degree": 2.5}, "must be an integer"),
        ("erdos_renyi", 10, {"p": 1.5}, r"\[0, 1\]"),
        ("erdos_renyi", 10, {"p": -0.1}, r"\[0, 1\]"),
        ("erdos_renyi", 10, {"p": "high"}, "must be a number"),
        ("watts_strogatz", 10, {"k": 3, "p": 0.1}, "k must be even"),
        ("watts_strogatz", 10, {"k": 10, "p": 0.1}, "k must be even"),
        ("barabasi_albert", 10, {"m": 0}, "m must be in"),
        ("barabasi_albert", 10, {"m": 10}, "m must be in"),
        ("grid", 12, {"rows": 5}, "rows \\* cols"),
        ("grid", 12, {"rows": 3, "cols": 3}, "rows \\* cols"),
        ("ring", 10, {"degree": 2}, "unknown parameter.*degree"),
        ("erdos_renyi", 10, {}, "needs parameter.*p"),
        ("ring", 0, {}, "num_nodes must be >= 1"),
        ("ring", 2.0, {}, "num_nodes must be an integer"),
    ],
)
def test_user_errors_are_one_line_value_errors(name, num_nodes, params, match):
    with pytest.raises(ValueError, match=match) as info:
        make_topology(name, num_nodes, 0, **params)
    assert "\n" not in str(info.value)
    assert name in str(info.value)


def test_seed_must_be_an_integer():
    with pytest.raises(ValueError, match="seed must be an integer"):
        make_topology("random_regular", 10, None, degree=4)


def test_unknown_topology_lists_known_names():
    with pytest.raises(KeyError, match="ring"):
        make_topology("hypercube", 8, 0)
