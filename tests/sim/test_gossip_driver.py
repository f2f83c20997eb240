"""The asynchronous gossip driver: clock rates (DADAO dual clocks), busy semantics, exact resume,
vectorized peer choice."""

import io

import numpy as np
import pytest
import torch
from scipy import stats

from gossamer import config
from gossamer.sim.drivers.gossip import TICK, WAKE, GossipDriver
from gossamer.sim.experiment import build_experiment
from tests.conftest import small_config


def _driver(nodes=64, sample_time=1e-4, **params) -> GossipDriver:
    cfg = small_config("gossip", model={"name": "logreg"},
                       partition={"name": "iid", "num_nodes": nodes})
    cfg["algorithm"]["params"] = {"mode": "push", "merge": "average", **params}
    cfg["local"] = {"steps": 1, "batch_size": 16, "lr": 0.05}
    cfg["system"] = {"sample_time_s": {"dist": "constant", "value": sample_time},
                     "latency_s": {"dist": "constant", "value": 0.05}}
    return GossipDriver(build_experiment(config.validate(cfg)))


def _ticks(driver: GossipDriver, kind: int) -> np.ndarray:
    """Ticks fired per node: each node's pending tick of a clock carries its index."""
    counts = np.full(driver.exp.num_nodes, -1)
    for event in driver.heap:
        if event[2] == kind:
            counts[event[3]] = event[4]
    return counts


def test_poisson_clocks_fire_at_the_configured_rates():
    driver = _driver(period_s=0.5, clocks="dual", compute_period_s=0.25)
    for _ in range(40):                                   # 20 simulated seconds
        driver.run_round()
    horizon, nodes = driver.sim_time, driver.exp.num_nodes
    for kind, rate in ((WAKE, 2.0), (TICK, 4.0)):
        counts = _ticks(driver, kind)
        expected = rate * horizon
        # total count: Poisson(N * rate * T); within 3 standard deviations
        assert abs(counts.sum() - nodes * expected) < 3 * np.sqrt(nodes * expected)
        # per node counts are Poisson: the dispersion statistic is chi-square with N dof
        dispersion = ((counts - expected) ** 2 / expected).sum()
        assert 0.01 < stats.chi2.sf(dispersion, nodes) < 0.99


def test_periodic_clocks_fire_once_per_period_after_a_random_phase():
    driver = _driver(nodes=16, period_s=0.5, poisson=False, clocks="dual", compute_period_s=0.2)
    for _ in range(10):
        driver.run_round()
    for kind, period in ((WAKE, 0.5), (TICK, 0.2)):
        counts = _ticks(driver, kind)
        assert np.all(np.abs(counts - driver.sim_time / period) <= 1)


def test_compute_ticks_that_find_the_node_busy_are_skipped():
    # ticks at rate 10/s, each local update takes 0.1 s: updates at rate 10 / (1 + 10 * 0.1) = 5/s
    driver = _driver(nodes=32, sample_time=0.1 / 16, period_s=1.0, clocks="dual", compute_period_s=0.1)
    for _ in range(20):
        driver.run_round()
    updates = driver.node_steps                            # one SGD step per local update
    assert updates == pytest.approx(32 * 20 * 5.0, rel=0.06)
    assert driver.compute_skipped == pytest.approx(_ticks(driver, TICK).sum() - updates, abs=32)
    assert (driver.updates <= 20 / 0.1 + 1).all()


def test_dual_clock_gossip_resumes_exactly_from_a_checkpoint():
    params = dict(mode="push_pull", merge="variance_corrected", clocks="dual", compute_period_s=0.3,
                  period_s=0.5)
    cfg = small_config("gossip", model={"name": "mlp", "params": {"hidden": [8]}, "init": "independent"})
    cfg["algorithm"]["params"] = params
    cfg["system"] = {"sample_time_s": {"dist": "uniform", "low": 0.001, "high": 0.01},
                     "latency_s": {"dist": "uniform", "low": 0.05, "high": 0.4}}
    whole, first = (GossipDriver(build_experiment(config.validate(cfg))) for _ in range(2))
    for _ in range(2):
        whole.run_round()
        first.run_round()
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert len(state["msg_ids"]) > 0                          # models in flight at the checkpoint
    resumed = GossipDriver(build_experiment(config.validate(cfg)))
    resumed.load_state_dict(state)
    for _ in range(3):
        whole.run_round()
        resumed.run_round()
    assert torch.equal(whole.params, resumed.params) and torch.equal(whole.age, resumed.age)
    assert (whole.events, whole.bytes_up, whole.compute_skipped, whole.node_steps) == \
        (resumed.events, resumed.bytes_up, resumed.compute_skipped, resumed.node_steps)


@pytest.mark.parametrize("topology", [{"name": "ring"}, {"name": "one_peer_exponential"},
                                      {"name": "peer_sampling", "params": {"view_size": 2},
                                       "mixing": "uniform_neighbor"}])
def test_vectorized_peer_choice_equals_the_per_wake_choice(topology):
    driver = GossipDriver(build_experiment(config.validate(small_config("gossip", topology=topology))))
    nodes, ks = np.repeat(np.arange(8), 5), np.tile(np.arange(5), 8)
    for period in range(3):
        driver.round = period
        expected = [driver._peer(int(n), int(k)) for n, k in zip(nodes, ks, strict=True)]
        assert driver._peers(nodes, ks).tolist() == expected
