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

from gossamer import checks
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


class DenseKernel:
    """Fused batched SGD for a stack of dense layers with ReLU between them (logreg, MLP).

    The backward pass is written out and each update is one in-place ``baddbmm_`` on views
    of the flat ``[B, P]`` rows: no gradient tensors and no layout copies. Equal to autograd
    + SGD (tested); used when the optimizer has no momentum.
    """

    def __init__(self, layers: list[str]) -> None:
        self.layers = layers

    def leaves(self, views: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Weight ``[B, out, in]`` and bias ``[B, 1, out]`` views, in layer order."""
        out = []
        for name in self.layers:
            out.append(views[f"{name}.weight"])
            out.append(views[f"{name}.bias"].unsqueeze(1))
        return out

    def params(self, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
        """The leaves back in the module's parameter order and shapes."""
        return [leaf.squeeze(1) if k % 2 else leaf for k, leaf in enumerate(leaves)]

    def sgd_step(self, leaves: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                 weight: torch.Tensor, lr: float, decay: torch.Tensor | None = None,
                 out: list[torch.Tensor] | None = None) -> torch.Tensor:
        """One step on every row, in place: ``weight`` ``[B, n]`` are per-sample loss weights
        (rows sum to 1 for a mean loss, 0 for padding); ``decay`` ``[B]`` optional
        weight-decay factors. With ``out`` (leaves of the same shapes) the stepped weights are
        written there and ``leaves`` only read (they may be broadcast views of one model); the
        values are those of copying ``leaves`` into ``out`` and stepping in place. Returns
        each node's weighted loss ``[B]``."""
        h = x.reshape(x.shape[0], x.shape[1], -1)
        inputs = []
        for i in range(len(self.layers)):
            inputs.append(h)
            z = torch.baddbmm(leaves[2 * i + 1], h, leaves[2 * i].transpose(1, 2))
            h = torch.relu(z) if i < len(self.layers) - 1 else z
        logp = torch.log_softmax(h, dim=-1)
        loss = -(logp.gather(2, y.unsqueeze(2)).squeeze(2) * weight).sum(1)
        grad = logp.exp_()
        grad.scatter_add_(2, y.unsqueeze(2), torch.full_like(grad[..., :1], -1.0))
        grad.mul_(weight.unsqueeze(2))
        for i in reversed(range(len(self.layers))):
            w, b = leaves[2 * i], leaves[2 * i + 1]
            grad_in = torch.bmm(grad, w) if i > 0 else None
            new_w, new_b = (out[2 * i], out[2 * i + 1]) if out is not None else (w, b)
            if decay is not None:                     # (with out: the decayed copy, then in place)
                w = torch.mul(w, decay.view(-1, 1, 1), out=new_w)
                b = torch.mul(b, decay.view(-1, 1, 1), out=new_b)
            if w is new_w:
                w.baddbmm_(grad.transpose(1, 2), inputs[i], alpha=-lr)
                b.sub_(grad.sum(1, keepdim=True), alpha=lr)
            else:                                     # read w, write out: copy and step in one op
                torch.baddbmm(w, grad.transpose(1, 2), inputs[i], alpha=-lr, out=new_w)
                torch.sub(b, grad.sum(1, keepdim=True), alpha=lr, out=new_b)
            if grad_in is not None:   # ReLU's derivative: the sign of its output (1 or 0), as
                # floats: a multiply by a bool mask takes a slow type-promoting path (~8x here)
                grad = grad_in.mul_(torch.sign(inputs[i]))
        return loss


class LogisticRegression(nn.Module):
    """Multinomial logistic regression: one linear layer on the flattened input."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(math.prod(input_shape), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))

    stacked_kernel = DenseKernel(["linear"])

    @staticmethod
    def stacked_forward(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return _stacked_dense(params, x, ["linear"])


def _dense_stack(widths: list[int], batch_norm: bool) -> nn.Sequential:
    """Linear layers of ``widths``, each hidden one followed by ReLU (after BatchNorm1d with
    ``batch_norm``)."""
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers += [nn.BatchNorm1d(widths[i + 1]), nn.ReLU()] if batch_norm else [nn.ReLU()]
    return nn.Sequential(*layers)


class MLP(nn.Module):
    """Fully connected network with ReLU; ``hidden`` lists the hidden widths."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int,
                 hidden: tuple[int, ...] | list[int] = (64,)) -> None:
        super().__init__()
        self.net = _dense_stack([math.prod(input_shape), *hidden, num_classes], batch_norm=False)
        self._dense = [f"net.{i}" for i, m in enumerate(self.net) if isinstance(m, nn.Linear)]
        self.stacked_kernel = DenseKernel(self._dense)

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
    widths = mlp_widths(input_shape, num_classes, hidden)
    numel = sum((a + 1) * b for a, b in zip(widths[:-1], widths[1:], strict=True))
    if numel > 1 << 24:                     # (64 MiB) read the free memory only when it may matter
        checks.check_memory(4 * numel, f"mlp with hidden {list(widths[1:-1])} ({numel:,} parameters)")
    return MLP(input_shape, num_classes, tuple(widths[1:-1]))


class MLPBatchNorm(nn.Module):
    """Fully connected network with BatchNorm1d and ReLU after every hidden layer (no
    hand-written stacked forward: it runs layer by layer, each node with its own running
    statistics)."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int,
                 hidden: tuple[int, ...] | list[int] = (64,)) -> None:
        super().__init__()
        self.net = _dense_stack([math.prod(input_shape), *hidden, num_classes], batch_norm=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


@MODELS.register("mlp_bn")
def mlp_bn(input_shape: tuple[int, ...], num_classes: int,
           hidden: list[int] | tuple[int, ...] = (64,)) -> nn.Module:
    widths = mlp_widths(input_shape, num_classes, hidden)
    return MLPBatchNorm(input_shape, num_classes, tuple(widths[1:-1]))


def mlp_widths(input_shape: tuple[int, ...], num_classes: int, hidden: object) -> list[int]:
    """Layer widths ``[inputs, *hidden, classes]``; ``hidden`` must list positive ints."""
    if not isinstance(hidden, (list, tuple)):
        raise ValueError(f"hidden must be a list of layer widths, e.g. [64], got {hidden!r}")
    return [math.prod(input_shape),
            *(checks.as_int(f"hidden[{i}]", w, lo=1) for i, w in enumerate(hidden)), num_classes]


@MODELS.register("cnn")
def cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return LeNet(input_shape, num_classes)


@MODELS.register("custom")
def custom(input_shape: tuple[int, ...], num_classes: int, path: str = "",
           kwargs: dict | None = None, pass_shapes: bool = True) -> nn.Module:
    """A user ``nn.Module`` given as ``package.module:Class`` (or a factory function).

    With ``pass_shapes`` it is called as ``Class(input_shape, num_classes, **kwargs)``.
    What may be named (checked before anything is called): an ``nn.Module`` subclass from
    any module, or a Python function defined in the user's own code, whose result must be an
    ``nn.Module``. Refused: anything from the standard library or builtins (never imported),
    builtin functions and other callables, classes that are not ``nn.Module`` subclasses, and
    functions of torch, numpy, yaml, gossamer and other packages that ship no models.
    """
    import inspect
    import sys

    module_name, _, attr = path.partition(":") if isinstance(path, str) else ("", "", "")
    if not module_name or not attr:
        raise ValueError(f"model.params.path must look like 'package.module:Class', got {path!r}")

    # packages whose functions are never model factories (several load or run arbitrary
    # code); their nn.Module classes (torch.nn:Linear) stay allowed
    no_factories = {"torch", "gossamer", "numpy", "yaml", "pickle", "dill", "cloudpickle", "joblib",
                    "pip", "setuptools", "pkg_resources", "_pytest", "pytest", "IPython", "grpc",
                    "pydantic", "scipy", "sklearn", "pandas", "matplotlib"}

    def _system(name: str) -> bool:
        top = name.partition(".")[0]
        return top in sys.stdlib_module_names or top in sys.builtin_module_names

    def refuse(why: str) -> ValueError:
        return ValueError(f"model.params.path {path!r} {why}; it must name an nn.Module subclass "
                          f"or a model factory function of your own code")

    if _system(module_name):
        raise refuse("is in the Python standard library")
    try:
        factory = importlib.import_module(module_name)
        for part in attr.split("."):
            factory = getattr(factory, part)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"model.params.path {path!r} cannot be imported: {exc}") from None
    if inspect.isclass(factory):
        if not issubclass(factory, nn.Module):
            raise refuse(f"is a class that is not an nn.Module subclass ({factory.__name__})")
    elif not inspect.isfunction(factory):
        raise refuse(f"is not a class or Python function ({type(factory).__name__})")
    else:
        defined_in = getattr(factory, "__module__", None) or ""
        if _system(defined_in) or defined_in.partition(".")[0] in no_factories:
            raise refuse(f"is a function of {defined_in or 'an unknown module'}, not a model factory")
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
