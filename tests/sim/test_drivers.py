import numpy as np
import pytest
import torch

from gossamer import config, wire
from gossamer.sim.drivers.gossip import GossipDriver
from gossamer.sim.drivers.sync_dl import SyncDLDriver
from gossamer.sim.drivers.sync_fl import SyncFLDriver
from gossamer.sim.experiment import build_experiment
from gossamer.sim.system import Availability
from tests.conftest import small_config


def _exp(cfg):
    return build_experiment(config.validate(cfg))


def test_fl_round_time_is_slowest_client_download_compute_upload():
    cfg = small_config("fedavg")
    cfg["system"] = {"sample_time_s": {"dist": "per_node", "values": [0.01 * (i + 1) for i in range(8)]},
                     "latency_s": {"dist": "constant", "value": 0.5},
                     "bandwidth_up_Bps": {"dist": "constant", "value": 1e5},
                     "bandwidth_down_Bps": {"dist": "constant", "value": 1e6}}
    exp = _exp(cfg)
    driver = SyncFLDriver(exp)
    driver.run_round()
    size = exp.message_bytes
    samples = exp.trainer.sizes[7]                  # one epoch on the slowest node's shard
    expected = (0.5 + size / 1e6) + 0.08 * samples + (0.5 + size / 1e5)
    assert driver.sim_time == pytest.approx(expected)
    assert size == wire.encoded_size(exp.spec.numel)


def test_dl_round_time_and_bytes_follow_degrees():
    cfg = small_config("dpsgd")
    cfg["system"] = {"sample_time_s": {"dist": "constant", "value": 0.0},
                     "latency_s": {"dist": "constant", "value": 0.1},
                     "bandwidth_up_Bps": {"dist": "constant", "value": 1e6},
                     "bandwidth_down_Bps": {"dist": "constant", "value": 1e6}}
    exp = _exp(cfg)
    driver = SyncDLDriver(exp)
    driver.run_round()
    assert driver.bytes_up == 8 * 2 * exp.message_bytes          # ring: two neighbours each
    assert driver.sim_time == pytest.approx(2 * exp.message_bytes / 1e6 + 0.1)


def test_dl_mixing_keeps_the_average_model():
    exp = _exp(small_config("dpsgd", model={"name": "logreg", "init": "independent"}))
    driver = SyncDLDriver(exp)
    before = driver.params.mean(0)
    mixed = exp.algorithm.mix(exp.mixing, driver.params)
    assert torch.allclose(mixed.mean(0), before, atol=1e-6)
    assert not torch.allclose(driver.params[0], driver.params[1])   # independent init


def test_offline_nodes_keep_their_model_in_dl():
    cfg = small_config("dpsgd")
    cfg["system"] = {"availability": {"model": "markov", "mean_on_s": 1.0, "mean_off_s": 1.0}}
    exp = _exp(cfg)
    driver = SyncDLDriver(exp)
    online = exp.availability.at(0.0).copy()
    exp.availability.at = lambda t: online                     # freeze for the round
    before = driver.params.clone()
    driver.run_round()
    assert (~online).any() and online.any()
    assert torch.equal(driver.params[~torch.from_numpy(online)], before[~torch.from_numpy(online)])


def test_markov_availability_matches_stationary_fraction():
    avail = Availability("markov", 4000, seed=0, mean_on_s=3.0, mean_off_s=1.0)
    fractions = [avail.at(t).mean() for t in np.linspace(5, 200, 40)]
    assert np.mean(fractions) == pytest.approx(0.75, abs=0.02)
    state = avail.state_dict()
    other = Availability("markov", 4000, seed=0, mean_on_s=3.0, mean_off_s=1.0)
    other.load_state_dict(state)
    assert np.array_equal(avail.at(300.0), other.at(300.0))


@pytest.mark.parametrize("mode,extra", [
    ("push", {}), ("pull", {}), ("push_pull", {}),
    # DADAO dual clocks (merge on arrival, local updates on their own clock) and the
    # variance-corrected merge on independently initialized nodes
    ("push", {"clocks": "dual", "compute_period_s": 0.3, "merge": "variance_corrected"}),
    ("pull", {"clocks": "dual", "compute_period_s": 0.3}),
    ("push_pull", {"clocks": "dual", "compute_period_s": 0.02, "merge": "average"}),
])
def test_batched_gossip_equals_one_event_at_a_time(mode, extra):
    cfg = small_config("gossip")
    cfg["algorithm"]["params"].update(mode=mode, **extra)
    if extra:
        cfg["model"]["init"] = "independent"
    batched = GossipDriver(_exp(cfg))
    single = GossipDriver(_exp(cfg))
    single.delta = 0.0                                           # windows of one instant
    for _ in range(4):
        batched.run_round()
        single.run_round()
    assert batched.events == single.events > 8 * 4
    assert batched.bytes_up == single.bytes_up and batched.bytes_down == single.bytes_down
    assert torch.allclose(batched.params, single.params, atol=1e-5)
    assert torch.equal(batched.age, single.age)
    assert batched.compute_skipped == single.compute_skipped
    assert batched.node_steps == single.node_steps > 0
    # the period's loss is over its updates in (node, update) order, not over a batched call
    assert float(batched.train_loss) == pytest.approx(float(single.train_loss), rel=1e-5)


@pytest.mark.parametrize("algorithm,params", [("fedavg", {}), ("fedadam", {"server_lr": 0.1}),
                                              ("fedprox", {"prox_mu": 0.1, "client_fraction": 0.5})])
def test_dense_fedavg_round_equals_the_general_upload_path(monkeypatch, algorithm, params):
    """The dense round (the trainer returns only the uploads' mean) and the general path
    (upload rows through the pipeline, then ``aggregate``) give the same server model."""
    dense_ok = SyncFLDriver._uploads_are_models
    used = []

    def run(dense: bool) -> torch.Tensor:
        def choose(self, delivered):
            used.append(dense and dense_ok(self, delivered))
            return used[-1]

        monkeypatch.setattr(SyncFLDriver, "_uploads_are_models", choose)
        cfg = small_config(algorithm)
        cfg["algorithm"]["params"] = params
        driver = SyncFLDriver(_exp(cfg))
        for _ in range(3):
            driver.run_round()
        return driver.global_params()

    dense, general = run(True), run(False)
    assert used == [True] * 3 + [False] * 3
    assert torch.allclose(dense, general, atol=1e-6)
    cfg = small_config(algorithm)
    assert not torch.allclose(dense, _exp(cfg).init_params.reshape(-1))
