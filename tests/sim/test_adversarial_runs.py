"""Attacks, robust merging and fault models as the drivers apply them."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from gossamer import config
from gossamer.config import ConfigError
from gossamer.sim.drivers.gossip import GossipDriver
from gossamer.sim.drivers.sync_dl import SyncDLDriver
from gossamer.sim.drivers.sync_fl import SyncFLDriver
from gossamer.sim.experiment import build_experiment
from gossamer.sim.gathered import MergeStats, gathered_merge
from gossamer.topology import make_topology, metropolis_hastings
from tests.conftest import run_split, small_config


def _cfg(name, /, **sections):
    cfg = small_config(name)
    cfg.update(sections)
    return cfg


def _exp(cfg):
    return build_experiment(config.validate(cfg))


# --- FL ------------------------------------------------------------------------------------------
def test_fl_ipm_attackers_send_exactly_the_crafted_update():
    cfg = _cfg("fedavg", algorithm={"name": "fedavg", "params": {"weighting": "uniform"}},
                       adversary={"attack": "ipm", "nodes": [0, 1], "params": {"epsilon": 0.5}})
    exp = _exp(cfg)
    start = exp.init_params.clone()
    ids = np.arange(8)
    honest = exp.trainer.train(start.expand(8, -1), ids, 1).params[2:] - start     # same keys: round 1
    driver = SyncFLDriver(exp)
    driver.run_round()
    crafted = -0.5 * honest.double().mean(0)
    expected = start.double() + (honest.double().sum(0) + 2 * crafted) / 8
    assert torch.allclose(driver.state.params.double(), expected, atol=1e-6)


def test_fl_sign_flip_breaks_the_mean_but_not_the_median():
    def final(aggregator, attack=True):
        cfg = _cfg("fedavg", algorithm={"name": "fedavg", "params": {"aggregator": aggregator}})
        if attack:
            cfg["adversary"] = {"attack": "sign_flip", "fraction": 0.25, "params": {"scale": 4.0}}
        cfg["partition"]["num_nodes"] = 12
        cfg["stop"] = {"rounds": 8}
        driver = SyncFLDriver(_exp(cfg))
        for _ in range(8):
            driver.run_round()
        return driver.evaluate()["test_accuracy"]

    clean = final("mean", attack=False)
    assert clean > 0.55
    assert final("mean") < 0.3
    assert final("median") > clean - 0.1


def test_label_flip_poisons_only_the_attackers_shards():
    cfg = _cfg("fedavg", adversary={"attack": "label_flip", "nodes": [3]})
    exp = _exp(cfg)
    clean = exp.dataset.y_train
    changed = np.flatnonzero((exp.trainer.y != clean).numpy())
    assert set(changed) <= set(exp.shards[3].tolist())
    assert torch.equal(exp.trainer.y[exp.shards[3]], 9 - clean[exp.shards[3]])


def test_fl_partition_keeps_cut_off_clients_out():
    cfg = _cfg("fedavg", faults={"partitions": [{"at_s": 0.0, "nodes": [[0, 1, 2, 3, 4], [5, 6, 7]]}]})
    driver = SyncFLDriver(_exp(cfg))
    driver.run_round()
    assert driver.participants == 5


def test_fl_lost_uploads_are_not_aggregated():
    cfg = _cfg("fedavg", faults={"message_loss": {"prob": 0.5}})
    driver = SyncFLDriver(_exp(cfg))
    for _ in range(4):
        driver.run_round()
    assert driver.lost > 0
    assert driver.bytes_up < driver.bytes_down or driver.lost > 0


@pytest.mark.parametrize("params, field", [
    ({"attack": "sign_flip", "fraction": 1.5}, "adversary.fraction"),
    ({"attack": "nope", "fraction": 0.2}, "adversary.attack"),
    ({"attack": "sign_flip"}, "adversary"),
    ({"attack": "ipm", "fraction": 0.2, "params": {"epsilon": -1}}, "adversary.params"),
    ({"attack": "ipm", "nodes": [99]}, "adversary.nodes"),
])
def test_bad_adversary_configs_are_one_line_errors(params, field):
    with pytest.raises(ConfigError) as err:
        _exp(_cfg("fedavg", adversary=params))
    assert str(err.value).startswith(field) and "\n" not in str(err.value)


def test_aggregator_requirements_are_checked_when_the_run_is_built():
    cfg = _cfg("fedavg", algorithm={"name": "fedavg", "params": {"aggregator": "bulyan",
                                                                          "aggregator_params": {"f": 2}}})
    with pytest.raises(ConfigError, match="algorithm.params.aggregator: bulyan cannot run on 8 clients"):
        _exp(cfg)
    cfg = _cfg("dpsgd", algorithm={"name": "dpsgd", "params": {"aggregator": "krum",
                                                                        "aggregator_params": {"f": 1}}})
    with pytest.raises(ConfigError, match="krum cannot run on 3 models"):     # ring: own + 2
        _exp(cfg)


# --- DL: the gathered merge ---------------------------------------------------------------------------
def _graph(n=9, seed=3):
    topo = make_topology("erdos_renyi", n, seed, p=0.5)
    return topo, metropolis_hastings(topo)


def test_gathered_mean_equals_the_sparse_product():
    topo, w = _graph()
    x = torch.randn(9, 5)
    got = gathered_merge(w, x, np.arange(9), aggregator="mean", params={})
    assert torch.allclose(got, torch.from_numpy(w @ x.double().numpy()).float(), atol=1e-6)


def test_gathered_median_is_each_nodes_median_of_what_it_holds():
    topo, w = _graph()
    x = torch.randn(9, 4)
    got = gathered_merge(w, x, np.arange(9), aggregator="median", params={})
    for i in range(9):
        held = x[[i, *topo.indices[topo.indptr[i]:topo.indptr[i + 1]]]]
        assert torch.allclose(got[i], held.double().median(0).values.float() if len(held) % 2
                              else held.double().quantile(0.5, dim=0).float(), atol=1e-6)


def test_byzantine_neighbour_can_send_each_receiver_a_different_model():
    topo, w = _graph()
    x = torch.zeros(9, 3)
    byz = np.zeros(9, dtype=bool)
    byz[0] = True
    seen = {}

    def corrupt(held, own, mask, key):
        held = held.clone()
        receivers = own[:, 0].long().tolist()
        for g, r in enumerate(receivers):
            if mask[g].any():
                held[g, torch.from_numpy(mask[g])] = float(r + 100)
                seen[r] = True
        return held

    x[:, 0] = torch.arange(9).float()                  # coordinate 0 names the receiver
    got = gathered_merge(w, x, np.arange(1, 9), aggregator="mean", params={}, byzantine=byz,
                         corrupt=corrupt)
    nbrs_of_0 = set(topo.indices[topo.indptr[0]:topo.indptr[1]].tolist())
    assert set(seen) == nbrs_of_0
    for j, i in enumerate(range(1, 9)):
        expected = float(w.getrow(i).toarray()[0] @ x[:, 0].double().numpy())
        if i in nbrs_of_0:
            expected += w[i, 0] * (i + 100 - 0.0)      # node 0's row replaced by i + 100
        assert got[j, 0].item() == pytest.approx(expected, abs=1e-5)


def _uniform_noise(updates, byzantine, *, generator=None, scale=1.0):
    """A plugin attack that draws from its generator (registered with ``draws=True``)."""
    return scale * torch.rand((int(byzantine.sum()), updates.shape[-1]), generator=generator, dtype=torch.float64)


@pytest.mark.parametrize("attack, params", [("gaussian", {"sigma": 3.0}), ("uniform_noise_plugin", {"scale": 2.0})])
def test_a_random_attack_draws_for_each_receiver_alone(attack, params, monkeypatch):
    """A Byzantine neighbour's draws (Gaussian, or a plugin registered with ``draws=True``) are
    keyed by the receiver, so merging the receivers in one call, one by one, or over held rows
    renumbered (as a rank's halo holds them) gives each the same model: what lets ranks merge
    their own nodes."""
    import gossamer
    from gossamer.attacks import ATTACKS, core
    from gossamer.attacks.adversary import Adversary

    for table in (ATTACKS._items, core._CHECKS):       # the plugin is gone after the test
        monkeypatch.setitem(table, "uniform_noise_plugin", None)
    monkeypatch.setattr(core, "_DRAWS", set(core._DRAWS))
    gossamer.register_attack("uniform_noise_plugin", replace=True, draws=True,
                             scale=(lambda v: v > 0, "a number > 0"))(_uniform_noise)
    assert core.draws("uniform_noise_plugin") and core.draws("gaussian") and not core.draws("alie")
    topo, w = _graph()
    x = torch.randn(9, 6)
    byz = np.zeros(9, dtype=bool)
    byz[[0, 4]] = True
    adv = Adversary(attack, byz, params, seed=5)

    def corrupt(held, own, mask, who):
        return adv.corrupt(held, own, mask, 2, keys=who)

    receivers = np.flatnonzero(~byz)
    together = gathered_merge(w, x, receivers, aggregator="median", params={}, byzantine=byz, corrupt=corrupt)
    alone = torch.cat([gathered_merge(w, x, np.array([i]), aggregator="median", params={}, byzantine=byz,
                                      corrupt=corrupt) for i in receivers])
    assert torch.equal(together, alone)
    order = np.random.default_rng(0).permutation(9)          # row k of the held rows is node order[k]
    where = np.argsort(order)
    moved = sp.csr_matrix(w)[order][:, order]
    renumbered = gathered_merge(moved, x[torch.from_numpy(order)], where[receivers], aggregator="median",
                                params={}, byzantine=byz, corrupt=corrupt, ids=order)
    assert torch.equal(renumbered, together)
    clean = gathered_merge(w, x, receivers, aggregator="median", params={})
    assert not torch.equal(together, clean)                   # the attack did change merges


def test_merge_is_skipped_where_the_rule_cannot_run():
    w = sp.csr_matrix(np.array([[0.5, 0.5, 0], [0.5, 0.25, 0.25], [0, 0.5, 0.5]]))
    stats = MergeStats()
    x = torch.randn(3, 2)
    got = gathered_merge(w, x, np.arange(3), aggregator="krum", params={"f": 1}, stats=stats)
    assert stats.skipped == 3 and torch.equal(got, x)


# --- DL: faults in the synchronous driver -------------------------------------------------------------
def test_scheduled_removal_applies_at_the_first_round_starting_at_or_after_its_time():
    cfg = _cfg("dpsgd", faults={"events": [{"at_s": 0.0, "action": "remove", "nodes": [2]},
                                                   {"at_s": 1e-9, "action": "remove", "nodes": [5]}]})
    driver = SyncDLDriver(_exp(cfg))
    driver.run_round()                                    # starts at t = 0
    assert driver.last_online.sum() == 7 and not driver.last_online[2]
    driver.run_round()
    assert driver.last_online.sum() == 6 and not driver.last_online[5]


def test_node_whose_neighbours_are_all_gone_trains_alone_and_metrics_say_so():
    cfg = _cfg("dpsgd", faults={"events": [{"at_s": 0.0, "action": "remove", "nodes": [1, 7]}]})
    driver = SyncDLDriver(_exp(cfg))
    before = driver.params[0].clone()
    driver.run_round()
    row = driver.evaluate()
    assert row["isolated"] == 1 and row["online"] == 6
    assert not torch.equal(driver.params[0], before)        # it kept training
    assert torch.isfinite(driver.params).all()


@pytest.mark.parametrize("rejoin", ["resume", "fresh"])
def test_rejoining_node_has_the_state_the_config_promises(rejoin):
    cfg = _cfg("dpsgd", faults={"rejoin": rejoin, "events": [
        {"at_s": 0.0, "action": "remove", "nodes": [4]}, {"at_s": 1e-9, "action": "restore"}]})
    exp = _exp(cfg)
    driver = SyncDLDriver(exp)
    driver.run_round()                                    # node 4 is away
    stale = driver.params[4].clone()
    seen = {}
    train = exp.trainer.train

    def spy(params, nodes, keys, inplace=False):
        seen["row"] = params[list(nodes).index(4)].clone()
        return train(params, nodes, keys, inplace=inplace)

    exp.trainer.train = spy
    driver.run_round()                                    # node 4 is back
    expected = exp.init_params if rejoin == "fresh" else stale
    assert torch.equal(seen["row"], expected)


def test_message_loss_in_dl_counts_sent_but_not_received_bytes():
    cfg = _cfg("dpsgd", faults={"message_loss": {"prob": 0.3}})
    driver = SyncDLDriver(_exp(cfg))
    for _ in range(3):
        driver.run_round()
    assert driver.lost > 0
    assert driver.bytes_up - driver.bytes_down == driver.lost * driver.exp.message_bytes
    rows = driver.params.sum(1)
    assert torch.isfinite(rows).all()


def test_dl_partition_stops_models_crossing_until_it_heals():
    cfg = _cfg("dpsgd", faults={"partitions": [
        {"at_s": 0.0, "heal_s": 1e6, "nodes": [[0, 1, 2, 3], [4, 5, 6, 7]]}]})
    cfg["model"]["init"] = "independent"
    exp = _exp(cfg)
    exp.trainer.sizes[:] = 0                             # no training: only mixing moves models
    exp.trainer.sizes[:] = exp.trainer.sizes
    driver = SyncDLDriver(exp)
    driver.has_data[:] = False
    mean_a = driver.params[:4].double().mean(0)
    for _ in range(3):
        driver.run_round()
    assert torch.allclose(driver.params[:4].double().mean(0), mean_a, atol=1e-5)   # mass stays in group A


def test_dl_attack_and_robust_merge_run_resume_identically(tmp_path):

    cfg = _cfg("dpsgd", algorithm={"name": "dpsgd", "params": {"aggregator": "trimmed_mean",
                                                                        "aggregator_params": {"f": 1}}},
                       topology={"name": "random_regular", "params": {"degree": 4}},
                       adversary={"attack": "alie", "fraction": 0.25},
                       faults={"message_loss": {"prob": 0.1}, "stragglers": {"fraction": 0.25, "factor": 3}})
    cfg["output"] = {"progress": False, "checkpoint_every": 2}
    run_split(cfg, tmp_path, split=4, total=6).run()
    assert (tmp_path / "a/metrics.csv").read_bytes() == (tmp_path / "b/metrics.csv").read_bytes()


# --- gossip -------------------------------------------------------------------------------------------
def test_gossip_with_faults_and_attackers_is_deterministic_and_drops_lost_messages():
    cfg = _cfg("gossip", adversary={"attack": "sign_flip", "nodes": [0]},
                       faults={"message_loss": {"prob": 0.2}, "rejoin": "fresh",
                               "churn": {"fraction": 0.5, "on_s": {"dist": "exponential", "mean": 2.0},
                                         "off_s": {"dist": "exponential", "mean": 1.0}}})

    def run():
        driver = GossipDriver(_exp(cfg))
        for _ in range(4):
            driver.run_round()
        return driver, driver.evaluate()

    (a, row_a), (b, row_b) = run(), run()
    assert row_a == row_b and torch.equal(a.params, b.params)
    assert a.dropped > 0 and torch.isfinite(a.params).all()
