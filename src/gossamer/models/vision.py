"""Image models for federated benchmarks: the FedAvg CNN and ResNets with GroupNorm or
BatchNorm.

Every model here is a plain ``nn.Module`` that runs for many nodes at once (see
``make_stacked_forward``); the BatchNorm ResNets keep each node's running statistics in its
row (``ParamSpec.stats``).
"""

from __future__ import annotations

import torch
from torch import nn

from gossamer import checks
from gossamer.models.zoo import MODELS


def image_shape(model: str, input_shape: tuple[int, ...], min_side: int = 1) -> tuple[int, int, int]:
    """``input_shape`` as ``(C, H, W)``; a one-line ValueError naming ``input_shape`` otherwise."""
    shape = tuple(input_shape)
    if len(shape) != 3 or any(not isinstance(s, int) or s < 1 for s in shape):
        raise ValueError(f"model {model} needs image inputs, input_shape (C, H, W), got {shape}; "
                         "set data.params.image: true")
    if min(shape[1:]) < min_side:
        raise ValueError(f"model {model} needs input_shape H and W >= {min_side}, got {shape}")
    return shape  # type: ignore[return-value]


def _widths(name: str, value: object, count: int) -> list[int]:
    if not isinstance(value, (list, tuple)) or len(value) != count:
        raise ValueError(f"{name} must list {count} positive ints, got {value!r}")
    return [checks.as_int(f"{name}[{i}]", v, lo=1) for i, v in enumerate(value)]


class FedAvgCNN(nn.Module):
    """The CNN of McMahan et al. (FedAvg), as LEAF uses it for FEMNIST.

    Two 5x5 convolutions (``channels``, 'same' padding), each followed by ReLU and 2x2 max
    pooling, a dense layer of ``hidden`` units with ReLU, and a linear output. On MNIST
    (1x28x28, 10 classes) it has 1,663,370 parameters, the count given in the paper.

    Input ``[n, C, H, W]`` float, output logits ``[n, num_classes]``.

    McMahan, Moore, Ramage, et al., "Communication-Efficient Learning of Deep Networks from
    Decentralized Data", AISTATS 2017, arXiv:1602.05629; Caldas, Duddu, Wu, et al., "LEAF: A
    Benchmark for Federated Settings", arXiv:1812.01097.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int,
                 channels: tuple[int, ...] | list[int] = (32, 64), hidden: int = 512) -> None:
        super().__init__()
        c, h, w = image_shape("cnn_fedavg", input_shape, min_side=4)
        c1, c2 = _widths("channels", channels, 2)
        hidden = checks.as_int("hidden", hidden, lo=1)
        self.features = nn.Sequential(
            nn.Conv2d(c, c1, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
        flat = c2 * (h // 4) * (w // 4)
        self.classifier = nn.Sequential(nn.Linear(flat, hidden), nn.ReLU(),
                                        nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _norm(groups: int | None, channels: int) -> nn.Module:
    """GroupNorm with ``groups`` groups, or BatchNorm when ``groups`` is None."""
    return nn.BatchNorm2d(channels) if groups is None else nn.GroupNorm(groups, channels)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with GroupNorm (BatchNorm when ``groups`` is None) and a
    residual; a 1x1 projection when the shape changes. Convolutions have no bias (the norm
    that follows has one)."""

    def __init__(self, cin: int, cout: int, stride: int, groups: int | None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _norm(groups, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.norm2 = _norm(groups, cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                          _norm(groups, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNetGN(nn.Module):
    """CIFAR-style ResNet with GroupNorm instead of BatchNorm (no running statistics, and no
    dependence on a node's batch statistics under non-IID data); with ``groups=None``, the
    original BatchNorm (each node keeps its own running statistics; FedAvg averages them).

    Stem: 3x3 convolution + norm + ReLU (no max pool). Stage ``i`` has ``blocks[i]``
    basic blocks of ``widths[i]`` channels; every stage after the first starts with stride 2.
    Then global average pooling and a linear classifier. Every width must be divisible by
    ``groups``.

    Input ``[n, C, H, W]`` float, output logits ``[n, num_classes]``.

    He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", CVPR 2016,
    arXiv:1512.03385; Wu, He, "Group Normalization", ECCV 2018, arXiv:1803.08494; GroupNorm
    for non-IID federated training: Hsieh, Phanishayee, Mutlu, Gibbons, "The Non-IID Data
    Quagmire of Decentralized Machine Learning", ICML 2020, arXiv:1910.00189.
    """

    def __init__(self, model: str, input_shape: tuple[int, ...], num_classes: int,
                 widths: list[int], blocks: list[int], groups: int | None) -> None:
        super().__init__()
        c, _, _ = image_shape(model, input_shape)
        if groups is not None:
            groups = checks.as_int("groups", groups, lo=1)
            bad = [w for w in widths if w % groups]
            if bad:
                raise ValueError(f"groups must divide every stage width {widths}, got groups={groups}")
        self.stem = nn.Sequential(nn.Conv2d(c, widths[0], 3, padding=1, bias=False),
                                  _norm(groups, widths[0]), nn.ReLU())
        stages, cin = [], widths[0]
        for i, (width, count) in enumerate(zip(widths, blocks, strict=True)):
            layers = []
            for j in range(count):
                layers.append(BasicBlock(cin, width, 2 if i > 0 and j == 0 else 1, groups))
                cin = width
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stages(self.stem(x))
        return self.fc(h.mean(dim=(-2, -1)))


@MODELS.register("cnn_fedavg")
def cnn_fedavg(input_shape: tuple[int, ...], num_classes: int,
               channels: tuple[int, ...] | list[int] = (32, 64), hidden: int = 512) -> nn.Module:
    return FedAvgCNN(input_shape, num_classes, channels, hidden)


def _resnet(model: str, input_shape: tuple[int, ...], num_classes: int, base: list[int],
            blocks: list[int], groups: object, width: object) -> nn.Module:
    width = checks.as_int("width", width, lo=1)
    widths = [width * w // base[0] for w in base]
    numel = sum(w * w * 9 * 2 * b for w, b in zip(widths, blocks, strict=True))
    if numel > 1 << 24:
        checks.check_memory(4 * numel, f"{model} with width {width} (~{numel:,} parameters)")
    return ResNetGN(model, input_shape, num_classes, widths, blocks, groups)  # type: ignore[arg-type]


@MODELS.register("resnet8_gn")
def resnet8_gn(input_shape: tuple[int, ...], num_classes: int, groups: int = 2,
               width: int = 16) -> nn.Module:
    """ResNet-8: three stages of one basic block, ``width`` x (1, 2, 4) channels (16/32/64)."""
    return _resnet("resnet8_gn", input_shape, num_classes, [16, 32, 64], [1, 1, 1], groups, width)


@MODELS.register("resnet18_gn")
def resnet18_gn(input_shape: tuple[int, ...], num_classes: int, groups: int = 2,
                width: int = 64) -> nn.Module:
    """ResNet-18: four stages of two basic blocks, ``width`` x (1, 2, 4, 8) channels (64..512)."""
    return _resnet("resnet18_gn", input_shape, num_classes, [64, 128, 256, 512], [2, 2, 2, 2],
                   groups, width)


@MODELS.register("resnet8_bn")
def resnet8_bn(input_shape: tuple[int, ...], num_classes: int, width: int = 16) -> nn.Module:
    """ResNet-8 with BatchNorm: each node keeps its own running statistics."""
    return _resnet("resnet8_bn", input_shape, num_classes, [16, 32, 64], [1, 1, 1], None, width)


@MODELS.register("resnet18_bn")
def resnet18_bn(input_shape: tuple[int, ...], num_classes: int, width: int = 64) -> nn.Module:
    """ResNet-18 with BatchNorm: each node keeps its own running statistics."""
    return _resnet("resnet18_bn", input_shape, num_classes, [64, 128, 256, 512], [2, 2, 2, 2],
                   None, width)


__all__ = ["BasicBlock", "FedAvgCNN", "ResNetGN", "image_shape"]
