"""The layer-by-layer stacked forward (models/layerwise.py): equal to vmap, chosen for conv
models, refused (vmap kept) for graphs it cannot run."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gossamer.models import ParamSpec, build_model, make_stacked_forward
from gossamer.models.layerwise import CONV_STRATEGIES, layerwise_forward
from gossamer.training.trainer import SGD, BatchedTrainer, LocalSchedule


class _Block(nn.Module):
    """Convolutions with GroupNorm, a residual sum, pooling, LayerNorm and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(2, 8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.ln = nn.LayerNorm(32)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        h = F.relu(self.norm1(self.conv1(x)))
        h = h + self.conv2(h)
        h = h - h.mean(dim=(-2, -1), keepdim=True)         # a reduction that keeps the samples apart
        return self.head(self.ln(torch.flatten(self.pool(h), 1)))


class _BatchMean(nn.Module):
    """Mixes samples (a mean over the batch axis): the folded executor must refuse it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x):
        h = self.conv(x)
        return self.fc((h - h.mean(0)).flatten(1))


def _rows(module, spec, nodes, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = spec.flatten(module)
    return base + 0.05 * torch.randn(nodes, spec.numel, generator=g)     # every node its own weights


def _same_as_vmap(forward, vm, module, spec, x, atol=1e-5, grad_atol=1e-4):
    """Both forwards on the same per-node rows: equal outputs and equal gradients."""
    a = _rows(module, spec, x.shape[0]).requires_grad_(True)
    b = a.detach().clone().requires_grad_(True)
    out_l, out_v = forward(spec.views(a), x), vm(spec.views(b), x)
    assert out_l.shape == out_v.shape
    assert torch.allclose(out_l, out_v, atol=atol)
    out_l.square().sum().backward()
    out_v.square().sum().backward()
    assert torch.allclose(a.grad, b.grad, atol=grad_atol, rtol=1e-3)


@pytest.mark.parametrize("strategy", CONV_STRATEGIES)
def test_layerwise_equals_vmap_forward_and_gradients(strategy):
    torch.manual_seed(0)
    module = _Block()
    spec = ParamSpec.from_module(module)
    x = torch.randn(3, 4, 3, 6, 6)
    layered, why = layerwise_forward(module, x[0, 0], conv=strategy)
    assert layered is not None, why
    vm = make_stacked_forward(module, spec, x[0, 0], "vmap")
    assert layered(spec.views(_rows(module, spec, 3)), x).shape == (3, 4, 5)
    _same_as_vmap(layered, vm, module, spec, x)


def test_auto_runs_conv_models_layerwise_and_records_the_choice():
    model = build_model("cnn", (1, 12, 12), 4, seed=0)
    spec = ParamSpec.from_module(model)
    forward = make_stacked_forward(model, spec, torch.zeros(1, 12, 12))
    assert forward.path["forward"] == "layerwise"
    assert set(forward.path) == {"forward", "conv features.0", "conv features.3"}
    assert all(v in CONV_STRATEGIES for k, v in forward.path.items() if k != "forward")
    pinned = make_stacked_forward(model, spec, torch.zeros(1, 12, 12), conv="per_node")
    assert pinned.path["conv features.0"] == "per_node"
    assert make_stacked_forward(model, spec, torch.zeros(1, 12, 12), "vmap").path == {"forward": "vmap"}
    mlp = build_model("mlp", (6,), 3, seed=0)
    assert make_stacked_forward(mlp, ParamSpec.from_module(mlp), torch.zeros(6)).path == {"forward": "stacked"}


class _MeanAll(_BatchMean):
    def forward(self, x):
        h = self.conv(x)
        return self.fc((h - h.mean()).flatten(1))           # over every axis: the batch too


def test_a_graph_that_mixes_samples_keeps_vmap():
    assert layerwise_forward(_MeanAll(), torch.zeros(1, 6, 6))[0] is None
    module = _BatchMean()
    spec = ParamSpec.from_module(module)
    layered, why = layerwise_forward(module, torch.zeros(1, 6, 6))
    assert layered is None and "mean" in why
    assert make_stacked_forward(module, spec, torch.zeros(1, 6, 6)).path == {"forward": "vmap"}
    with pytest.raises(Exception, match="layerwise cannot run _BatchMean"):
        make_stacked_forward(module, spec, torch.zeros(1, 6, 6), "layerwise")
    with pytest.raises(ValueError, match="model.conv"):
        layerwise_forward(module, torch.zeros(1, 6, 6), conv="winograd")


def test_training_through_the_layerwise_forward_equals_per_node_sgd():
    """The trainer's autograd path over the layer-by-layer forward: each node's own SGD."""
    torch.manual_seed(0)
    model = build_model("cnn", (1, 12, 12), 3, seed=0)
    spec = ParamSpec.from_module(model)
    sizes = [6, 3, 5]
    x = torch.rand(sum(sizes), 1, 12, 12)
    y = torch.randint(0, 3, (sum(sizes),))
    bounds = np.cumsum([0, *sizes])
    shards = [np.arange(bounds[i], bounds[i + 1]) for i in range(3)]
    forward = make_stacked_forward(model, spec, x[0], "layerwise", conv="channels_last")
    trainer = BatchedTrainer(forward, spec, x, y, shards, LocalSchedule(2, epochs=1), SGD(0.1), seed=1)
    rows = _rows(model, spec, 3, seed=2)
    nodes = np.arange(3)
    result = trainer.train(rows, nodes, keys=5)
    idx, valid = trainer.batches(nodes, np.full(3, 5))
    for b in range(3):
        spec.load_into(model, rows[b])
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for t in range(idx.shape[1]):
            take = idx[b, t][valid[b, t]]
            if len(take):
                opt.zero_grad()
                F.cross_entropy(model(x[take]), y[take]).backward()
                opt.step()
        assert torch.allclose(result.params[b], spec.flatten(model), atol=1e-5)


@pytest.mark.parametrize("name,shape,params", [
    ("cnn", (1, 12, 12), {}),
    ("cnn_fedavg", (2, 9, 10), {"channels": [3, 4], "hidden": 6}),
    ("resnet8_gn", (3, 8, 8), {"width": 4}),
    ("resnet18_gn", (3, 6, 6), {"width": 2, "groups": 1}),
], ids=["cnn", "cnn_fedavg", "resnet8_gn", "resnet18_gn"])
def test_every_zoo_conv_model_runs_layer_by_layer_as_vmap_does(name, shape, params):
    model = build_model(name, shape, 5, seed=0, **params)
    spec = ParamSpec.from_module(model)
    forward = make_stacked_forward(model, spec, torch.zeros(shape), conv="grouped")
    assert forward.path["forward"] == "layerwise"
    vm = make_stacked_forward(model, spec, torch.zeros(shape), "vmap")
    _same_as_vmap(forward, vm, model, spec, torch.randn(3, 2, *shape), atol=1e-4, grad_atol=1e-3)


def test_timed_conv_choices_are_kept_per_machine(tmp_path, monkeypatch):
    """`model.conv: auto` times each convolution once and keeps the choice (cache_path), so a
    second build of the same model picks the same kernels whatever its own timings say."""
    from gossamer.models import layerwise

    monkeypatch.setenv("GOSSAMER_CACHE_DIR", str(tmp_path))
    model = build_model("cnn", (1, 12, 12), 4, seed=0)
    first = layerwise_forward(model, torch.zeros(1, 12, 12))[0].conv
    assert layerwise.cache_path().exists() and set(first.values()) <= set(CONV_STRATEGIES)
    slowest_first = {s: -i for i, s in enumerate(CONV_STRATEGIES)}            # a different ranking
    monkeypatch.setattr(layerwise, "_time_conv", lambda mod, shape, n, k, s, grad, device: slowest_first[s])
    assert layerwise_forward(model, torch.zeros(1, 12, 12))[0].conv == first
    layerwise.cache_path().unlink()
    layerwise._save_cache({"an older probe's key": "grouped"})
    assert set(layerwise_forward(model, torch.zeros(1, 12, 12))[0].conv.values()) == {CONV_STRATEGIES[-1]}
    assert all(k.startswith(f"{layerwise.PROBE}|") for k in layerwise._load_cache())    # dropped when timing again


class _Tokens(nn.Module):
    def __init__(self, padding_idx=None) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 4, padding_idx=padding_idx)
        self.norm = nn.LayerNorm(4)
        self.fc = nn.Linear(4 * 3, 2)

    def forward(self, x):
        return self.fc(torch.flatten(self.norm(self.embed(x)), 1))


def test_embeddings_run_layer_by_layer_and_padding_indices_keep_vmap():
    module = _Tokens()
    spec = ParamSpec.from_module(module)
    layered, why = layerwise_forward(module, torch.zeros(3, dtype=torch.long))
    assert layered is not None, why
    vm = make_stacked_forward(module, spec, torch.zeros(3, dtype=torch.long), "vmap")
    _same_as_vmap(layered, vm, module, spec, torch.randint(0, 11, (3, 5, 3)))
    assert layerwise_forward(_Tokens(padding_idx=0), torch.zeros(3, dtype=torch.long))[0] is None


class _ConvStack(nn.Module):
    """Convolutions whose outputs pass through activations and pooling (kept in the grouped
    layout), a residual sum and a reduction (which fold them back first)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x):
        h = self.pool(torch.relu(self.conv1(x)))
        h = F.relu(h + self.conv2(h))
        h = h - h.mean(dim=(-2, -1), keepdim=True)
        return self.fc(torch.flatten(F.avg_pool2d(h, 1), 1))


@pytest.mark.parametrize("strategy", ["grouped", "channels_last"])
def test_grouped_layout_passes_through_sample_wise_layers_with_the_same_bits(monkeypatch, strategy):
    """A grouped convolution's output stays in its [n, B * C, H, W] layout through ReLU and
    pooling (two copies fewer per convolution): outputs and gradients are bit for bit those of
    folding it back after every convolution."""
    import gossamer.models.layerwise as lw

    torch.manual_seed(0)
    module = _ConvStack()
    spec = ParamSpec.from_module(module)
    x = torch.randn(3, 4, 3, 8, 8)
    rows = spec.flatten(module).reshape(1, -1).repeat(3, 1) + 0.01 * torch.randn(3, spec.numel)
    forward, _ = layerwise_forward(module, x[0, 0], conv=strategy)
    folds = []                                 # layout changes (copies), either way
    real_fold, real_group = lw._to_folded, lw._to_grouped
    monkeypatch.setattr(lw, "_to_folded", lambda g, nodes: folds.append(g.shape) or real_fold(g, nodes))
    monkeypatch.setattr(lw, "_to_grouped", lambda h, nodes: folds.append(h.shape) or real_group(h, nodes))

    def run():
        params = {k: v.clone().requires_grad_(True) for k, v in spec.views(rows).items()}
        out = forward(params, x)
        grads = torch.autograd.grad(out.square().sum(), list(params.values()))
        return out, grads

    kept_out, kept_grads = run()
    kept_folds = len(folds)
    monkeypatch.setattr(lw.LayerwiseForward, "_keeps_layout", lambda self, node: False)
    folds.clear()
    out, grads = run()
    assert kept_folds < len(folds)
    assert torch.equal(kept_out, out)
    assert all(torch.equal(a, b) for a, b in zip(kept_grads, grads, strict=True))


@pytest.mark.parametrize("bias", [True, False])
def test_dense_layers_gradients_are_autograds_but_the_inputs_product_order(bias):
    """Each node's dense layer (``_Dense``): the output, the weight's and the bias's gradients
    are autograd's through ``baddbmm`` bit for bit; the input's is ``g^T @ w`` (autograd:
    ``w^T @ g``, a transposed operand the BLAS runs slower), equal up to rounding."""
    from gossamer.models.layerwise import _Dense

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(4, 6, 9, generator=g), torch.randn(4, 5, 9, generator=g)
    b = torch.randn(4, 5, generator=g) if bias else None
    up = torch.randn(4, 5, 6, generator=g)
    leaves = [t.clone().requires_grad_(True) for t in (x, w) + ((b,) if bias else ())]
    ref = [t.clone().requires_grad_(True) for t in leaves]
    out = _Dense.apply(leaves[0], leaves[1], leaves[2] if bias else None)
    xt = ref[0].transpose(1, 2)
    want = torch.baddbmm(ref[2].unsqueeze(2), ref[1], xt) if bias else torch.bmm(ref[1], xt)
    assert torch.equal(out, want)
    got, expected = torch.autograd.grad(out, leaves, up), torch.autograd.grad(want, ref, up)
    assert all(torch.equal(a, e) for a, e in zip(got[1:], expected[1:], strict=True))
    assert torch.equal(got[0], torch.bmm(up.transpose(1, 2), w))
    assert torch.allclose(got[0], expected[0], atol=1e-5)
