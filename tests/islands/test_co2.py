"""CO2 (Sun et al. 2024): every outer gradient applied exactly once, one outer step late, with
the staleness gap penalty and the momentum clip; the exchange hidden behind the next outer
step on the simulated clock; resume."""

import pytest
import torch

from gossamer import config, wire
from gossamer.sim.drivers.islands import IslandsDriver
from gossamer.sim.drivers.sync_fl import SyncFLDriver
from gossamer.sim.experiment import build_experiment
from tests.conftest import run_split, small_config

INNER = {"optimizer": "adamw", "lr": 0.01, "beta2": 0.95, "weight_decay": 0.1, "steps": 4,
         "batch_size": 8}


def _config(params, name="co2", **over):
    cfg = small_config(name, local=dict(INNER), stop={"rounds": 4},
                       partition={"name": "iid", "num_nodes": 4},
                       model={"name": "mlp", "params": {"hidden": [16, 16]}}, **over)
    cfg["algorithm"] = {"name": name, "params": params}
    return cfg


def _driver(params, **over):
    return IslandsDriver(build_experiment(config.validate(_config(params, **over))))


def test_each_outer_gradient_steps_the_model_one_outer_step_late():
    """CO2's second outer step applies the first one's average: DiLoCo with plain SGD outer
    steps after one; the first outer step leaves the model where it was."""
    co2 = _driver({"server_lr": 0.8, "server_momentum": 0.5})
    cfg = _config({"server_optimizer": "sgd", "server_lr": 0.8}, name="diloco")
    plain = SyncFLDriver(build_experiment(config.validate(cfg)))
    start = co2.state.params.clone()
    co2.run_round()
    assert torch.equal(co2.state.params, start)
    assert torch.equal(co2.local, start.expand_as(co2.local))       # every worker from x_1 = x_0
    co2.run_round()
    plain.run_round()
    assert torch.allclose(co2.state.params, plain.state.params, atol=1e-6)


def test_the_late_outer_rule_is_penalized_clipped_momentum():
    """Outer step r applies the average ``d`` of step r - 1: ``m = beta m + d / gap_penalty``,
    clamped element-wise, ``x += lr m``; checked against the averages the driver exchanged."""
    params = {"server_lr": 0.9, "server_momentum": 0.6, "gap_penalty": 2.0, "clip_threshold": 0.004}
    driver = _driver(params)
    x = driver.state.params.clone()
    m = torch.zeros_like(x)
    clipped = False
    for r in range(1, 5):
        in_flight = driver.in_flight                              # the previous step's average
        driver.run_round()
        if in_flight is not None:
            m = 0.6 * m + in_flight / 2.0
            clipped |= bool((m.abs() > 0.004).any())
            m = m.clamp(-0.004, 0.004)
            x = x + 0.9 * m
        assert torch.allclose(driver.state.params, x, atol=1e-6), r
    assert clipped                                                # the clip was exercised
    assert driver.state.round == 3                                # 4 outer gradients, 3 applied


def test_the_exchange_flies_during_the_next_outer_step_on_the_simulated_clock():
    """Per outer step CO2 takes max(compute, previous exchange); DiLoCo takes their sum."""
    def slow(up):
        return {"sample_time_s": {"dist": "constant", "value": 0.01},
                "bandwidth_up_Bps": {"dist": "constant", "value": up},
                "bandwidth_down_Bps": {"dist": "constant", "value": 1e9},
                "latency_s": {"dist": "constant", "value": 0.0}}

    for up, hidden in ((1e7, True), (5e3, False)):
        driver = _driver({}, system=slow(up))
        exchange = wire.encoded_size(driver.exp.spec.numel) / up + wire.encoded_size(
            driver.exp.spec.numel) / 1e9
        compute = 4 * 8 * 0.01                                   # 4 steps of 8 samples
        for _ in range(4):
            driver.run_round()
        assert driver.exchange_s == pytest.approx(exchange)
        if hidden:
            assert driver.sim_time == pytest.approx(4 * compute)      # = the compute time
        else:
            assert driver.sim_time == pytest.approx(compute + 3 * exchange)
        cfg = _config({}, name="diloco", system=slow(up))
        plain = SyncFLDriver(build_experiment(config.validate(cfg)))
        for _ in range(4):
            plain.run_round()
        assert driver.sim_time < plain.sim_time
        assert driver.bytes_up == plain.bytes_up                  # the same exchanges


def test_quantized_exchanges_and_resume(tmp_path):
    cfg = _config({"server_momentum": 0.3},
                  compression={"uplink": {"name": "quantize", "params": {"bits": 8}}})
    cfg["output"] = {"progress": False, "checkpoint_every": 1}
    rest = run_split(cfg, tmp_path, split=2, total=4)
    assert rest.driver.in_flight is not None                 # the exchange in flight came back
    rest.run()
    assert (tmp_path / "a/metrics.csv").read_bytes() == (tmp_path / "b/metrics.csv").read_bytes()


def test_bad_settings_are_refused_in_one_line():
    for params, field in (({"gap_penalty": 0}, "gap_penalty"), ({"clip_threshold": -1}, "clip_threshold"),
                          ({"server_optimizer": "nesterov"}, "server_optimizer")):
        with pytest.raises(ValueError, match=field):
            config.validate(_config(params))
