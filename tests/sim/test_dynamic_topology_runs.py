"""Decentralized drivers on dynamic topologies, and the DL metrics (bytes per node, ...)."""

import numpy as np
import pytest
import torch

from gossamer import config
from gossamer.sim.drivers import driver_for
from gossamer.sim.drivers.gossip import GossipDriver
from gossamer.sim.drivers.modest import ModestDriver
from gossamer.sim.drivers.sync_dl import SyncDLDriver
from gossamer.sim.experiment import build_experiment
from tests.conftest import run_split, small_config

DYNAMIC = {
    "resampled_regular": {"name": "random_regular", "params": {"degree": 3}, "resample": "every_round"},
    "one_peer_exponential": {"name": "one_peer_exponential"},
    "peer_sampling": {"name": "peer_sampling", "params": {"view_size": 2}, "mixing": "uniform_neighbor"},
}


def _driver(cfg):
    exp = build_experiment(config.validate(cfg))
    return driver_for(exp.algorithm.pattern)(exp)


@pytest.mark.parametrize("kind", sorted(DYNAMIC))
def test_dpsgd_learns_on_each_dynamic_topology_with_the_round_graph(kind):
    d = _driver(small_config("dpsgd", topology=DYNAMIC[kind]))
    first = d.evaluate()
    for r in range(1, 5):
        d.run_round()
        links = d.exp.dynamic.links(r)
        assert np.array_equal(d.graph.src, links.src) and np.array_equal(d.graph.dst, links.dst)
    row = d.evaluate()
    assert row["test_accuracy"] > first["test_accuracy"] + 0.2
    assert d.bytes_up == sum(d.exp.dynamic.links(r).num_links for r in range(1, 5)) * d.exp.message_bytes
    summary = d.summary()
    assert summary["spectral_gap_rounds"] == 3 and 0 < summary["spectral_gap"] <= 1


def test_one_peer_exponential_reaches_exact_consensus_in_log2_n_rounds():
    cfg = small_config("dpsgd", topology={"name": "one_peer_exponential"})
    cfg["model"]["init"] = "independent"
    d = _driver(cfg)
    d.has_data[:] = False                                  # no training: only mixing moves models
    mean = d.params.double().mean(0)
    assert d.evaluate()["consensus_distance"] > 0.1
    for _ in range(3):
        d.run_round()
    assert torch.allclose(d.params.double(), mean.expand_as(d.params), atol=1e-5)
    assert d.evaluate()["consensus_distance"] < 1e-9


def test_static_topology_keeps_its_one_mixing_matrix():
    d = _driver(small_config("dpsgd"))
    d.run_round()
    assert d.mixing is d.exp.mixing and d.exp.dynamic is None


@pytest.mark.parametrize("kind", ["resampled_regular", "peer_sampling"])
def test_dynamic_run_resumes_identically(tmp_path, kind):
    rest = run_split(small_config("dpsgd", topology=DYNAMIC[kind]), tmp_path, split=4, total=6)
    if kind == "peer_sampling":                            # the views came from the checkpoint
        assert rest.exp.dynamic.state_dict()["round"] == 4
    rest.run()
    assert (tmp_path / "a/metrics.csv").read_bytes() == (tmp_path / "b/metrics.csv").read_bytes()


@pytest.mark.parametrize("kind", ["one_peer_exponential", "peer_sampling"])
def test_gossip_picks_peers_from_the_round_graph(kind):
    d = _driver(small_config("gossip", topology=DYNAMIC[kind]))
    assert isinstance(d, GossipDriver)
    for period in range(3):
        d.round = period
        links = d.exp.dynamic.links(period + 1)
        for node in range(8):
            for k in range(4):
                assert d._peer(node, k) in links.out_neighbors(node)
    d.round = 0
    for _ in range(3):
        d.run_round()
    assert d.node_bytes.sum() == d.bytes_up + d.bytes_down > 0


# --- bytes per node -----------------------------------------------------------------------------
def test_bytes_per_node_on_a_hand_checked_star(tmp_path):
    path = tmp_path / "star.txt"
    path.write_text("0 1\n0 2\n0 3\n")
    cfg = small_config("dpsgd", topology={"name": "edge_list", "params": {"path": str(path)}},
                       partition={"name": "iid", "num_nodes": 4})
    d = _driver(cfg)
    assert isinstance(d, SyncDLDriver)
    mb = d.exp.message_bytes
    for _ in range(2):
        d.run_round()
    row = d.evaluate()
    # Per round the hub sends 3 models and receives 3; each leaf sends 1 and receives 1.
    assert d.node_bytes.tolist() == [12 * mb, 4 * mb, 4 * mb, 4 * mb]
    assert row["bytes_per_node_mean"] == 6 * mb and row["bytes_per_node_max"] == 12 * mb
    assert d.summary()["max_bytes_per_node"] == 12 * mb


def test_bytes_per_node_on_a_ring_with_an_offline_node():
    cfg = small_config("dpsgd", partition={"name": "iid", "num_nodes": 4})
    d = _driver(cfg)
    mb = d.exp.message_bytes
    online = np.array([True, True, False, True])
    d.exp.online = lambda t: online.copy()
    d.run_round()
    # Ring 0-1-2-3-0 with node 2 down: links 0<->1 and 3<->0 remain.
    assert d.node_bytes.tolist() == [4 * mb, 2 * mb, 0, 2 * mb]
    assert d.evaluate()["bytes_per_node_mean"] == 2 * mb


def test_modest_reports_bytes_per_node():
    cfg = small_config("modest", topology={"name": "ring"}, partition={"name": "iid", "num_nodes": 12})
    cfg["algorithm"]["params"] = {"sample_size": 4, "aggregators": 2}
    d = _driver(cfg)
    assert isinstance(d, ModestDriver)
    for _ in range(4):
        d.run_round()
    row = d.evaluate()
    assert d.node_bytes.sum() == d.bytes_up + d.bytes_down > 0
    assert row["bytes_per_node_mean"] == pytest.approx(d.node_bytes.mean())
    assert row["bytes_per_node_max"] == d.node_bytes.max() > row["bytes_per_node_mean"]
