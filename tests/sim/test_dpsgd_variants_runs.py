"""D-PSGD variants in the simulator: schedules, the final global merge, DFedSAM, gradient
tracking (bytes, checks, resume, exact convergence)."""

import numpy as np
import pytest
import torch

from gossamer import config, wire
from gossamer.sim.drivers import driver_for
from gossamer.sim.experiment import build_experiment
from tests.conftest import small_config


def _cfg(params=None, name="dpsgd", **overrides):
    cfg = small_config("dpsgd", **overrides)
    cfg["algorithm"] = {"name": name, "params": params or {}}
    return cfg


def _driver(cfg):
    exp = build_experiment(config.validate(cfg))
    return driver_for(exp.algorithm.pattern)(exp)


def _rounds(driver, k):
    for _ in range(k):
        driver.run_round()
    return driver


def test_schedule_sets_gossip_steps_and_bytes_per_round():
    d = _driver(_cfg({"gossip_steps": 3, "schedule": "increasing"}, stop={"rounds": 5}))
    links, nbytes = len(d.graph.src), d.exp.message_bytes          # ring of 8: 16 directed links
    sent = []
    for _ in range(5):
        before = d.bytes_up
        d.run_round()
        sent.append((d.bytes_up - before) // (links * nbytes))
    assert sent == [d.exp.algorithm.gossip_steps_at(r, 5) for r in range(1, 6)] == [0, 1, 2, 2, 3]


def test_local_only_with_a_final_merge_is_the_average_of_independent_runs():
    merged = _rounds(_driver(_cfg({"schedule": "local_only", "final_merge": True}, stop={"rounds": 3})), 3)
    alone = _rounds(_driver(_cfg({"schedule": "local_only"}, stop={"rounds": 3})), 3)
    assert alone.evaluate()["consensus_distance"] > 0
    assert torch.allclose(merged.params, alone.params.mean(0).expand_as(merged.params), atol=1e-6)
    assert merged.evaluate()["consensus_distance"] < 1e-12
    n, numel = 8, merged.exp.spec.numel                          # ring all-reduce: 2 (n-1) chunks each
    assert merged.bytes_up == merged.bytes_down == 2 * (n - 1) * n * wire.encoded_size(-(-numel // n))
    assert alone.bytes_up == 0 and merged.sim_time > alone.sim_time
    row = merged.evaluate()
    assert row["test_accuracy"] == pytest.approx(row["avg_model_accuracy"])


def test_final_merge_happens_only_after_the_last_round():
    d = _driver(_cfg({"gossip_every": 2, "final_merge": True}, stop={"rounds": 3}))
    _rounds(d, 2)
    assert d.evaluate()["consensus_distance"] > 0
    d.run_round()
    assert d.evaluate()["consensus_distance"] < 1e-12


@pytest.mark.parametrize("overrides, field", [
    ({"stop": {"rounds": 3, "max_sim_time_s": 10.0}}, "stop.max_sim_time_s"),
    ({"stop": {"rounds": 3, "target_accuracy": 0.5}}, "stop.stop_at_target"),
    ({"faults": {"partitions": [{"at_s": 0.0, "groups": 2}]}}, "faults.partitions"),
])
def test_final_merge_refuses_runs_that_cannot_merge(overrides, field):
    with pytest.raises(config.ConfigError, match=f"^{field}: ") as err:
        _driver(_cfg({"final_merge": True}, **overrides))
    assert "\n" not in str(err.value)


def test_final_merge_refuses_a_robust_aggregator():
    with pytest.raises(config.ConfigError, match="^algorithm.params.final_merge: "):
        _driver(_cfg({"final_merge": True, "aggregator": "median"}))


def test_more_gossip_steps_per_round_reach_closer_consensus():
    one = _rounds(_driver(_cfg({"gossip_steps": 1})), 2)
    four = _rounds(_driver(_cfg({"gossip_steps": 4})), 2)
    assert four.evaluate()["consensus_distance"] < 0.5 * one.evaluate()["consensus_distance"]
    assert four.bytes_up == 4 * one.bytes_up


def test_dfedsam_is_dpsgd_with_local_sam():
    preset = _rounds(_driver(_cfg({"rho": 0.1}, name="dfedsam")), 2)
    local = _cfg()
    local["local"] = {**local["local"], "sam_rho": 0.1}
    manual = _rounds(_driver(local), 2)
    plain = _rounds(_driver(_cfg()), 2)
    assert preset.exp.trainer.optimizer.sam_rho == 0.1 and preset.exp.trainer.kernel is not None
    assert torch.equal(preset.params, manual.params)
    assert not torch.allclose(preset.params, plain.params)
    assert preset.sim_time > plain.sim_time                  # two gradients per step cost compute time


def test_dfedsam_radius_set_twice_is_an_error():
    cfg = _cfg({"rho": 0.1}, name="dfedsam")
    cfg["local"] = {**cfg["local"], "sam_rho": 0.2}
    with pytest.raises(config.ConfigError, match="^local.sam_rho: algorithm dfedsam sets"):
        build_experiment(config.validate(cfg))


def test_gradient_tracking_messages_carry_two_vectors_and_resume_exactly():
    cfg = _cfg({"gossip_steps": 2}, name="gradient_tracking")
    d = _rounds(_driver(cfg), 2)
    numel = d.exp.spec.numel
    assert d.bytes_up == 2 * 2 * len(d.graph.src) * wire.encoded_size(2 * numel)
    assert float(d.correction.sum(0).abs().max()) < 1e-5      # trackers' corrections sum to 0
    state = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in d.state_dict().items()}
    resumed = _driver(cfg)
    resumed.load_state_dict(state)
    _rounds(resumed, 2)
    _rounds(d, 2)
    assert torch.equal(resumed.params, d.params) and torch.equal(resumed.correction, d.correction)
    assert resumed.evaluate() == d.evaluate()


def _global_gradient_norm(driver, wd):
    """||(1/N) sum_i grad f_i(x_bar) + wd x_bar||: zero at the minimizer of the average loss."""
    exp = driver.exp
    mean = driver.params.mean(0)
    grads, _ = exp.trainer.full_gradient(mean.expand(exp.num_nodes, -1), np.arange(exp.num_nodes))
    return float((grads.mean(0) + wd * mean).norm())


def test_gradient_tracking_converges_exactly_where_dpsgd_is_biased():
    """Full-batch local steps, fixed lr, non-IID shards on a ring, a strongly convex loss."""
    wd = 0.05
    overrides = dict(model={"name": "logreg"}, stop={"rounds": 200},
                     partition={"name": "shards", "num_nodes": 8, "params": {"shards_per_node": 2}},
                     local={"epochs": 1, "batch_size": 1000, "lr": 1.0, "weight_decay": wd, "shuffle": False})
    norms = {}
    for name in ("gradient_tracking", "dpsgd"):
        d = _rounds(_driver(_cfg(name=name, **overrides)), 100)
        norms[name] = [_global_gradient_norm(d, wd)]
        _rounds(d, 100)
        norms[name].append(_global_gradient_norm(d, wd))
        norms[name].append(d.evaluate()["consensus_distance"])
    gt, plain = norms["gradient_tracking"], norms["dpsgd"]
    assert gt[1] < 1e-3 and gt[1] < 0.1 * gt[0] and gt[2] < 1e-5      # linear convergence to the optimum
    assert plain[1] > 0.1 and abs(plain[1] - plain[0]) < 0.01 * plain[1]   # stuck at a biased point


def test_gradient_tracking_with_an_offline_node_keeps_the_trackers_invariant():
    cfg = _cfg(name="gradient_tracking", faults={"events": [
        {"at_s": 0.0, "action": "remove", "nodes": [2]}, {"at_s": 0.4, "action": "restore"}]})
    d = _rounds(_driver(cfg), 1)
    away = d.correction[2].clone()
    assert not d.last_online[2] and torch.equal(away, torch.zeros_like(away))
    _rounds(d, 1)
    assert not d.last_online[2] and torch.equal(d.correction[2], away)   # offline: untouched
    _rounds(d, 4)
    assert d.last_online[2] and not torch.equal(d.correction[2], away)
    assert float(d.correction.sum(0).abs().max()) < 1e-5
