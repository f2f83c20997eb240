"""The zoo's benchmark models: cnn_fedavg, resnet8_gn, resnet18_gn, char_lstm, transformer."""

import numpy as np
import pytest
import torch
from torch import nn

from gossamer.models import ModelNotVectorizable, ParamSpec, build_model, make_stacked_forward
from gossamer.models.sequence import LSTM
from gossamer.training.trainer import SGD, BatchedTrainer, LocalSchedule
from tests.training.test_trainer import _sequential  # the per-node torch.optim.SGD reference

VOCAB = 11
# tiny configurations: (name, input_shape, classes, params)
TINY = [
    ("cnn_fedavg", (2, 9, 10), 5, {"channels": [3, 4], "hidden": 6}),
    ("resnet8_gn", (3, 8, 8), 5, {"width": 4}),
    ("resnet18_gn", (3, 6, 6), 5, {"width": 2, "groups": 1}),
    ("char_lstm", (6,), VOCAB, {"vocab": VOCAB, "embed": 3, "hidden": 5}),
    ("transformer", (6,), VOCAB, {"vocab": VOCAB, "dim": 8, "heads": 2}),
]
IDS = [t[0] for t in TINY]


def _inputs(shape, count, generator):
    if len(shape) == 1:                                  # token ids
        return torch.randint(0, VOCAB, (count, *shape), generator=generator)
    return torch.randn(count, *shape, generator=generator)


# --- parameter counts, by hand ----------------------------------------------------------------

def _conv(cin, cout, k, bias=True):
    return cin * cout * k * k + (cout if bias else 0)


def _resnet(cin, widths, blocks, classes):
    """Bias-free convolutions, GroupNorm (weight + bias), 1x1 projection when the shape changes."""
    total = _conv(cin, widths[0], 3, False) + 2 * widths[0]
    prev = widths[0]
    for i, (w, count) in enumerate(zip(widths, blocks, strict=True)):
        for j in range(count):
            total += _conv(prev, w, 3, False) + 2 * w + _conv(w, w, 3, False) + 2 * w
            if prev != w or (i > 0 and j == 0):
                total += _conv(prev, w, 1, False) + 2 * w
            prev = w
    return total + widths[-1] * classes + classes


def _count(name, shape, classes, **params):
    return ParamSpec.from_module(build_model(name, shape, classes, seed=0, **params)).numel


def test_cnn_fedavg_has_the_papers_parameter_count():
    assert _count("cnn_fedavg", (1, 28, 28), 10) == 1_663_370            # McMahan et al. 2017
    cifar = _conv(3, 32, 5) + _conv(32, 64, 5) + (64 * 8 * 8 + 1) * 512 + 513 * 10
    assert _count("cnn_fedavg", (3, 32, 32), 10) == cifar == 2_156_490
    assert _count("cnn_fedavg", (1, 28, 28), 62) == 1_663_370 + 52 * 513  # FEMNIST


def test_resnet_gn_parameter_counts():
    assert _count("resnet8_gn", (3, 32, 32), 10) == _resnet(3, [16, 32, 64], [1] * 3, 10) == 78_042
    r18 = _resnet(3, [64, 128, 256, 512], [2] * 4, 10)
    assert _count("resnet18_gn", (3, 32, 32), 10) == r18 == 11_173_962   # = CIFAR ResNet-18 with BN
    assert _count("resnet8_gn", (1, 28, 28), 62, width=8, groups=4) == _resnet(1, [8, 16, 32], [1] * 3, 62)


def test_sequence_model_parameter_counts():
    lstm = lambda i, h: 4 * h * (i + h) + 8 * h                          # noqa: E731 (two biases)
    assert _count("char_lstm", (80,), 80) == 80 * 8 + lstm(8, 256) + lstm(256, 256) + 257 * 80 == 819_920
    d = 64
    block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
    assert _count("transformer", (80,), 80) == 2 * 80 * d + 2 * block + 2 * d + (d + 1) * 80 == 115_536


# --- vectorization and training -----------------------------------------------------------------

@pytest.mark.parametrize("name,shape,classes,params", TINY, ids=IDS)
def test_stacked_forward_equals_per_model_forward(name, shape, classes, params):
    model = build_model(name, shape, classes, seed=1, **params)
    assert not list(model.named_buffers())
    spec = ParamSpec.from_module(model)
    g = torch.Generator().manual_seed(0)
    forward = make_stacked_forward(model, spec, _inputs(shape, 1, g)[0])
    rows = spec.flatten(model) + 0.05 * torch.randn(3, spec.numel, generator=g)
    x = _inputs(shape, 12, g).view(3, 4, *shape)
    out = forward(spec.views(rows), x)
    assert out.shape == (3, 4, classes)
    for b in range(3):
        spec.load_into(model, rows[b])
        assert torch.allclose(out[b], model(x[b]), atol=1e-5)


@pytest.mark.parametrize("name,shape,classes,params", TINY, ids=IDS)
def test_batched_training_equals_sequential_sgd(name, shape, classes, params):
    sizes = [5, 3, 0, 4]
    g = torch.Generator().manual_seed(2)
    x = _inputs(shape, sum(sizes), g)
    y = torch.randint(0, classes, (sum(sizes),), generator=g)
    model = build_model(name, shape, classes, seed=0, **params)
    spec = ParamSpec.from_module(model)
    forward = make_stacked_forward(model, spec, x[0])
    bounds = np.cumsum([0, *sizes])
    shards = [np.arange(bounds[i], bounds[i + 1]) for i in range(len(sizes))]
    opt = SGD(0.1, momentum=0.9, weight_decay=1e-3)
    trainer = BatchedTrainer(forward, spec, x, y, shards, LocalSchedule(2, epochs=1), opt, seed=3)
    nodes = np.arange(len(sizes))
    rows = spec.flatten(model) + 0.05 * torch.randn(len(sizes), spec.numel, generator=g)
    result = trainer.train(rows, nodes, keys=7)
    ref = _sequential(trainer, model, spec, x, y, rows, nodes, 7, opt)
    assert torch.allclose(result.params, ref, atol=1e-5)
    assert not torch.equal(result.params[0], rows[0])
    assert torch.equal(result.params[2], rows[2])                # a node without data does not move


# --- the sequence models' parts -----------------------------------------------------------------

def test_lstm_equals_torch_lstm_with_the_same_weights_and_init():
    torch.manual_seed(0)
    ours = LSTM(4, 7, 2)
    torch.manual_seed(0)
    ref = nn.LSTM(4, 7, num_layers=2, batch_first=True)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), ref.parameters(), strict=True))
    with torch.no_grad():
        for p in ours.parameters():
            p.uniform_(-0.6, 0.6)                # larger than the init: saturating gates too
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(3, 9, 4)
    assert torch.allclose(ours(x), ref(x)[0], atol=1e-5)


def test_char_lstm_predicts_from_the_last_step_of_torch_lstm():
    model = build_model("char_lstm", (5,), VOCAB, seed=0, vocab=VOCAB, embed=3, hidden=6)
    ref = nn.LSTM(3, 6, num_layers=2, batch_first=True)
    ref.load_state_dict(model.lstm.state_dict())
    x = torch.randint(0, VOCAB, (4, 5))
    expected = model.fc(ref(model.embedding(x))[0][:, -1])
    assert torch.allclose(model(x), expected, atol=1e-5)


def test_transformer_attention_is_causal_multi_head_attention():
    model = build_model("transformer", (5,), VOCAB, seed=0, vocab=VOCAB, dim=8, heads=2, layers=1)
    block = model.blocks[0]
    h = torch.randn(3, 5, 8)
    q, k, v = (t.reshape(3, 5, 2, 4).transpose(1, 2) for t in block.qkv(h).split(8, dim=-1))
    ref = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    ref = block.proj(ref.transpose(1, 2).reshape(3, 5, 8))
    assert torch.allclose(block.attention(h), ref, atol=1e-5)
    assert model(torch.randint(0, VOCAB, (3, 4))).shape == (3, VOCAB)   # shorter sequences too


# --- errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,shape,params,match", [
    ("cnn_fedavg", (784,), {}, "input_shape"),
    ("cnn_fedavg", (1, 3, 3), {}, "H and W"),
    ("cnn_fedavg", (1, 28, 28), {"channels": [32]}, "channels"),
    ("resnet8_gn", (20,), {}, "input_shape"),
    ("resnet18_gn", (3, 32, 32), {"groups": 3}, "groups"),
    ("resnet8_gn", (3, 32, 32), {"width": 0}, "width"),
    ("char_lstm", (1, 28, 28), {}, "input_shape"),
    ("char_lstm", (80,), {"hidden": -1}, "hidden"),
    ("transformer", (80,), {"dim": 10, "heads": 4}, "heads"),
    ("transformer", (), {}, "input_shape"),
])
def test_bad_configurations_say_which_field(name, shape, params, match):
    with pytest.raises(ValueError, match=match):
        build_model(name, shape, 10, seed=0, **params)


@pytest.mark.parametrize("name", ["char_lstm", "transformer"])
def test_token_models_refuse_float_inputs(name):
    model = build_model(name, (4,), VOCAB, seed=0, vocab=VOCAB)
    with pytest.raises(ModelNotVectorizable, match="integer token ids"):
        make_stacked_forward(model, ParamSpec.from_module(model), torch.zeros(4))
