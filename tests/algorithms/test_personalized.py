"""Personalized FL: per-client test splits, the per-client evaluator, Ditto and local-only
training in the synchronous FL driver, fine-tuning before evaluation, resume."""

import csv

import numpy as np
import pytest
import torch

from gossamer import config
from gossamer.config import ConfigError
from gossamer.data.partition import split_local_test
from gossamer.sim.drivers.sync_fl import SyncFLDriver
from gossamer.sim.experiment import build_experiment
from gossamer.training.evaluator import personal_summary
from tests.conftest import run_split, small_config


def test_each_node_keeps_its_own_test_rows_apart_from_its_training_rows():
    shards = [np.arange(0, 10), np.arange(10, 11), np.arange(11, 31), np.array([], dtype=np.int64)]
    train, test = split_local_test(shards, 0.2, seed=3)
    assert [len(t) for t in test] == [2, 0, 4, 0] and [len(t) for t in train] == [8, 1, 16, 0]
    for rows, a, b in zip(shards, train, test, strict=True):
        assert sorted(np.concatenate([a, b]).tolist()) == sorted(rows.tolist())
    again = split_local_test(shards, 0.2, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(test, again[1], strict=True))
    assert not np.array_equal(test[2], split_local_test(shards, 0.2, seed=4)[1][2])
    with pytest.raises(ValueError, match="test_fraction"):
        split_local_test(shards, 1.0, 0)


def _config(name="fedavg", params=None, **over):
    cfg = small_config(name, stop={"rounds": 3}, **over)
    cfg["algorithm"] = {"name": name, "params": params or {}}
    cfg["partition"] = {"name": "dirichlet", "num_nodes": 8, "params": {"alpha": 0.2},
                        "test_fraction": 0.25}
    return cfg


def _run(cfg):
    driver = SyncFLDriver(build_experiment(config.validate(cfg)))
    rows = [driver.evaluate()]
    for _ in range(3):
        driver.run_round()
        rows.append(driver.evaluate())
    return driver, rows


def test_the_per_client_accuracy_is_each_model_on_its_own_rows():
    driver, rows = _run(_config())
    exp = driver.exp
    nodes = exp.personal.nodes
    assert len(nodes) == 8 and (exp.personal.sizes[nodes] > 0).all()
    logits = exp.model  # the global model, evaluated row by row the plain way
    exp.spec.load_into(logits, driver.state.params)
    expected = []
    for i in nodes:
        idx = exp.personal.rows[i, : exp.personal.sizes[i]]
        with torch.no_grad():
            pred = logits(exp.dataset.x_train[idx]).argmax(-1)
        expected.append(float((pred == exp.dataset.y_train[idx]).float().mean()))
    assert np.allclose(driver.personal_accuracy[nodes], expected)
    summary = personal_summary(np.array(expected))
    assert rows[-1]["personal_accuracy"] == pytest.approx(summary["personal_accuracy"])
    assert rows[-1]["personal_worst10"] == pytest.approx(min(expected))          # 1 of 8 clients
    # the held-out rows are not trained on: no shard holds them
    held = np.concatenate([exp.personal.rows[i, : exp.personal.sizes[i]] for i in nodes])
    trained = np.concatenate([exp.trainer.shards[i, : exp.trainer.sizes[i]] for i in range(8)])
    assert not np.intersect1d(held, trained).size


def test_ditto_keeps_fedavgs_global_model_and_lam_zero_is_local_training():
    fedavg, plain = _run(_config())
    ditto, rows = _run(_config("ditto", {"lam": 0.5}))
    assert [r["test_accuracy"] for r in rows] == [r["test_accuracy"] for r in plain]
    assert torch.equal(ditto.state.params, fedavg.state.params)
    assert ditto.sim_time > fedavg.sim_time                     # two local passes per round
    assert rows[-1]["personal_accuracy"] != plain[-1]["personal_accuracy"]
    free, free_rows = _run(_config("ditto", {"lam": 0.0}))
    local, local_rows = _run(_config("local_only"))
    assert torch.equal(free.personal, local.personal)           # no pull towards the global model
    assert local.bytes_up == local.bytes_down == 0
    assert torch.equal(local.state.params, local.exp.init_params.reshape(-1))
    assert [r["personal_accuracy"] for r in local_rows] == [r["personal_accuracy"] for r in free_rows]


def test_fine_tuning_before_evaluation_changes_only_the_personal_metrics():
    plain, rows = _run(_config())
    cfg = _config()
    cfg["eval"] = {"personal_finetune_steps": 5}
    tuned, tuned_rows = _run(cfg)
    assert torch.equal(plain.state.params, tuned.state.params)
    assert [r["test_accuracy"] for r in rows] == [r["test_accuracy"] for r in tuned_rows]
    assert rows[-1]["personal_accuracy"] != tuned_rows[-1]["personal_accuracy"]


def test_ditto_resumes_bit_identically_and_writes_each_clients_accuracy(tmp_path):
    cfg = _config("ditto", {"lam": 0.1})
    cfg["output"] = {"progress": False, "checkpoint_every": 1}
    rest = run_split(cfg, tmp_path, split=1, total=3)
    rest.run()
    for name in ("metrics.csv", "clients.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    with (tmp_path / "a" / "clients.csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == 8 and all(0 <= float(r["accuracy"]) <= 1 for r in table)


def test_what_is_not_supported_is_refused_in_one_line():
    from gossamer.runtime.common import refuse_simulator_only

    cfg = small_config("dpsgd")
    cfg["partition"]["test_fraction"] = 0.2
    with pytest.raises(ConfigError, match="partition.test_fraction"):
        build_experiment(config.validate(cfg))
    cfg = small_config("fedavg", eval={"personal_finetune_steps": 3})
    with pytest.raises(ConfigError, match="eval.personal_finetune_steps"):
        build_experiment(config.validate(cfg))
    cfg = small_config("fedbuff")
    cfg["partition"]["test_fraction"] = 0.2
    with pytest.raises(ConfigError, match="partition.test_fraction"):
        build_experiment(config.validate(cfg))
    refuse_simulator_only(config.validate(_config("ditto")))      # real processes run it
    with pytest.raises(ConfigError, match="simulator only"):
        refuse_simulator_only(config.validate(_config("local_only")))
    with pytest.raises(ValueError, match="lam"):
        config.validate(_config("ditto", {"lam": -1}))


def test_fedrep_trains_each_head_on_the_received_body_then_shares_only_bodies():
    driver = SyncFLDriver(build_experiment(config.validate(_config("fedrep", {"head_epochs": 2}))))
    names, head = driver.head_names, driver.head
    assert names == ("net.2.weight", "net.2.bias") and int(head.sum()) == 16 * 10 + 10
    received = driver.state.params.clone()
    driver.run_round()
    personal = driver.personal
    # after the head step every client's body is still the one it received; heads are its own
    assert torch.equal(personal[:, ~head], received[~head].expand(8, -1))
    assert not torch.equal(personal[0, head], personal[1, head])
    assert not torch.equal(driver.state.params[~head], received[~head])    # the bodies moved
    models = driver.algorithm.personal_model(driver.state.params, personal, head)
    assert torch.equal(models[:, ~head], driver.state.params[~head].expand(8, -1))
    assert torch.equal(models[:, head], personal[:, head])
    with pytest.raises(ConfigError, match="head_layers"):
        build_experiment(config.validate(_config("fedrep", {"head_layers": 2})))


def test_fedrep_resumes_bit_identically(tmp_path):
    cfg = _config("fedrep", {"head_epochs": 2})
    cfg["output"] = {"progress": False, "checkpoint_every": 1}
    rest = run_split(cfg, tmp_path, split=1, total=3)
    rest.run()
    assert (tmp_path / "a/clients.csv").read_bytes() == (tmp_path / "b/clients.csv").read_bytes()


def test_fedcac_critical_parameters_and_collaboration_written_out():
    from gossamer.algorithms.fl.personalized import FedCAC

    algo = FedCAC(tau=0.5, beta=2.0)
    before = torch.zeros(3, 6)
    after = torch.tensor([[3.0, 1.0, 0.5, 2.0, 0.1, 4.0],
                          [3.0, 1.0, 0.4, 2.0, 4.0, 0.1],
                          [0.1, 5.0, 6.0, 0.2, 3.0, 1.0]])
    layers = [(0, 4), (4, 2)]                      # two layers: 2 of 4 and 1 of 2 are critical
    mask = algo.critical(before, after, layers)    # |(after - before) * after| = after^2
    assert mask.tolist() == [[True, False, False, True, False, True],
                             [True, False, False, True, True, False],
                             [False, True, True, False, True, False]]
    glob = torch.full((6,), -1.0)
    out = algo.personalize(before, after, glob, layers, round_=1)
    # overlaps: (0,1) = 1 - 2/6, (0,2) = 1 - 6/6, (1,2) = 1 - 4/6; avg 1/3, max 2/3;
    # threshold = 1/3 + 1/2 * 1/3 = 1/2: only 0 and 1 collaborate
    custom01 = (after[0] + after[1]) / 2
    assert torch.allclose(out[0], torch.where(mask[0], custom01, glob))
    assert torch.allclose(out[1], torch.where(mask[1], custom01, glob))
    assert torch.allclose(out[2], torch.where(mask[2], after[2], glob))


def test_fedcac_starts_from_fedavgs_round_and_keeps_personal_models(tmp_path):
    driver = SyncFLDriver(build_experiment(config.validate(_config("fedcac", {"tau": 0.3}))))
    plain = SyncFLDriver(build_experiment(config.validate(_config())))
    driver.run_round()
    plain.run_round()
    assert torch.equal(driver.state.params, plain.state.params)      # both started from x_0
    personal = driver.personal
    takes_global = personal == driver.state.params                    # the non-critical ones
    assert 0.6 < takes_global.float().mean() < 0.8                    # about 1 - tau of them
    cfg = _config("fedcac", {"tau": 0.3})
    cfg["output"] = {"progress": False, "checkpoint_every": 1}
    rest = run_split(cfg, tmp_path, split=1, total=3)
    rest.run()
    assert (tmp_path / "a/clients.csv").read_bytes() == (tmp_path / "b/clients.csv").read_bytes()


def test_fedbn_keeps_each_clients_batchnorm_layers_and_averages_the_rest(tmp_path):
    """Round 1 starts everyone from the initial model (FedAvg's round); from round 2 each
    selected client starts from the received model with its own trained BatchNorm entries
    (weight, bias, running statistics), which no other client sees."""
    bn = {"model": {"name": "mlp_bn", "params": {"hidden": [16]}}}
    cfg = _config("fedbn", {"client_fraction": 0.5}, **bn)
    driver = SyncFLDriver(build_experiment(config.validate(cfg)))
    mask, names = driver.head, driver.head_names
    assert names == ("net.1.weight", "net.1.bias", "net.1.running_mean", "net.1.running_var")
    trainer = driver.exp.trainer
    for _ in range(3):
        personal, received = driver.personal.clone(), driver.state.params.clone()
        calls = []
        real = trainer.train

        def spy(rows, nodes, key, calls=calls, real=real, **kw):
            calls.append((rows.clone(), np.array(nodes)))
            return real(rows, nodes, key, **kw)

        trainer.train = spy
        driver.run_round()
        trainer.train = real
        (starts, trained), = calls
        idx = torch.from_numpy(trained)
        assert torch.equal(starts[:, ~mask], received[~mask].expand(len(trained), -1))
        assert torch.equal(starts[:, mask], personal[idx][:, mask])       # its own, or the initial
        others = torch.from_numpy(np.setdiff1d(np.arange(8), trained))
        assert torch.equal(driver.personal[others], personal[others])      # untouched
        assert not torch.equal(driver.personal[idx][:, mask], personal[idx][:, mask])
    models = driver.algorithm.personal_model(driver.state.params, driver.personal, mask)
    assert torch.equal(models[:, ~mask], driver.state.params[~mask].expand(8, -1))
    rest = run_split({**cfg, "output": {"progress": False, "checkpoint_every": 1}}, tmp_path, split=1, total=3)
    rest.run()
    for name in ("metrics.csv", "clients.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    with pytest.raises(ConfigError, match="model.name: fedbn keeps each client's BatchNorm layers local"):
        build_experiment(config.validate(_config("fedbn")))
