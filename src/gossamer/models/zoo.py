"""The model zoo: plain ``nn.Module`` classes, each optionally with a stacked-weight forward.

A stacked forward takes parameters with a leading node axis ``[B, ...]`` and inputs
``[B, n, ...]`` and returns logits ``[B, n, C]`` with batched matrix products, which is
faster than ``torch.func.vmap`` for small dense models (see docs/benchmarks.md).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable

import torch
from torch import nn

from gossamer.registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")


def _stacked_dense(params: dict[str, torch.Tensor], x: torch.Tensor,
                   layers: list[str]) -> torch.Tensor:
    """Dense layers with ReLU between them, over stacked weights ``[B, out, in]``."""
    h = x.reshape(x.shape[0], x.shape[1], -1)
    for i, name in enumerate(layers):
        weight, bias = params[f"{name}.weight"], params[f"{name}.bias"]
        h = torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))
        if i < len(layers) - 1:
            h = torch.relu(h)
    return h


class LogisticRegression(nn.Module):
    """Multinomial logistic regression: one linear layer on the flattened input."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(math.prod(input_shape), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))

    @staticmethod
    def stacked_forward(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return _stacked_dense(params, x, ["linear"])


class MLP(nn.Module):
    """Fully connected network with ReLU; ``hidden`` lists the hidden widths."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int,
                 hidden: tuple[int, ...] | list[int] = (64,)) -> None:
        super().__init__()
        widths = [math.prod(input_shape), *hidden, num_classes]
        layers: list[nn.Module] = []
        for i in range(len(widths) - 1):
            layers.append(nn.Linear(widths[i], widths[i + 1]))
            if i < len(widths) - 2:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)
        self._dense = [f"net.{i}" for i, m in enumerate(self.net) if isinstance(m, nn.Linear)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))

    def stacked_forward(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return _stacked_dense(params, x, self._dense)


class LeNet(nn.Module):
    """LeNet-5-style CNN (two conv + pool stages, three dense layers) for image inputs."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(
                f"model cnn needs image inputs (C, H, W), got shape {tuple(input_shape)}; "
                "set data.params.image: true")
        channels, height, _ = input_shape
        pad = 2 if height < 32 else 0
        self.features = nn.Sequential(
            nn.Conv2d(channels, 6, 5, padding=pad), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
        with torch.no_grad():
            flat = self.features(torch.zeros(1, *input_shape)).shape[1]
        self.classifier = nn.Sequential(
            nn.Linear(flat, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
            nn.Linear(84, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@MODELS.register("logreg")
def logreg(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return LogisticRegression(input_shape, num_classes)


@MODELS.register("mlp")
def mlp(input_shape: tuple[int, ...], num_classes: int,
        hidden: list[int] | tuple[int, ...] = (64,)) -> nn.Module:
    return MLP(input_shape, num_classes, tuple(hidden))


@MODELS.register("cnn")
def cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return LeNet(input_shape, num_classes)


@MODELS.register("custom")
def custom(input_shape: tuple[int, ...], num_classes: int, path: str = "",
           kwargs: dict | None = None, pass_shapes: bool = True) -> nn.Module:
    """A user ``nn.Module`` given as ``package.module:Class`` (or a factory function).

    With ``pass_shapes`` it is called as ``Class(input_shape, num_classes, **kwargs)``.
    """
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ValueError(f"model.params.path must look like 'package.module:Class', got {path!r}")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"model.params.path {path!r} cannot be imported: {exc}") from None
    args = (tuple(input_shape), num_classes) if pass_shapes else ()
    model = factory(*args, **(kwargs or {}))
    if not isinstance(model, nn.Module):
        raise ValueError(f"model.params.path {path!r} did not produce an nn.Module")
    return model


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, seed: int,
                **params: object) -> nn.Module:
    """Construct a zoo or user model with torch's default init after ``manual_seed(seed)``."""
    factory = MODELS.get(name)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return factory(tuple(input_shape), num_classes, **params)
    finally:
        torch.random.set_rng_state(state)
