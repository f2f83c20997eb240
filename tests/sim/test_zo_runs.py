"""Zeroth-order FedAvg in the simulator: the batched forward equals per-client losses, bytes
are header plus scalars, it learns, runs are deterministic and resume exactly, and what it
does not support is refused in one line."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gossamer import config, wire
from gossamer.algorithms.fl.zo import ZOFedAvg, directions
from gossamer.cli import main
from gossamer.sim.drivers import driver_for
from gossamer.sim.experiment import build_experiment
from tests.conftest import run_split, small_config


def _cfg(params=None, **overrides):
    overrides = {"model": {"name": "logreg"}, "local": {"batch_size": 32, "lr": 0.05}, **overrides}
    cfg = small_config("zo_fedavg", **overrides)
    cfg["algorithm"]["params"] = dict(params or {"perturbations": 4})
    return cfg


def _driver(cfg):
    exp = build_experiment(config.validate(cfg))
    return driver_for(exp.algorithm.pattern)(exp)


def test_projected_gradients_equal_per_client_central_differences():
    d = _driver(_cfg({"perturbations": 3, "eps": 1e-2}))
    exp, algo = d.exp, d.algorithm
    ids = np.array([1, 4, 6])
    idx, valid = exp.trainer.batches(ids, np.full(3, 1), np.full(3, 3))
    keys = algo.direction_keys(1, ids)
    g, _ = d._estimate(keys, idx.reshape(9, -1), valid.reshape(9, -1))
    z = directions(exp.cfg.seed, keys, exp.spec.numel)
    for row, (c, k) in enumerate((c, k) for c in range(3) for k in range(3)):
        xb, yb = exp.trainer.x[idx[c, k]], exp.trainer.y[idx[c, k]]
        losses = []
        for sign in (1, -1):
            exp.spec.load_into(exp.model, d.params + sign * algo.eps * z[row])
            with torch.no_grad():
                losses.append(F.cross_entropy(exp.model(xb), yb).double())
        assert float(g[row]) == pytest.approx(float((losses[0] - losses[1]) / (2 * algo.eps)), rel=1e-3, abs=1e-4)


def test_a_round_moves_the_model_by_the_servers_regenerated_update(monkeypatch):
    """The server gets scalars and client ids only; its step equals -lr * mean g z with the
    directions the clients perturbed along."""
    d = _driver(_cfg({"perturbations": 2}))
    start, captured = d.params.clone(), {}
    update = ZOFedAvg.server_update

    def spy(self, params, scalars, clients, round, seed, lr):
        captured.update(scalars=scalars.clone(), clients=clients.copy())
        return update(self, params, scalars, clients, round, seed, lr)

    monkeypatch.setattr(ZOFedAvg, "server_update", spy)
    d.run_round()
    assert captured["scalars"].shape == (8, 2) and captured["clients"].tolist() == list(range(8))
    z = directions(0, d.algorithm.direction_keys(1, captured["clients"]), d.exp.spec.numel)
    expected = start - 0.05 * (captured["scalars"].reshape(-1, 1) * z).mean(0)
    assert torch.allclose(d.params, expected, atol=1e-6)


@pytest.mark.parametrize("params, scalar", [({"perturbations": 4}, 4),
                                            ({"perturbations": 4, "quantize_bits": 8}, 1)])
def test_uploads_cost_header_plus_k_scalars_and_the_model_broadcast_its_encoding(params, scalar):
    d = _driver(_cfg(params))
    for _ in range(3):
        d.run_round()
    assert d.bytes_up == 3 * 8 * (wire.HEADER_BYTES + 4 * scalar)
    assert d.bytes_down == d.bytes_down_model == 3 * 8 * wire.encoded_size(d.exp.spec.numel)
    assert (d.accounting.bytes_up == 3 * (wire.HEADER_BYTES + 4 * scalar)).all()


def test_scalar_broadcast_sends_each_client_the_rounds_it_missed():
    full = _driver(_cfg({"perturbations": 2, "quantize_bits": 8, "broadcast": "scalars"}))
    for _ in range(3):
        full.run_round()
    record = 8 * (4 + 2)                                    # per contributor: id + 2 one-byte codes
    # round 1: nothing to replay (header only); rounds 2, 3: one round's relay each
    assert full.bytes_down == 8 * (3 * wire.HEADER_BYTES + 2 * record)
    assert full.bytes_down_model == 3 * 8 * wire.encoded_size(full.exp.spec.numel)
    half = _driver(_cfg({"perturbations": 2, "broadcast": "scalars", "client_fraction": 0.5}))
    seen = np.zeros(8, dtype=np.int64)
    sizes = [0]
    for r in range(1, 6):
        before = half.accounting.bytes_down.copy()
        half.run_round()
        got = np.flatnonzero(half.accounting.bytes_down != before)
        numel_bytes = wire.encoded_size(half.exp.spec.numel)
        want = np.minimum(wire.HEADER_BYTES + sizes[r - 1] - np.asarray(sizes)[seen[got]], numel_bytes)
        assert (half.accounting.bytes_down[got] - before[got] == want).all()
        seen[got] = r - 1
        sizes.append(sizes[-1] + 4 * (4 + 2 * 4))


def test_shared_directions_relay_k_means():
    d = _driver(_cfg({"perturbations": 3, "directions": "shared", "broadcast": "scalars"}))
    for _ in range(2):
        d.run_round()
    assert d.bytes_down == 8 * (2 * wire.HEADER_BYTES + 3 * 4)


@pytest.mark.parametrize("params", [{"perturbations": 8},
                                    {"perturbations": 8, "quantize_bits": 8, "quantize_scale": 0.01}])
def test_it_learns_on_digits(params):
    d = _driver(_cfg(params, local={"batch_size": 32, "lr": 0.1}))
    first = d.evaluate()
    for _ in range(25):
        d.run_round()
    last = d.evaluate()
    assert last["test_loss"] < first["test_loss"] - 0.1
    assert last["test_accuracy"] > first["test_accuracy"] + 0.2


def test_same_seed_same_metrics_and_resume_is_identical(tmp_path):
    cfg = _cfg({"perturbations": 3, "quantize_bits": 8, "broadcast": "scalars",
                "client_fraction": 0.5})
    rest = run_split(cfg, tmp_path, split=3, total=6)
    assert rest.driver.round == 3 and rest.driver.relay.synced.any()
    rest.run()
    assert (tmp_path / "a/metrics.csv").read_bytes() == (tmp_path / "b/metrics.csv").read_bytes()
    a, b = _driver(cfg), _driver(cfg)
    for _ in range(2):
        a.run_round()
        b.run_round()
    assert torch.equal(a.params, b.params)


@pytest.mark.parametrize("change, field", [
    ({"faults": {"message_loss": {"prob": 0.1}}}, "faults"),
    ({"adversary": {"attack": "sign_flip", "fraction": 0.25}}, "adversary.attack"),
    ({"local": {"steps": 3, "batch_size": 32, "lr": 0.05}}, "local.steps"),
    ({"local": {"epochs": 2, "batch_size": 32, "lr": 0.05}}, "local.epochs"),
    ({"local": {"momentum": 0.9, "batch_size": 32, "lr": 0.05}}, "local.momentum"),
    ({"privacy": {"dp": {"level": "sample", "clip_norm": 1.0, "noise_multiplier": 1.0}}}, "privacy.dp"),
    ({"compression": {"uplink": {"name": "topk", "params": {"density": 0.1}}}}, "compression.uplink"),
    ({"algorithm": {"name": "zo_fedavg", "params": {"perturbations": 0}}}, "algorithm.params"),
    ({"algorithm": {"name": "zo_fedavg", "params": {"quantize_bits": 4}}}, "algorithm.params"),
])
def test_unsupported_set_ups_are_one_line_exit_2(write_config, tmp_path, capsys, change, field):
    cfg = _cfg(stop={"rounds": 1})
    cfg.update(change)
    code = main(["run", str(write_config(cfg)), "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"{field}" in err[0], err
