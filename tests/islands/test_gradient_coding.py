"""Gradient coding (Tandon et al. 2017) and sequential gradient coding's selective-reattempt
scheme (Krishnan, Ebrahimi, Khisti 2023): exact decoding from every set of n - s workers, coded
runs equal to full-gradient descent while stragglers are skipped, the lower per-round load of
the sequential scheme, resume, and one-line refusals."""

import itertools

import numpy as np
import pytest
import torch

from gossamer import config, rng, wire
from gossamer.algorithms.fl.server_opt import ServerOptimizer
from gossamer.config import ConfigError
from gossamer.protocols.coding import (
    SelectiveReattempt,
    cyclic_code,
    first_arrivals,
    fractional_code,
    sequential_s,
)
from gossamer.sim.drivers.coded import CodedDriver
from gossamer.sim.experiment import build_experiment
from tests.conftest import run_split, small_config

SLOW = {"fraction": 0.25, "factor": 20.0, "mode": "per_round"}     # 2 of 8 workers per round


def _config(name="gradient_coding", params=None, nodes=8, stragglers=SLOW, **over):
    cfg = small_config(name, partition={"name": "iid", "num_nodes": nodes},
                       model={"name": "mlp", "params": {"hidden": [16]}}, stop={"rounds": 4},
                       system={"sample_time_s": {"dist": "constant", "value": 0.001}}, **over)
    if stragglers is not None:
        cfg["faults"] = {"stragglers": dict(stragglers)}
    cfg["algorithm"] = {"name": name, "params": {"server_lr": 0.5, **(params or {})}}
    return cfg


def _driver(cfg):
    return CodedDriver(build_experiment(config.validate(cfg)))


def _gradient(exp, params):
    """The sample-weighted full gradient over every shard, computed directly."""
    n = exp.num_nodes
    grads, _ = exp.trainer.full_gradient(params.expand(n, -1), np.arange(n))
    w = torch.from_numpy(exp.trainer.sizes / exp.trainer.sizes.sum())
    return (w @ grads.double()).float()


@pytest.mark.parametrize("kind,n,s", [("fractional", 6, 1), ("fractional", 6, 2), ("fractional", 8, 3),
                                      ("cyclic", 5, 1), ("cyclic", 6, 2), ("cyclic", 7, 3)])
def test_every_set_of_n_minus_s_workers_decodes_the_exact_sum(kind, n, s):
    code = fractional_code(n, s) if kind == "fractional" else cyclic_code(n, s, rng.generator(0, 3, 1 << 62))
    assert [len(p) for p in code.partitions()] == [s + 1] * n and code.load == s + 1
    assert all(i in p for i, p in enumerate(code.partitions()))       # a worker holds its shard
    g = torch.from_numpy(np.random.default_rng(1).standard_normal((n, 50)))
    sent = torch.from_numpy(code.matrix) @ g
    for arrived in itertools.combinations(range(n), n - s):
        a, residual = code.decoding_vector(np.array(arrived))
        assert residual <= 1e-9
        assert not np.any(np.delete(a, arrived))                       # only what arrived
        assert torch.allclose(torch.from_numpy(a) @ sent, g.sum(0), rtol=0, atol=1e-9)
    if kind == "fractional" and s:
        with pytest.raises(ValueError, match="cannot decode"):         # a whole group missing
            code.decoding_vector(np.arange(s + 1, n))


def test_a_classic_round_closes_at_the_n_minus_s_th_arrival():
    arrived, at = first_arrivals(np.array([3.0, 1.0, 9.0, 2.0, 2.0]), 3)
    assert arrived.tolist() == [1, 3, 4] and at == 2.0


@pytest.mark.parametrize("code", ["fractional", "cyclic"])
def test_a_coded_run_is_full_gradient_descent_without_waiting_for_s_stragglers(code):
    cfg = _config(params={"s": 2, "code": code, "server_optimizer": "momentum"}, nodes=6,
                  stragglers={"fraction": 0.34, "factor": 20.0, "mode": "per_round"})
    driver = _driver(cfg)
    exp = driver.exp
    opt = ServerOptimizer("momentum", 0.5, 0.9)
    x, buffers = exp.init_params.reshape(-1).clone(), {}
    for r in range(1, 5):
        driver.run_round()
        x, buffers = opt.step(x, -_gradient(exp, x), buffers)
        assert (driver.job, driver.waited, driver.stragglers) == (r, 4, 2)
        assert torch.allclose(driver.state.params, x, rtol=0, atol=1e-6)
    message = wire.encoded_size(exp.spec.numel, torch.float32 if code == "fractional" else torch.float64)
    assert driver.bytes_up == 4 * 4 * message                          # n - s coded vectors a round
    assert driver.bytes_down == 4 * 6 * wire.encoded_size(exp.spec.numel)
    assert driver.summary()["coded"]["compute_overhead"] == 3.0       # s + 1 shards per worker
    # uncoded synchronous descent (s = 0) waits for the stragglers and gets the same model
    plain = _driver(_config(params={"s": 0, "code": code, "server_optimizer": "momentum"}, nodes=6,
                            stragglers={"fraction": 0.34, "factor": 20.0, "mode": "per_round"}))
    for _ in range(4):
        plain.run_round()
    assert torch.allclose(plain.state.params, x, rtol=0, atol=1e-6)
    assert driver.sim_time < plain.sim_time / 5


def test_the_sequential_scheme_decodes_every_gradient_exactly_after_B_rounds():
    driver = _driver(_config("sequential_gradient_coding", {"burst": 1, "window": 2, "stragglers": 2}))
    exp = driver.exp
    assert driver.algorithm.code_s == 1 and driver.algorithm.load == 2
    models = [exp.init_params.reshape(-1).clone()]      # x_1, x_2, ...: x_{r+1} = x_r - lr g(x_{r-1})
    skipped = reattempts = 0
    for r in range(1, 7):
        driver.run_round()
        skipped += driver.stragglers
        reattempts += driver.reattempts
        step = _gradient(exp, models[r - 2]) if r >= 2 else torch.zeros_like(models[0])
        models.append(models[-1] - 0.5 * step)
        assert driver.job == r - 1
        assert torch.allclose(driver.state.params, models[-1], rtol=0, atol=1e-6)
    assert skipped >= 4 and reattempts >= 2                             # stragglers were skipped


def test_the_sequential_scheme_tolerates_bursty_stragglers_with_a_lower_load():
    n, burst, window, lam = 8, 1, 3, 2
    scheme = SelectiveReattempt(n, burst, window, lam)
    assert scheme.s == sequential_s(burst, window, lam) == 1 < lam
    code = fractional_code(n, scheme.s)
    for r in range(1, 13):
        arrival = np.ones(n)
        if r % 3 == 1:                   # two new stragglers every third round: within the model
            arrival[[(r // 3 * 2) % n, (r // 3 * 2 + 1) % n]] = 10.0
            assert first_arrivals(arrival, n - scheme.s)[1] == 10.0     # GC with this load waits
            assert first_arrivals(arrival, n - lam)[1] == 1.0           # GC needs s = lambda
        jobs = scheme.tasks(r)
        closing = scheme.close(r, jobs, arrival)
        assert closing.round_s == 1.0 and not closing.waited_for_decoding
        assert closing.stragglers.sum() == (2 if r % 3 == 1 else 0)
        if r >= 2:
            assert closing.job == r - 1 and len(closing.contributors) >= n - scheme.s
            code.decoding_vector(closing.contributors)
    # random arrivals: the model is enforced, and within it the due job always decodes
    for burst, window, lam in ((1, 2, 3), (2, 3, 4), (2, 5, 5), (3, 4, 6)):
        scheme = SelectiveReattempt(n, burst, window, lam)
        draws = np.random.default_rng(burst * 10 + window)
        for r in range(1, 60):
            closing = scheme.close(r, scheme.tasks(r), draws.exponential(1.0, n))
            assert not closing.waited_for_decoding
            assert r <= burst or len(closing.contributors) >= n - scheme.s
    classic = _driver(_config(params={"s": 2, "code": "cyclic"}, stragglers=None))
    sequential = _driver(_config("sequential_gradient_coding",
                                 {"burst": 1, "window": 3, "stragglers": 2, "code": "fractional"},
                                 stragglers=None))
    assert sequential.algorithm.load == 2 < classic.algorithm.load == 3
    assert sequential.summary()["coded"]["compute_overhead"] == 2.0
    assert classic.summary()["coded"]["compute_overhead"] == 3.0


@pytest.mark.parametrize("name,params", [("gradient_coding", {"s": 1}),
                                         ("sequential_gradient_coding",
                                          {"burst": 1, "window": 2, "stragglers": 2})])
def test_resume_is_bit_identical(tmp_path, name, params):
    cfg = _config(name, params)
    cfg["output"] = {"progress": False, "checkpoint_every": 1}
    rest = run_split(cfg, tmp_path, split=3, total=5)
    if name == "sequential_gradient_coding":
        assert rest.driver.scheme.round == 3                  # the pending jobs came back
    rest.run()
    assert (tmp_path / "a/metrics.csv").read_bytes() == (tmp_path / "b/metrics.csv").read_bytes()


@pytest.mark.parametrize("name,params,over,field", [
    ("gradient_coding", {"s": 8}, {}, "algorithm.params.s"),
    ("gradient_coding", {"s": 2}, {}, "algorithm.params.code"),               # 3 does not divide 8
    ("sequential_gradient_coding", {"stragglers": 8}, {}, "algorithm.params.stragglers"),
    ("gradient_coding", {}, {"local": {"steps": 3}}, "local.steps"),
    ("gradient_coding", {}, {"faults": {"crash": {"fraction": 0.2, "at_s": {"dist": "constant",
                                                                              "value": 1.0}}}},
     "faults.crash"),
    ("gradient_coding", {}, {"compression": {"uplink": {"name": "topk", "params": {"ratio": 0.1}}}},
     "compression.uplink"),
])
def test_config_errors_are_one_line_naming_the_field(name, params, over, field):
    cfg = _config(name, params, stragglers=None)
    cfg.update(over)
    with pytest.raises(ConfigError) as err:
        _driver(cfg)
    assert err.value.field == field and "\n" not in str(err.value)


def test_bad_scheme_parameters_are_refused_when_the_config_is_read():
    for params, match in (({"window": 4, "burst": 2}, "1 plus a multiple of burst"),
                          ({"burst": 0}, "burst"), ({"stragglers": 0}, "lambda")):
        with pytest.raises(ConfigError, match=match) as err:
            config.validate(_config("sequential_gradient_coding", params))
        assert err.value.field == "algorithm.params" and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="s .stragglers tolerated"):
        config.validate(_config(params={"s": -1}))
