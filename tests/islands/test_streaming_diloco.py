"""Streaming DiLoCo (Douillard, Donchev, Rush, et al. 2025): DiLoCo when it has one fragment and
no overlap, exact bytes per exchange, the overlap hiding the exchange on the simulated clock,
fragments of whole layers, and resume."""

import numpy as np
import pytest
import torch

from gossamer import config, wire
from gossamer.protocols.islands import (
    equal_fragments,
    fragments,
    layer_sizes,
    round_seconds,
    synced_fragment,
)
from gossamer.sim.drivers.islands import IslandsDriver
from gossamer.sim.drivers.sync_fl import SyncFLDriver
from gossamer.sim.experiment import build_experiment
from tests.conftest import run_split, small_config

INNER = {"optimizer": "adamw", "lr": 0.01, "beta2": 0.95, "weight_decay": 0.1, "steps": 4,
         "batch_size": 8}


def _config(params, **over):
    cfg = small_config("streaming_diloco", local=dict(INNER), stop={"rounds": 4},
                       partition={"name": "iid", "num_nodes": 4},
                       model={"name": "mlp", "params": {"hidden": [16, 16]}}, **over)
    cfg["algorithm"] = {"name": "streaming_diloco", "params": params}
    return cfg


def test_one_fragment_without_overlap_is_diloco():
    stream = IslandsDriver(build_experiment(config.validate(
        _config({"fragments": 1, "overlap": 0, "alpha": 0.0}))))
    cfg = _config({})
    cfg["algorithm"] = {"name": "diloco"}
    plain = SyncFLDriver(build_experiment(config.validate(cfg)))
    for _ in range(3):
        stream.run_round()
        plain.run_round()
        assert torch.allclose(stream.state.params, plain.state.params, atol=1e-6)
    assert stream.bytes_up == plain.bytes_up                 # the whole model, every round


@pytest.mark.parametrize("by", ["size", "layers"])
def test_each_exchange_carries_one_fragment_and_all_of_them_cover_the_model(by):
    exp = build_experiment(config.validate(_config({"fragments": 2, "overlap": 1, "fragment_by": by})))
    driver = IslandsDriver(exp)
    sizes = []
    for r in range(1, 5):
        before = driver.bytes_up
        driver.run_round()
        assert driver.fragment == synced_fragment(r, 2)
        sizes.append(driver.bytes_up - before)
        assert sizes[-1] == 4 * (wire.HEADER_BYTES + 4 * len(driver.parts[driver.fragment]))
    assert sum(sizes[:2]) == 4 * (2 * wire.HEADER_BYTES + 4 * exp.spec.numel)
    assert max(sizes) < 4 * wire.encoded_size(exp.spec.numel)        # lower peak than DiLoCo
    covered = torch.cat(driver.parts).sort().values
    assert torch.equal(covered, torch.arange(exp.spec.numel))


def test_fragments_are_whole_layers_of_about_equal_size():
    names = ["a.weight", "a.bias", "b.weight", "b.bias", "c.weight", "c.bias"]
    sizes = layer_sizes(names, [60, 4, 30, 2, 30, 2])
    assert sizes == [64, 32, 32]
    parts = fragments(sizes, 2)
    assert [len(p) for p in parts] == [64, 64] and int(parts[1][0]) == 64
    with pytest.raises(ValueError, match="between 1 and"):
        fragments(sizes, 4)
    assert [len(p) for p in equal_fragments(10, 3)] == [3, 3, 4]
    assert torch.equal(torch.cat(equal_fragments(10, 3)), torch.arange(10))


def test_the_overlap_hides_the_exchange_on_the_simulated_clock():
    assert round_seconds(np.array([1.0, 2.0]), np.array([3.0, 3.0]), 0.5) == 5.0   # hidden
    assert round_seconds(np.array([1.0, 2.0]), np.array([3.0, 3.0]), 4.0) == 7.0   # waited for
    slow = {key: {"dist": "constant", "value": v} for key, v in
            (("sample_time_s", 0.01), ("bandwidth_up_Bps", 2e5), ("bandwidth_down_Bps", 2e5))}
    times = {}
    for overlap in (0, 2):
        cfg = _config({"fragments": 2, "overlap": overlap}, system=dict(slow))
        driver = IslandsDriver(build_experiment(config.validate(cfg)))
        for _ in range(4):
            driver.run_round()
        times[overlap] = driver.sim_time
    assert times[2] < times[0]


def test_quantized_exchanges_cost_their_encoding():
    cfg = _config({"fragments": 2, "overlap": 1},
                  compression={"uplink": {"name": "quantize", "params": {"bits": 4}}})
    exp = build_experiment(config.validate(cfg))
    driver = IslandsDriver(exp)
    driver.run_round()
    numel = len(driver.parts[0])
    assert driver.exchange_bytes == 4 * (wire.HEADER_BYTES + 8 + -(-numel * 4 // 8))
    assert torch.isfinite(driver.state.params).all()


def test_resume_is_bit_identical(tmp_path):
    cfg = _config({"fragments": 2, "overlap": 1})
    cfg["output"] = {"progress": False, "checkpoint_every": 1}
    rest = run_split(cfg, tmp_path, split=3, total=4)
    assert rest.driver.pending is not None                   # an exchange in flight came back
    rest.run()
    assert (tmp_path / "a/metrics.csv").read_bytes() == (tmp_path / "b/metrics.csv").read_bytes()


def test_bad_schedules_are_refused_in_one_line():
    cfg = _config({"fragments": 3})                          # H = 4 not divisible by 3
    with pytest.raises(ValueError, match="divisible by fragments"):
        IslandsDriver(build_experiment(config.validate(cfg)))
    with pytest.raises(ValueError, match="server_optimizer"):
        config.validate(_config({"server_optimizer": "adam"}))
    cfg = _config({"fragments": 2}, system={"availability": {"model": "markov", "mean_on_s": 5,
                                                               "mean_off_s": 1}})
    with pytest.raises(ValueError, match="not modelled"):
        IslandsDriver(build_experiment(config.validate(cfg)))
