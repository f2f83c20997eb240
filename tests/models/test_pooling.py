"""2x2 max pooling by window_max: PyTorch's values and gradients, bit for bit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gossamer.models.layerwise import layerwise_forward
from gossamer.models.pooling import function_window, module_window, window_max


def _tricky(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Small integers (ties in most windows, both orders), signed zeros and a few large values."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-2, 3, shape, generator=g).float()
    x[torch.rand(shape, generator=g) < 0.1] = -0.0
    x[torch.rand(shape, generator=g) < 0.05] = 1e30
    return x


def _grads(pool, x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = x.clone().requires_grad_(True)
    out = pool(leaf)
    (out * weight).sum().backward()
    return out.detach(), leaf.grad


@pytest.mark.parametrize("shape", [(3, 4, 8, 8), (2, 5, 7, 9), (6, 3, 2, 2), (4, 12, 12)])
@pytest.mark.parametrize("relu", [False, True])
def test_window_max_equals_max_pool(shape, relu):
    x = _tricky(shape, 1)
    reference = (lambda t: F.max_pool2d(F.relu(t), 2)) if relu else (lambda t: F.max_pool2d(t, 2))
    weight = torch.randn(reference(x).shape, generator=torch.Generator().manual_seed(2))
    want, want_grad = _grads(reference, x, weight)
    got, got_grad = _grads(lambda t: window_max(t, 2, relu=relu), x, weight)
    assert torch.equal(got, want)
    if not relu:            # (after the fused ReLU a zero output may be the other signed zero)
        assert torch.equal(torch.signbit(got), torch.signbit(want))
    assert torch.equal(got_grad, want_grad)       # ties: the first maximum in row-major order
    assert torch.equal(torch.signbit(got_grad), torch.signbit(want_grad))


@pytest.mark.parametrize("shape", [(3, 4, 8, 8), (2, 5, 7, 9)])
def test_a_channels_last_input_gets_its_gradient_in_channels_last(shape):
    """(A channels-last convolution before the pooling then gets the layout its kernel reads.)"""
    x = _tricky(shape, 4)
    weight = torch.randn(F.max_pool2d(x, 2).shape, generator=torch.Generator().manual_seed(5))
    want, want_grad = _grads(lambda t: F.max_pool2d(t, 2), x, weight)
    got, got_grad = _grads(lambda t: window_max(t.contiguous(memory_format=torch.channels_last), 2), x, weight)
    assert torch.equal(got, want) and torch.equal(got_grad, want_grad)
    leaf = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    window_max(leaf, 2).backward(weight)
    assert leaf.grad.is_contiguous(memory_format=torch.channels_last) and not leaf.grad.is_contiguous()


def test_window_max_strided_input_and_no_grad():
    x = _tricky((4, 6, 10, 10), 3)[:, ::2]        # a non-contiguous input
    with torch.no_grad():
        assert torch.equal(window_max(x, 2, relu=True), F.max_pool2d(F.relu(x), 2))


def test_windows_it_takes():
    assert module_window(nn.MaxPool2d(2)) == 2
    assert module_window(nn.MaxPool2d(3)) == 3
    for other in (nn.MaxPool2d(2, stride=1), nn.MaxPool2d(2, padding=1), nn.MaxPool2d(2, ceil_mode=True),
                  nn.MaxPool2d((2, 3)), nn.MaxPool2d(2, return_indices=True), nn.AvgPool2d(2)):
        assert module_window(other) is None
    assert function_window((None, 2), {}) == 2
    assert function_window((None, 2, 2), {"padding": 0}) == 2
    assert function_window((None, 2), {"stride": 1}) is None
    assert function_window((None, 2), {"dilation": 2}) is None


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.pooled, self.kept = nn.Linear(4 * 4 * 4, 3), nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        h = self.conv(x)
        kept = torch.relu(h)                       # read twice: not fused into the pooling
        pooled = F.max_pool2d(F.relu(h), kernel_size=2)
        return self.pooled(pooled.flatten(1)) + self.kept(kept.flatten(1))


def test_layerwise_fuses_only_a_relu_the_pooling_alone_reads():
    torch.manual_seed(0)
    net = _Net()
    forward, why = layerwise_forward(net, torch.randn(2, 8, 8), conv="grouped")
    assert forward is not None, why
    assert [n.name for n in forward.fused] == ["relu_1"]
    params = {k: v.unsqueeze(0).repeat(3, *([1] * v.dim())) for k, v in net.named_parameters()}
    x = _tricky((3, 5, 2, 8, 8), 4)
    want = torch.stack([net(x[i]) for i in range(3)])
    assert torch.allclose(forward(params, x), want, atol=1e-5)


def test_a_nan_wins_its_window():
    x = _tricky((2, 3, 6, 6), 5)
    x[0, 1, 2, 3] = float("nan")
    x[1, 2, 5, 5] = float("nan")
    for relu in (False, True):
        got = window_max(x, 2, relu=relu)
        assert torch.equal(torch.isnan(got), torch.isnan(F.max_pool2d(x, 2)))
        finite = ~torch.isnan(got)
        want = F.max_pool2d(F.relu(x) if relu else x, 2)
        assert torch.equal(got[finite], want[finite])


class _InPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.act, self.pool = nn.ReLU(inplace=True), nn.MaxPool2d(2)
        self.head = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x):
        return self.head(self.pool(self.act(self.conv(x))).flatten(1))


def test_an_in_place_relu_is_not_fused():
    forward, why = layerwise_forward(_InPlace(), torch.randn(1, 8, 8), conv="grouped")
    assert forward is not None, why
    assert not forward.fused and list(forward.pools.values()) == [False]
