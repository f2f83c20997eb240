"""Dynamic topologies: re-drawn random graphs, one-peer exponential, peer sampling, directed mixing."""

import numpy as np
import pytest

from gossamer import config
from gossamer.config import ConfigError
from gossamer.sim.experiment import build_experiment
from gossamer.topology import (
    Links,
    jointly_connected,
    make_dynamic,
    make_topology,
    metropolis_hastings,
    mixing_matrix,
    uniform_neighbor,
    window_spectral_gap,
)
from tests.conftest import small_config


# --- re-drawn random regular graph ----------------------------------------------------------------
def test_resampled_regular_graph_is_regular_every_round_and_changes():
    dyn = make_dynamic("random_regular", 30, seed=3, resample="every_round", degree=4)
    graphs = [dyn.graph(r) for r in range(1, 6)]
    for g in graphs:
        assert np.all(g.degrees() == 4) and g.num_edges == 60
    assert all(graphs[k] != graphs[k + 1] for k in range(4))


def test_resampled_graph_is_a_pure_function_of_seed_and_round():
    a = make_dynamic("random_regular", 30, seed=3, resample="every_round", degree=4)
    b = make_dynamic("random_regular", 30, seed=3, resample="every_round", degree=4)
    assert a.graph(7) == b.graph(7) == a.graph(7)
    a.graph(2)
    assert a.graph(7) == b.graph(7)                           # asking out of order changes nothing
    other = make_dynamic("random_regular", 30, seed=4, resample="every_round", degree=4)
    assert other.graph(7) != a.graph(7)


def test_static_config_is_not_dynamic():
    assert make_dynamic("random_regular", 10, 0, degree=4) is None


# --- one-peer exponential ---------------------------------------------------------------------------
@pytest.mark.parametrize("n", [2, 8, 12])
def test_one_peer_exponential_matches_its_definition(n):
    dyn = make_dynamic("one_peer_exponential", n, 0)
    tau = int(np.ceil(np.log2(n)))
    assert dyn.window == tau
    for r in range(1, 2 * tau + 2):
        links = dyn.links(r)
        hop = 2 ** ((r - 1) % tau)
        assert sorted(zip(links.dst.tolist(), links.src.tolist(), strict=True)) == [(i, (i + hop) % n) for i in range(n)]
        assert np.all(links.in_degrees == 1) and np.all(links.out_degrees == 1)


@pytest.mark.parametrize("rule", ["metropolis_hastings", "uniform_neighbor"])
def test_one_peer_exponential_averages_exactly_over_log2_n_rounds(rule):
    n = 16
    dyn = make_dynamic("one_peer_exponential", n, 0)
    product = np.eye(n)
    for r in range(1, 5):
        w = mixing_matrix(rule, dyn.graph(r)).toarray()
        assert np.allclose(w.sum(0), 1) and np.allclose(w.sum(1), 1)      # doubly stochastic
        assert np.allclose(np.diag(w), 0.5)
        product = w @ product
    assert np.allclose(product, np.full((n, n), 1 / n), atol=1e-12)
    assert window_spectral_gap(dyn, lambda g: mixing_matrix(rule, g)) == 1.0


# --- peer sampling ------------------------------------------------------------------------------------
def test_peer_sampling_views_have_the_size_exclude_self_and_change():
    n, c = 30, 4
    dyn = make_dynamic("peer_sampling", n, 5, view_size=c)
    previous = dyn.views(0)
    for r in range(1, 11):
        views = dyn.views(r)
        assert views.shape == (n, c)
        assert np.all(views != np.arange(n)[:, None])
        assert np.all(np.diff(views, axis=1) > 0)                            # distinct
        assert (views != previous).any(axis=1).mean() > 0.5                  # most views move
        previous = views
        links = dyn.links(r)
        assert np.all(links.out_degrees == c)


def test_peer_sampling_picks_every_node_about_uniformly():
    n, c, rounds = 40, 4, 200
    dyn = make_dynamic("peer_sampling", n, 0, view_size=c)
    counts = sum(np.bincount(dyn.views(r).ravel(), minlength=n) for r in range(1, rounds + 1))
    expected = rounds * c                                                    # N c entries over N nodes
    assert counts.min() > 0.8 * expected and counts.max() < 1.2 * expected


def test_peer_sampling_replays_and_restores_its_state():
    a = make_dynamic("peer_sampling", 25, 1, view_size=3)
    b = make_dynamic("peer_sampling", 25, 1, view_size=3)
    later = a.views(9).copy()
    assert np.array_equal(a.views(4), b.views(4))                            # earlier round: replayed
    assert np.array_equal(a.views(9), later)                                 # state not moved by it
    c = make_dynamic("peer_sampling", 25, 1, view_size=3)
    c.load_state_dict(b.state_dict())                                        # b is at round 4
    assert np.array_equal(c.views(9), later)


def test_peer_sampling_window_union_is_connected():
    assert jointly_connected(make_dynamic("peer_sampling", 64, 0, view_size=2))


# --- links and directed mixing ------------------------------------------------------------------------
def test_links_of_an_undirected_graph_give_the_same_mixing():
    topo = make_topology("random_regular", 20, 0, degree=3)
    links = Links.from_topology(topo)
    assert links.is_symmetric() and links.num_links == 2 * topo.num_edges
    assert links.undirected() == topo
    for rule in (metropolis_hastings, uniform_neighbor):
        assert abs(rule(links) - rule(topo)).max() < 1e-15


def test_uniform_mixing_on_links_averages_own_and_received_models():
    links = Links(4, np.array([1, 2, 3, 0]), np.array([0, 0, 0, 1]))      # 1,2,3 -> 0 and 0 -> 1
    w = uniform_neighbor(links).toarray()
    assert np.allclose(w[0], [0.25, 0.25, 0.25, 0.25])
    assert np.allclose(w[1], [0.5, 0.5, 0, 0])
    assert np.allclose(w[2], [0, 0, 1, 0]) and np.allclose(w[3], [0, 0, 0, 1])
    assert not links.is_symmetric() and list(links.out_neighbors(0)) == [1]
    mh = metropolis_hastings(links).toarray()                               # 1 / (1 + max(in_i, out_j))
    assert np.allclose(mh[0], [1 - 3 / 4, 1 / 4, 1 / 4, 1 / 4]) and np.allclose(mh[1], [1 / 2, 1 / 2, 0, 0])


def test_links_are_canonical():
    links = Links(3, np.array([2, 1, 2]), np.array([0, 0, 0]))
    assert links.src.tolist() == [1, 2] and links.dst.tolist() == [0, 0]
    with pytest.raises(ValueError, match="self-links"):
        Links(3, np.array([1]), np.array([1]))


# --- config and build checks ----------------------------------------------------------------------------
def _dl(topology: dict, nodes: int = 8) -> dict:
    return small_config("dpsgd", topology=topology, partition={"name": "iid", "num_nodes": nodes})


@pytest.mark.parametrize("topology, nodes, message", [
    ({"name": "ring", "resample": "every_round"}, 8, "topology.resample: every_round re-draws a random graph, but ring"),
    ({"name": "random_regular", "resample": "hourly"}, 8, "topology.resample: Input should be 'never' or 'every_round'"),
    ({"name": "one_peer_exponential", "resample": "every_round"}, 8, "topology.resample: one_peer_exponential changes"),
    ({"name": "peer_sampling", "params": {"view_size": 8}}, 8, "topology.params: topology 'peer_sampling': view_size must be in [1, 7]"),
    ({"name": "peer_sampling"}, 8, "topology.params: topology 'peer_sampling' needs parameter(s) view_size"),
    ({"name": "one_peer_exponential", "params": {"k": 1}}, 8, "topology.params: topology 'one_peer_exponential' got unknown"),
    ({"name": "random_regular", "params": {"degree": 3}, "resample": "every_round"}, 9,
     "topology.params: topology 'random_regular': degree * num_nodes must be even"),
    ({"name": "erdos_renyi", "params": {"p": 0.0}, "resample": "every_round"}, 8,
     "topology: erdos_renyi with 8 nodes: the union of rounds 1..3 is disconnected"),
])
def test_user_errors_name_the_field(topology, nodes, message):
    with pytest.raises(ConfigError) as err:
        build_experiment(config.validate(_dl(topology, nodes)))
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_a_round_may_be_disconnected_if_the_window_is_not():
    # N = 8, round 3 of one-peer exponential pairs i with i + 4: four separate pairs.
    exp = build_experiment(config.validate(_dl({"name": "one_peer_exponential"})))
    assert not exp.dynamic.links(3).undirected().is_connected()
    assert exp.topology.is_connected() and exp.mixing is None


def test_edge_list_is_selectable_from_config(tmp_path):
    path = tmp_path / "graph.txt"
    path.write_text("# a path\n0 1\n1 2\n2 3\n")
    exp = build_experiment(config.validate(_dl({"name": "edge_list", "params": {"path": str(path)}}, 4)))
    assert exp.topology.num_edges == 3 and exp.dynamic is None


def test_robust_merge_is_checked_against_the_fewest_models_received_in_a_window():
    cfg = _dl({"name": "one_peer_exponential"})
    cfg["algorithm"]["params"] = {"aggregator": "trimmed_mean", "aggregator_params": {"f": 1}}
    with pytest.raises(ConfigError, match=r"algorithm.params.aggregator: trimmed_mean cannot run on 2 models "
                                          r"at the least connected node of rounds 1..3"):
        build_experiment(config.validate(cfg))
