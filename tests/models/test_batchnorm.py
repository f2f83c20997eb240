"""BatchNorm with per-node running statistics (models/layerwise.py `_batch_norm`, the rows'
`ParamSpec.stats`): each node trains as torch trains one model on that node's batches,
padding never enters a node's statistics, evaluation uses the running statistics, and what
cannot run with BatchNorm is refused in one line naming it."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gossamer import api
from gossamer.config import ConfigError
from gossamer.models import ModelNotVectorizable, ParamSpec, build_model, make_stacked_forward
from gossamer.training.evaluator import BatchedEvaluator
from gossamer.training.trainer import SGD, AdamW, BatchedTrainer, LocalSchedule


class _Net(nn.Module):
    """Conv, BatchNorm2d, ReLU, pooling, BatchNorm1d (no affine), linear. (The convolution
    has no bias: BatchNorm cancels it, so its gradient is rounding noise, which AdamW would
    scale up to full steps in either implementation.)"""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4, momentum=0.3)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.flat = nn.Flatten()
        self.bn1 = nn.BatchNorm1d(16, affine=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.bn1(self.flat(self.pool(torch.relu(self.bn(self.conv(x)))))))


def _setup(sizes, batch, optimizer=None):
    torch.manual_seed(0)
    model = _Net()
    spec = ParamSpec.from_module(model)
    x = torch.randn(sum(sizes), 2, 6, 6)
    y = torch.randint(0, 3, (sum(sizes),))
    bounds = np.cumsum([0, *sizes])
    shards = [np.arange(bounds[i], bounds[i + 1]) for i in range(len(sizes))]
    forward = make_stacked_forward(model, spec, x[0], conv="grouped")
    trainer = BatchedTrainer(forward, spec, x, y, shards, LocalSchedule(batch, epochs=2),
                             optimizer or SGD(0.1), seed=1)
    return model, spec, x, y, forward, trainer


def test_the_row_holds_running_statistics_in_module_order():
    model, spec, *_ = _setup([4], 2)
    assert spec.stats == ("bn.running_mean", "bn.running_var", "bn1.running_mean", "bn1.running_var")
    assert spec.names.index("bn.running_mean") == spec.names.index("bn.bias") + 1
    assert spec.numel == sum(p.numel() for p in model.parameters()) + 2 * 4 + 2 * 16
    assert "bn.num_batches_tracked" not in spec.names
    with torch.no_grad():
        model.bn.running_var.fill_(3.0)
    row = spec.flatten(model)
    other = _Net()
    spec.load_into(other, row)
    assert torch.equal(other.bn.running_var, torch.full((4,), 3.0))


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_each_node_trains_as_torch_trains_one_model_on_its_batches(optimizer):
    """Unequal shards, so short batches are padded: a node's statistics (batch and running)
    are its valid samples' alone."""
    opt = SGD(0.1, momentum=0.9, weight_decay=0.01) if optimizer == "sgd" else AdamW(0.01, weight_decay=0.01)
    model, spec, x, y, _, trainer = _setup([8, 3, 7], batch=4, optimizer=opt)
    assert trainer.forward.path["forward"] == "layerwise"
    rows = spec.flatten(model).repeat(3, 1)
    rows += 0.01 * torch.randn(rows.shape, generator=torch.Generator().manual_seed(3))
    rows[:, spec.offsets[spec.names.index("bn.running_var")]:][:, :4].abs_()     # variances stay > 0
    nodes = np.arange(3)
    result = trainer.train(rows.clone(), nodes, keys=5)
    idx, valid = trainer.batches(nodes, np.full(3, 5))
    assert (valid.sum(axis=2) % 4).any()               # some batch really is short
    for b in range(3):
        spec.load_into(model, rows[b])
        model.train()
        params = list(model.parameters())
        torch_opt = (torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.01) if optimizer == "sgd"
                     else torch.optim.AdamW(params, lr=0.01, weight_decay=0.01))
        for t in range(idx.shape[1]):
            take = idx[b, t][valid[b, t]]
            if len(take):
                torch_opt.zero_grad()
                F.cross_entropy(model(x[take]), y[take]).backward()
                torch_opt.step()
        torch.testing.assert_close(result.params[b], spec.flatten(model), atol=2e-5, rtol=1e-4)


def test_evaluation_normalizes_with_each_nodes_running_statistics():
    model, spec, x, y, forward, _ = _setup([4], 2)
    rows = spec.flatten(model).repeat(2, 1)
    view = spec.views(rows)
    view["bn.running_mean"][1] = 0.5
    view["bn.running_var"][1] = 2.0
    out = forward(spec.views(rows), x[:3].unsqueeze(0).expand(2, -1, -1, -1, -1))
    for b in range(2):
        spec.load_into(model, rows[b])
        model.eval()
        with torch.no_grad():
            torch.testing.assert_close(out[b], model(x[:3]), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(out[0], out[1])
    view["bn.running_var"][1] = -1.0          # (noise or an attack) counts as 0: finite outputs
    assert torch.isfinite(forward(spec.views(rows), x[:3].unsqueeze(0).expand(2, -1, -1, -1, -1))).all()
    evaluator = BatchedEvaluator(forward, spec, x, y, 4)
    _, loss = evaluator.evaluate(rows[:1])
    model.eval()
    spec.load_into(model, rows[0])
    with torch.no_grad():
        expected = F.cross_entropy(model(x), y)
    torch.testing.assert_close(loss[0].float(), expected, atol=1e-5, rtol=1e-4)


def test_what_a_row_cannot_hold_is_refused_in_one_line():
    for bad, match in [(nn.BatchNorm2d(2, track_running_stats=False), "track_running_stats"),
                       (nn.BatchNorm2d(2, momentum=None), "momentum=None")]:
        model = nn.Sequential(nn.Conv2d(1, 2, 3), bad, nn.Flatten(), nn.LazyLinear(2))
        model(torch.zeros(1, 1, 5, 5))
        with pytest.raises(ModelNotVectorizable, match=match):
            make_stacked_forward(model, ParamSpec.from_module(model), torch.zeros(1, 5, 5))

    class _Buffered(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)
            self.register_buffer("scale", torch.ones(3))

        def forward(self, x):
            return self.lin(x * self.scale)

    with pytest.raises(ModelNotVectorizable, match="scale"):
        m = _Buffered()
        make_stacked_forward(m, ParamSpec.from_module(m), torch.zeros(3))
    model = build_model("resnet8_bn", (3, 8, 8), 4, seed=0, width=4)
    with pytest.raises(ModelNotVectorizable, match="model layer stem.1: BatchNorm"):
        make_stacked_forward(model, ParamSpec.from_module(model), torch.zeros(3, 8, 8), "vmap")


def test_a_batchnorm_resnet_learns_with_fedavg_and_dpsgd_from_a_config(tmp_path):
    base = {"data": {"dataset": "mnist5k", "params": {"image": True}},
            "model": {"name": "resnet8_bn", "params": {"width": 4}},
            "local": {"epochs": None, "steps": 20, "batch_size": 16, "lr": 0.1},   # ~half an epoch
            "partition": {"name": "iid", "num_nodes": 8},
            "stop": {"rounds": 5}, "eval": {"every": 5, "test_subset": 300},
            "output": {"progress": False}}
    for algo in ({"name": "fedavg", "params": {"client_fraction": 0.5}}, {"name": "dpsgd"}):
        cfg = {**base, "name": algo["name"], "algorithm": algo}
        if algo["name"] == "dpsgd":
            cfg["topology"] = {"name": "ring"}
            cfg["eval"] = {**base["eval"], "nodes": 2}
        metrics = api.run(cfg, out=tmp_path / algo["name"]).metrics
        print(algo["name"], metrics["test_accuracy"].tolist(), metrics["test_loss"].tolist())
        assert metrics["test_accuracy"].iloc[-1] > 0.25, metrics      # chance is 0.1
        assert metrics["test_loss"].iloc[-1] < metrics["test_loss"].iloc[0] - 0.3, metrics


def test_what_cannot_train_batchnorm_is_a_config_error(tmp_path):
    cfg = {"name": "dp", "data": {"dataset": "random", "params": {"shape": [3, 8, 8], "num_classes": 4,
                                                                  "train": 40, "test": 8}},
           "model": {"name": "resnet8_bn", "params": {"width": 4}},
           "partition": {"num_nodes": 4}, "stop": {"rounds": 1}, "output": {"progress": False},
           "privacy": {"dp": {"level": "sample", "clip_norm": 1.0, "noise_multiplier": 1.0}}}
    with pytest.raises(ConfigError, match="privacy.dp: .*BatchNorm"):
        api.run(cfg, out=tmp_path / "dp")
    del cfg["privacy"]
    cfg["algorithm"] = {"name": "zo_fedavg"}
    with pytest.raises(ConfigError, match="model.name: zo_fedavg .*BatchNorm"):
        api.run(cfg, out=tmp_path / "zo")


@pytest.mark.parametrize("name,params,stats", [("resnet8_bn", 78042, 672), ("resnet18_bn", 11173962, 9600)])
def test_the_batchnorm_resnets_have_the_groupnorm_ones_parameters_plus_statistics(name, params, stats):
    model = build_model(name, (3, 32, 32), 10, seed=0)
    spec = ParamSpec.from_module(model)
    assert sum(p.numel() for p in model.parameters()) == params
    assert spec.numel == params + stats


def test_sam_updates_the_running_statistics_once_per_step():
    """SAM's second forward (at the perturbed weights) normalizes with the batch but leaves
    the running statistics alone: equal to torch with the layers' momentum 0 for that pass."""
    rho = 0.05
    model, spec, x, y, _, trainer = _setup([8, 7], batch=4, optimizer=SGD(0.1, sam_rho=rho))
    rows = spec.flatten(model).repeat(2, 1)
    nodes = np.arange(2)
    result = trainer.train(rows.clone(), nodes, keys=2)
    idx, valid = trainer.batches(nodes, np.full(2, 2))
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for b in range(2):
        spec.load_into(model, rows[b])
        model.train()
        params = list(model.parameters())
        for t in range(idx.shape[1]):
            take = idx[b, t][valid[b, t]]
            grads = torch.autograd.grad(F.cross_entropy(model(x[take]), y[take]), params)
            scale = rho / (torch.sqrt(sum(g.square().sum() for g in grads)) + 1e-12)
            with torch.no_grad():
                for p, g in zip(params, grads, strict=True):
                    p.add_(g * scale)
            momenta = [m.momentum for m in norms]
            for m in norms:
                m.momentum = 0.0
            sam = torch.autograd.grad(F.cross_entropy(model(x[take]), y[take]), params)
            for m, momentum in zip(norms, momenta, strict=True):
                m.momentum = momentum
            with torch.no_grad():
                for p, g, s in zip(params, grads, sam, strict=True):
                    p.sub_(g * scale).sub_(0.1 * s)
        torch.testing.assert_close(result.params[b], spec.flatten(model), atol=2e-5, rtol=1e-4)
