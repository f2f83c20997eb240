import pytest
import torch
from torch import nn

from gossamer.models import ModelNotVectorizable, ParamSpec, build_model, make_stacked_forward


def test_mlp_init_matches_plain_sequential_after_manual_seed():
    model = build_model("mlp", (784,), 10, seed=0, hidden=[64])
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))
    spec = ParamSpec.from_module(model)
    assert spec.numel == 784 * 64 + 64 + 64 * 10 + 10
    assert torch.equal(spec.flatten(model), torch.cat([p.reshape(-1) for p in ref.parameters()]))


@pytest.mark.parametrize("name,shape,params", [("logreg", (20,), {}), ("mlp", (20,), {"hidden": [8, 6]}),
                                               ("cnn", (1, 28, 28), {})])
def test_stacked_forward_equals_per_model_forward(name, shape, params):
    model = build_model(name, shape, 5, seed=1, **params)
    spec = ParamSpec.from_module(model)
    forward = make_stacked_forward(model, spec, torch.zeros(shape))
    rows = torch.randn(3, spec.numel) * 0.1
    x = torch.randn(3, 4, *shape)
    out = forward(spec.views(rows), x)
    for b in range(3):
        spec.load_into(model, rows[b])
        assert torch.allclose(out[b], model(x[b]), atol=1e-5)


def test_hand_written_and_vmap_paths_agree():
    model = build_model("mlp", (12,), 3, seed=0, hidden=[7])
    spec = ParamSpec.from_module(model)
    fast = make_stacked_forward(model, spec, torch.zeros(12), "stacked")
    vm = make_stacked_forward(model, spec, torch.zeros(12), "vmap")
    rows, x = torch.randn(4, spec.numel), torch.randn(4, 5, 12)
    assert torch.allclose(fast(spec.views(rows), x), vm(spec.views(rows), x), atol=1e-6)


class _WithBuffer(nn.Module):
    """A buffer a row cannot hold (BatchNorm's statistics it can: tests/models/test_batchnorm.py)."""

    def __init__(self, input_shape, num_classes):
        super().__init__()
        self.register_buffer("shift", torch.zeros(input_shape[0]))
        self.fc = nn.Linear(input_shape[0], num_classes)

    def forward(self, x):
        return self.fc(x - self.shift)


class _DataDependent(nn.Module):
    def __init__(self, input_shape, num_classes):
        super().__init__()
        self.fc = nn.Linear(input_shape[0], num_classes)

    def forward(self, x):
        if self.fc(x).sum().item() > 0:          # .item() cannot be vectorized
            return self.fc(x)
        return -self.fc(x)


def test_custom_model_by_import_path():
    model = build_model("custom", (4,), 2, seed=0, path="torch.nn:Linear", pass_shapes=False,
                        kwargs={"in_features": 4, "out_features": 2})
    assert isinstance(model, nn.Linear)
    with pytest.raises(ValueError, match="model.params.path"):
        build_model("custom", (4,), 2, seed=0, path="no.such.module:X")


@pytest.mark.parametrize("cls,match", [(_WithBuffer, "buffers"), (_DataDependent, "cannot be vectorized")])
def test_unvectorizable_models_say_why(cls, match):
    model = cls((4,), 2)
    with pytest.raises(ModelNotVectorizable, match=match):
        make_stacked_forward(model, ParamSpec.from_module(model), torch.zeros(4))
