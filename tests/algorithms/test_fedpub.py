"""FED-PUB: similarity weights, personalized models that keep each client's masks, the L1 and
proximal terms, graph-sample training and per-client evaluation in the synchronous FL driver,
resume, refusals."""

import math

import numpy as np
import pytest
import torch

from gossamer import config
from gossamer.algorithms.fl.fedpub import FedPub, mask_parameters, similarity_weights
from gossamer.algorithms.local import LocalObjective
from gossamer.config import ConfigError
from gossamer.models import ParamSpec, build_model, make_stacked_forward
from gossamer.sim.drivers.sync_fl import SyncFLDriver
from gossamer.sim.experiment import build_experiment
from gossamer.training.trainer import SGD, BatchedTrainer, LocalSchedule
from tests.conftest import run_split


def _sbm(name="fedpub", masked=True, **over):
    cfg = {
        "name": f"sbm-{name}", "seed": 0,
        "data": {"dataset": "sbm", "params": {"num_clients": 4, "nodes": 80, "communities": 4,
                                              "classes": 3, "features": 4, "groups": 2}},
        "partition": {"name": "natural", "num_nodes": 4},
        "model": {"name": "gcn", "params": {"hidden": 8, "masked": masked}},
        "algorithm": {"name": name, "params": {}},
        "local": {"epochs": 2, "batch_size": 1, "lr": 0.2},
        "stop": {"rounds": 3},
        "output": {"progress": False, "checkpoint_every": 1},
    }
    cfg.update(over)
    return cfg


def test_similarity_weights_written_out():
    e = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])   # clients 0 and 2 point the same way
    alpha = similarity_weights(e, tau=1.0)
    x = math.e
    expected = torch.tensor([[x, 1, x], [1, x, 1], [x, 1, x]], dtype=torch.float64)
    expected /= expected.sum(1, keepdim=True)
    assert torch.allclose(alpha, expected)
    assert torch.allclose(alpha.sum(1), torch.ones(3, dtype=torch.float64))
    assert torch.equal(alpha[0], alpha[2]) and alpha[0, 0] == alpha[0, 2]
    assert torch.allclose(similarity_weights(e, tau=0.0), torch.full((3, 3), 1 / 3, dtype=torch.float64))
    sharp = similarity_weights(e, tau=50.0)
    assert sharp[1, 1] > 0.999 and abs(float(sharp[0, 0]) - 0.5) < 1e-6


def test_personalized_models_keep_each_clients_masks():
    algo = FedPub(tau=1.0)
    after = torch.tensor([[1.0, 10.0, 2.0, 20.0], [3.0, 30.0, 4.0, 40.0]])
    masks = torch.tensor([False, True, False, True])
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    out = algo.personalize(after, after, after.mean(0), [], 1, embeddings=emb, masks=masks)
    a = math.e / (math.e + 1)
    assert out.shape == (2, 8) and torch.equal(out[:, :4], after)       # evaluated: the trained model
    assert torch.allclose(out[0, 4:], torch.tensor([a * 1 + (1 - a) * 3, 10, a * 2 + (1 - a) * 4, 20]))
    assert torch.allclose(out[1, 4:], torch.tensor([(1 - a) * 1 + a * 3, 30, (1 - a) * 2 + a * 4, 40]))


def test_the_l1_and_proximal_terms_against_a_plain_sgd_step():
    model = build_model("masked_mlp", (3,), 2, seed=0, hidden=[4])
    spec = ParamSpec.from_module(model)
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])
    forward = make_stacked_forward(model, spec, x[0])
    trainer = BatchedTrainer(forward, spec, x, y, [np.arange(5)], LocalSchedule(5, 1, shuffle=False),
                             SGD(0.1), seed=0)
    start = spec.flatten(model)
    with torch.no_grad():                           # masks away from 1 so sign() is checked both ways
        start[mask_parameters(spec)[1]] = torch.linspace(-1, 1, int(mask_parameters(spec)[1].sum()))
    anchor = start + 0.5
    objective = FedPub(l1=0.3, loc_l2=0.7).start_objective(None, anchor[None], spec.names)
    assert objective.l1 == ("layers.0.mask", "layers.1.mask") and "layers.0.mask" not in objective.prox_only
    out = trainer.train(start[None].clone(), np.array([0]), 0, objective=objective).params[0]
    spec.load_into(model, start)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    grads = dict(zip(spec.names, torch.autograd.grad(loss, list(model.parameters())), strict=True))
    views, anchors = spec.views(start[None]), spec.views(anchor[None])
    for name, got in spec.views(out[None]).items():
        w = views[name][0]
        term = 0.3 * torch.sign(w) if name.endswith("mask") else 0.7 * (w - anchors[name][0])
        assert torch.allclose(got[0], w - 0.1 * (grads[name] + term), atol=1e-6), name


def test_a_round_personalizes_by_embedding_keeps_masks_and_averages_the_global_model():
    driver = SyncFLDriver(build_experiment(config.validate(_sbm())))
    exp = driver.exp
    numel = exp.spec.numel
    assert driver.personal.shape == (4, 2 * numel)
    driver.run_round()
    trained, start = driver.personal[:, :numel], driver.personal[:, numel:]
    masks = mask_parameters(exp.spec)[1]
    assert torch.equal(start[:, masks], trained[:, masks])               # masks stay local
    assert not torch.equal(trained[:, masks], driver.exp.init_params.expand(4, -1)[:, masks])
    model = exp.model                                                     # embeddings the plain way
    emb = []
    for row in trained:
        exp.spec.load_into(model, row)
        with torch.no_grad():
            emb.append(model.stacked_embedding({k: v[None] for k, v in model.named_parameters()},
                                               model.proxy_input(0)[None])[0])
    alpha = similarity_weights(torch.stack(emb), 10.0).float()
    assert torch.allclose(start[:, ~masks], (alpha @ trained)[:, ~masks], atol=1e-5)
    assert torch.allclose(driver.state.params, trained.mean(0), atol=1e-6)   # FedAvg, equal sizes
    assert driver.extra_up == 4 * 8                                      # the 8-float embedding


def test_graph_clients_are_judged_on_their_own_test_nodes():
    driver = SyncFLDriver(build_experiment(config.validate(_sbm())))
    for _ in range(2):
        driver.run_round()
    row = driver.evaluate()
    exp, numel = driver.exp, driver.exp.spec.numel
    model, ds = exp.model, exp.dataset
    accuracy = []
    for c in range(4):
        exp.spec.load_into(model, driver.personal[c, :numel])
        test = ds.y_train[4 + c]
        with torch.no_grad():
            pred = model(ds.x_train[4 + c][None])[0].argmax(-1)
        accuracy.append(float((pred == test)[test >= 0].float().mean()))
    assert np.allclose(driver.personal_accuracy, accuracy)
    assert row["personal_accuracy"] == pytest.approx(np.mean(accuracy))
    assert exp.personal.targets.tolist() == [int((ds.y_train[4 + c] >= 0).sum()) for c in range(4)]
    exp.spec.load_into(model, driver.state.params)                        # the global model
    with torch.no_grad():
        pred = model(ds.x_test).argmax(-1)
    assert row["test_accuracy"] == pytest.approx(float((pred == ds.y_test)[ds.y_test >= 0].float().mean()))


@pytest.mark.parametrize("name", ["fedpub", "fedavg"])
def test_graph_runs_resume_bit_identically(tmp_path, name):
    cfg = _sbm(name, masked=name == "fedpub")
    rest = run_split(cfg, tmp_path, split=1, total=3)
    rest.run()
    for file in ("metrics.csv", "clients.csv"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()


def test_kept_adam_state_carries_over_between_a_clients_rounds(tmp_path):
    """``keep_optimizer_state``: each client's Adam moments and step count live in the client
    store from one round to its next (after 3 rounds of 2 steps every client has taken 6),
    the run differs from fresh-per-round Adam, and it resumes bit-identically (the store is in
    the checkpoint). It needs ``local.optimizer: adamw``."""
    adam = {"epochs": 2, "batch_size": 1, "optimizer": "adamw", "lr": 0.01}
    kept = _sbm(algorithm={"name": "fedpub", "params": {"keep_optimizer_state": True}}, local=adam)
    driver = SyncFLDriver(build_experiment(config.validate(kept)))
    fresh = SyncFLDriver(build_experiment(config.validate(_sbm(local=adam))))
    assert fresh.client_state is None
    for _ in range(3):
        driver.run_round()
        fresh.run_round()
    state = driver.client_state.get(np.arange(4))
    numel = driver.exp.spec.numel
    assert state.shape == (4, 2 * numel + 1) and state[:, -1].tolist() == [6.0] * 4
    assert float(state[:, numel:2 * numel].min()) >= 0 and float(state[:, numel:2 * numel].max()) > 0
    assert not torch.equal(driver.personal, fresh.personal)
    rest = run_split(kept, tmp_path, split=1, total=3)
    rest.run()
    for file in ("metrics.csv", "clients.csv"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()
    with pytest.raises(ConfigError, match="local.optimizer"):
        build_experiment(config.validate(_sbm(algorithm={"name": "fedpub",
                                                         "params": {"keep_optimizer_state": True}})))


@pytest.mark.parametrize("change, field", [
    ({"model": {"name": "gcn", "params": {"hidden": 8}}}, "model.name: fedpub needs a masked model"),
    ({"model": {"name": "mlp"}, "algorithm": {"name": "fedavg"}}, "model.name: dataset sbm labels every node"),
    ({"partition": {"name": "iid", "num_nodes": 4}}, "partition.name: dataset sbm is split into client"),
    ({"partition": {"name": "natural", "num_nodes": 4, "test_fraction": 0.2}}, "partition.test_fraction"),
])
def test_what_does_not_fit_is_refused_in_one_line(change, field):
    with pytest.raises(ConfigError) as info:
        build_experiment(config.validate({**_sbm(), **change}))
    assert str(info.value).startswith(field) and "\n" not in str(info.value)


def test_bad_params_are_refused():
    for params, message in (({"tau": -1}, "tau"), ({"l1": -1}, "l1")):
        with pytest.raises(ValueError, match=message):
            config.validate(_sbm(algorithm={"name": "fedpub", "params": params}))
    assert LocalObjective().by_name is False
    from gossamer.sim.sharded import check_config

    check_config(config.validate(_sbm()))           # graph data and FED-PUB run on ranks (tests/sim/test_sharded.py)
