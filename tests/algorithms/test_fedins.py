"""FedIns: the SSF site, instance-wise selection against a plain loop, the model's own loss in
the batched trainer, the frozen backbone, what is sent, pre-training, resume, refusals."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gossamer import config, wire
from gossamer.config import ConfigError
from gossamer.models import ParamSpec, make_stacked_forward
from gossamer.models.ssf_pool import SSFPool, select, ssf
from gossamer.sim.drivers.sync_fl import SyncFLDriver
from gossamer.sim.experiment import build_experiment
from gossamer.training.pretrain import public_rows
from gossamer.training.trainer import SGD, BatchedTrainer, LocalSchedule
from tests.conftest import run_split, small_config


def _backbone(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        net[0].bias.fill_(2.0)          # every hidden unit active: no all-zero query, no tie
    return net


def _rows(model, rows, seed=1):
    """``rows`` distinct pools of ``model`` ``[rows, P]`` (each parameter perturbed)."""
    spec = ParamSpec.from_module(model)
    base = spec.flatten(model).expand(rows, -1)
    gen = torch.Generator().manual_seed(seed)
    return spec, base + 0.3 * torch.randn(base.shape, generator=gen)


def test_an_ssf_site_scales_and_shifts_each_feature_or_channel():
    h = torch.tensor([[1.0, 2.0]])
    assert ssf(h, torch.tensor([[2.0, 3.0]]), torch.tensor([[1.0, -1.0]])).tolist() == [[3.0, 5.0]]
    conv = torch.ones(1, 2, 2, 2)
    out = ssf(conv, torch.tensor([[2.0, 3.0]]), torch.tensor([[0.5, 0.0]]))
    assert (out[0, 0] == 2.5).all() and (out[0, 1] == 3.0).all()


def test_top_k_selection_averages_the_most_similar_keys():
    query = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])                      # [1, 2, 2]
    keys = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]]])
    cos, weights = select(query, keys, top_k=2)
    assert torch.allclose(cos[0, 0], torch.tensor([1.0, 0.0, 2 ** -0.5, -1.0]))
    assert weights[0].tolist() == [[0.5, 0.0, 0.5, 0.0], [0.0, 0.5, 0.5, 0.0]]


def _loop(model, spec, row, x, y):
    """One pool ``row`` on instances ``x`` ``[n, 4]`` the plain way: each instance alone."""
    p = {k: v[0] for k, v in spec.views(row.reshape(1, -1)).items()}
    first = model.trunk[0]
    logits, losses = [], []
    for xi, yi in zip(x, y, strict=True):
        q = torch.relu(first(xi))                                          # the frozen query
        cos = torch.stack([F.cosine_similarity(q, k, dim=0) for k in p["keys"]])
        top = sorted(range(len(cos)), key=lambda m: -float(cos[m]))[: model.top_k]
        scale = sum(p["scale0"][m] for m in top) / len(top)
        shift = sum(p["shift0"][m] for m in top) / len(top)
        h = torch.relu(first(xi) * scale + shift)
        out = sum(p["head_weight"][m] @ h + p["head_bias"][m] for m in top) / len(top)
        logits.append(out)
        ce = F.cross_entropy(out[None], yi[None])
        losses.append((1 - model.lam) * ce + model.lam * (1 - cos[top].mean()))
    return torch.stack(logits), torch.stack(losses)


def test_the_stacked_pool_equals_a_plain_per_instance_loop():
    model = SSFPool(_backbone(), pool_size=5, top_k=3, lam=0.2, seed=0)
    assert [n for n, _ in model.named_parameters()] == ["scale0", "shift0", "keys", "head_weight", "head_bias"]
    spec, rows = _rows(model, 2)
    x = torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([[0, 1, 1, 0, 1, 0], [1, 1, 0, 0, 0, 1]])
    query = model.features(None, x, None)
    cos = select(query, spec.views(rows)["keys"], 3)[0].sort(-1, descending=True).values
    assert (cos[..., 2] - cos[..., 3]).min() > 1e-3          # no tie decides the selection
    logits = model.stacked_forward(spec.views(rows), x)
    loss = model.stacked_loss(spec.views(rows), x, y)
    for b in range(2):
        want_logits, want_loss = _loop(model, spec, rows[b], x[b], y[b])
        assert torch.allclose(logits[b], want_logits, atol=1e-6)
        assert torch.allclose(loss[b], want_loss, atol=1e-6)
    single = model.forward(x[0])            # the nn.Module forward is the stacked one for a row
    assert torch.allclose(single, model.stacked_forward(spec.views(spec.flatten(model)[None]), x[:1])[0])


def test_a_pool_of_one_is_plain_ssf_and_starts_at_the_backbone():
    backbone = _backbone()
    model = SSFPool(backbone, pool_size=1, top_k=3, lam=0.5, seed=0)
    assert [n for n, _ in model.named_parameters()] == ["scale0", "shift0", "head_weight", "head_bias"]
    spec = ParamSpec.from_module(model)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0, 1, 1])
    with torch.no_grad():
        model.scale0.fill_(1.0)
        model.shift0.zero_()
        want = backbone(x)
        assert torch.allclose(model(x), want, atol=1e-6)   # identity SSF: the backbone itself
        model.scale0.copy_(torch.tensor([[2.0, 0.5, 1.0]]))
        model.shift0.copy_(torch.tensor([[0.1, 0.0, -0.2]]))
        first, last = backbone[0], backbone[2]
        plain = last(torch.relu(first(x) * model.scale0[0] + model.shift0[0]))
        assert torch.allclose(model(x), plain, atol=1e-6)
        loss = model.stacked_loss(spec.views(spec.flatten(model)[None]), x[None], y[None])[0]
        assert torch.allclose(loss, F.cross_entropy(plain, y, reduction="none"), atol=1e-6)


def test_the_trainer_steps_on_the_models_own_loss():
    """One batched SGD step on two clients equals a step on each pool's stacked_loss."""
    model = SSFPool(_backbone(), pool_size=4, top_k=2, lam=0.3, seed=0)
    spec, rows = _rows(model, 2)
    x = torch.randn(10, 4, generator=torch.Generator().manual_seed(4))
    y = torch.tensor([0, 1] * 5)
    shards = [np.arange(0, 5), np.arange(5, 10)]
    forward = make_stacked_forward(model, spec, x[0])
    trainer = BatchedTrainer(forward, spec, x, y, shards, LocalSchedule(5, steps=1, shuffle=False),
                             SGD(0.5), seed=0)
    out = trainer.train(rows, np.array([0, 1]), 1)
    for b, shard in enumerate(shards):
        row = rows[b:b + 1].clone().requires_grad_(True)
        loss = model.stacked_loss(spec.views(row), x[shard][None], y[shard][None]).mean()
        (grad,) = torch.autograd.grad(loss, row)
        assert grad[0, spec.offsets[spec.names.index("keys")]:].abs().sum() > 0   # keys learn too
        assert torch.allclose(out.params[b], rows[b] - 0.5 * grad[0], atol=1e-6)


def _config(pool_size=4, rounds=3, **algo):
    cfg = small_config("fedins", stop={"rounds": rounds})
    cfg["partition"] = {"name": "dirichlet", "num_nodes": 6, "params": {"alpha": 0.3},
                        "test_fraction": 0.2, "public_fraction": 0.2}
    cfg["model"] = {"name": "mlp", "params": {"hidden": [16]},
                    "pretrain": {"steps": 40, "lr": 0.1, "batch_size": 16}}
    cfg["algorithm"] = {"name": "fedins", "params": {"pool_size": pool_size, "top_k": min(2, pool_size), **algo}}
    return cfg


def test_fl_trains_and_sends_only_the_pool_and_the_backbone_stays_frozen():
    exp = build_experiment(config.validate(_config()))
    model = exp.model
    assert exp.spec.names == ("scale0", "shift0", "keys", "head_weight", "head_bias")
    assert exp.spec.numel == 4 * 16 * 2 + 4 * 16 + 4 * 10 * 16 + 4 * 10
    frozen = [p.detach().clone() for layer in model.trunk for p in layer.parameters()]
    driver = SyncFLDriver(exp)
    for _ in range(3):
        driver.run_round()
    assert all(torch.equal(a, p) for a, p in
               zip(frozen, (p for layer in model.trunk for p in layer.parameters()), strict=True))
    assert not torch.equal(driver.state.params, exp.init_params)        # the pool did learn
    per_message = wire.encoded_size(exp.spec.numel)
    assert driver.bytes_up == driver.bytes_down == 3 * 6 * per_message
    row = driver.evaluate()
    assert 0 <= row["personal_accuracy"] <= 1 and 0 <= row["test_accuracy"] <= 1


def test_pretraining_is_deterministic_and_uses_rows_no_client_holds():
    a = build_experiment(config.validate(_config()))
    b = build_experiment(config.validate(_config()))
    assert torch.equal(a.init_params, b.init_params)
    for la, lb in zip(a.model.trunk, b.model.trunk, strict=True):
        assert all(torch.equal(p, q) for p, q in zip(la.parameters(), lb.parameters(), strict=True))
    public, rest = public_rows(len(a.dataset.y_train), 0.2, 0)
    assert len(public) == int(np.ceil(0.2 * len(a.dataset.y_train)))
    held = set(public.tolist())
    tests = a.personal.rows[a.personal.sizes > 0]
    assert not held & set(np.concatenate(a.shards).tolist()) and not held & set(tests.ravel().tolist())
    fresh = config.validate({**_config(), "model": {"name": "mlp", "params": {"hidden": [16]},
                                                    "pretrain": {"steps": 1, "lr": 0.1}}})
    c = build_experiment(fresh)
    assert not torch.equal(a.model.trunk[0].weight, c.model.trunk[0].weight)   # it did train


def test_fedins_resumes_bit_identically(tmp_path):
    cfg = _config()
    cfg["output"] = {"progress": False, "checkpoint_every": 1}
    rest = run_split(cfg, tmp_path, split=1, total=3)
    rest.run()
    for name in ("metrics.csv", "clients.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_what_fedins_cannot_run_is_refused_in_one_line():
    from gossamer.runtime.common import refuse_simulator_only

    cases = [
        ({"model": {"name": "mlp", "params": {"hidden": [16]}}}, "model.pretrain: fedins adapts"),
        ({"partition": {"name": "iid", "num_nodes": 6}}, "model.pretrain: pre-training needs public rows"),
        ({"model": {"name": "logreg", "pretrain": {"steps": 1, "lr": 0.1}}}, "model.name: the backbone has no layer"),
    ]
    for over, message in cases:
        with pytest.raises(ConfigError) as err:
            build_experiment(config.validate({**_config(), **over}))
        assert str(err.value).startswith(message) and "\n" not in str(err.value)
    cfg = _config()                  # real processes run it (each pre-trains the backbone)
    del cfg["partition"]["test_fraction"]
    refuse_simulator_only(config.validate(cfg))
    for params, field in (({"top_k": 5}, "top_k"), ({"lam": 1.0}, "lam"), ({"pool_size": 0}, "pool_size")):
        with pytest.raises(ValueError, match=field):
            config.validate(_config(**params))


def test_centred_queries_subtract_the_public_mean_feature():
    model = SSFPool(_backbone(), pool_size=5, top_k=2, seed=0)
    spec, rows = _rows(model, 1)
    public = torch.randn(7, 4, generator=torch.Generator().manual_seed(5))
    x = torch.randn(1, 4, 4, generator=torch.Generator().manual_seed(6))
    raw = model.features(None, x, None)
    model.center_queries(public)
    mean = torch.relu(model.trunk[0](public)).mean(0)
    assert torch.allclose(model.query_center, mean)
    cos, weights = model.route(spec.views(rows), x)
    want_cos, want_weights = select(raw - mean, spec.views(rows)["keys"], 2)
    assert torch.equal(cos, want_cos) and torch.equal(weights, want_weights)


def test_the_saved_model_holds_its_backbone_and_predicts_as_the_run(tmp_path):
    from gossamer.api import run

    cfg = _config(rounds=2, center_queries=True)
    del cfg["partition"]["test_fraction"]
    result = run(cfg, out=tmp_path / "run")
    model = result.model()                     # a fresh mlp, wrapped, loaded from model.pt
    exp = build_experiment(config.validate(cfg))
    with torch.no_grad():
        pred = model(exp.evaluator.x).argmax(-1)
    accuracy = (pred == exp.evaluator.y).float().mean().item()
    assert accuracy == pytest.approx(result.summary["final_test_accuracy"], abs=1e-6)
    assert torch.equal(model.trunk[0].weight, exp.model.trunk[0].weight)
    assert torch.equal(model.query_center, exp.model.query_center)


def test_a_cnn_backbone_adapts_its_channels_and_rows_stay_apart():
    from gossamer.models import build_model

    lenet = build_model("cnn", (1, 12, 12), 3, seed=0)
    x = torch.rand(2, 3, 1, 12, 12, generator=torch.Generator().manual_seed(7))
    one = SSFPool(lenet, pool_size=1, seed=0)
    assert [p.shape[1] for n, p in one.named_parameters() if n.startswith("scale")] == [6, 16, 120, 84]
    with torch.no_grad():
        for name, p in one.named_parameters():
            if name.startswith("scale"):
                p.fill_(1.0)
            elif name.startswith("shift"):
                p.zero_()
        assert torch.allclose(one(x[0]), lenet(x[0]), atol=1e-5)
    pool = SSFPool(build_model("cnn", (1, 12, 12), 3, seed=0), pool_size=4, top_k=2, seed=1)
    spec, rows = _rows(pool, 2)
    together = pool.stacked_forward(spec.views(rows), x)
    for b in range(2):
        alone = pool.stacked_forward(spec.views(rows[b:b + 1]), x[b:b + 1])
        assert torch.allclose(together[b], alone[0], atol=1e-6)


def test_a_registered_population_refuses_public_rows():
    """(The sharded simulator runs them: every rank pre-trains alike; tests/sim/test_sharded.py.)"""
    cfg = _config()
    del cfg["partition"]["test_fraction"]
    lazy = {**cfg, "population": {"lazy": True}}
    with pytest.raises(ConfigError, match="^partition.public_fraction: not supported with population.lazy"):
        build_experiment(config.validate(lazy))
