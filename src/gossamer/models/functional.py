"""Flat, stacked parameters and batched forward passes over a population of models.

The population's models live in one ``[N, P]`` tensor (one row per node). ``ParamSpec``
maps a row to the module's named parameters as views, so training, mixing, aggregation,
compression and byte counting all work on the same flat rows without copies. A BatchNorm
layer's running statistics (``running_mean``, ``running_var``) are entries of the row too,
so each node keeps its own, and averaging, mixing, compressing and checkpointing treat them
as they treat weights; training never steps them (:attr:`ParamSpec.stats`), the forward
updates them from each node's batch (:mod:`gossamer.models.layerwise`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from gossamer.models.layerwise import BATCH_NORMS, layerwise_forward

StackedForward = Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]


class ModelNotVectorizable(ValueError):
    """The user model cannot be run for many nodes at once by ``torch.func``."""


STAT_NAMES = ("running_mean", "running_var")      # the buffers a row holds (BatchNorm's)


def batch_norms(module: nn.Module) -> dict[str, nn.Module]:
    """The module's BatchNorm layers by name."""
    return {name: m for name, m in module.named_modules() if isinstance(m, BATCH_NORMS)}


def _entries(module: nn.Module) -> dict[str, torch.Tensor]:
    """A row's entries in module order (as ``state_dict`` lists them): the parameters
    (shared ones once) and the BatchNorm layers' running statistics."""
    params = dict(module.named_parameters())
    norms = batch_norms(module)
    stats = {f"{layer}.{s}": getattr(m, s) for layer, m in norms.items() for s in STAT_NAMES
             if getattr(m, s, None) is not None}
    order = module.state_dict(keep_vars=True).keys()
    return {k: params[k] if k in params else stats[k] for k in order if k in params or k in stats}


@dataclass(frozen=True)
class ParamSpec:
    """Names, shapes and offsets of a module's parameters inside a flat row; ``stats``: the
    names among them that are BatchNorm running statistics (never stepped by an optimizer)."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    numel: int
    stats: tuple[str, ...] = ()

    @classmethod
    def from_module(cls, module: nn.Module) -> ParamSpec:
        names, shapes, offsets, total = [], [], [], 0
        entries = _entries(module)
        for name, p in entries.items():
            names.append(name)
            shapes.append(tuple(p.shape))
            offsets.append(total)
            total += p.numel()
        stats = tuple(n for n in names if n.rsplit(".", 1)[-1] in STAT_NAMES
                      and not isinstance(entries[n], nn.Parameter))
        return cls(tuple(names), tuple(shapes), tuple(offsets), total, stats)

    def flatten(self, module: nn.Module) -> torch.Tensor:
        """The module's parameters (and running statistics) as one flat float32 vector ``[P]``."""
        return torch.cat([p.detach().reshape(-1).float() for p in _entries(module).values()])

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views ``[B, *shape]`` of a stacked ``[B, P]`` tensor, one per parameter name."""
        rows = flat.shape[0]
        return {
            name: flat[:, off:off + math.prod(shape)].view(rows, *shape)
            for name, shape, off in zip(self.names, self.shapes, self.offsets, strict=True)
        }

    def load_into(self, module: nn.Module, flat: torch.Tensor) -> None:
        """Copy a flat row ``[P]`` into the module's parameters (e.g. to save or deploy it)."""
        views = self.views(flat.reshape(1, -1))
        with torch.no_grad():
            for name, p in _entries(module).items():
                p.copy_(views[name][0])


def _check_buffers(module: nn.Module) -> dict[str, nn.Module]:
    """The model's BatchNorm layers, after refusing any buffer a row cannot hold (one line
    naming it): buffers other than BatchNorm's running statistics, and BatchNorm layers
    without running statistics or with a cumulative average (``momentum=None``)."""
    norms = batch_norms(module)
    for name, m in norms.items():
        if not m.track_running_stats:
            raise ModelNotVectorizable(f"model layer {name}: BatchNorm with track_running_stats="
                                       "False is not supported; keep the default or use GroupNorm")
        if m.momentum is None:
            raise ModelNotVectorizable(f"model layer {name}: BatchNorm with momentum=None (a "
                                       "cumulative average) is not supported; give a momentum")
    known = {f"{layer}.{s}" for layer in norms for s in (*STAT_NAMES, "num_batches_tracked")}
    other = [name for name, _ in module.named_buffers() if name not in known]
    if other:
        raise ModelNotVectorizable(
            f"model has buffers {other[:3]}; the simulator stacks parameters and BatchNorm "
            "running statistics only: make them parameters or constants")
    return norms


def make_stacked_forward(module: nn.Module, spec: ParamSpec, sample: torch.Tensor,
                         backend: str = "auto", conv: str = "auto",
                         device: torch.device | None = None, compile: bool = False) -> StackedForward:  # noqa: A002
    """A forward over stacked parameters ``[B, ...]`` and inputs ``[B, n, ...]``.

    ``auto`` uses the model's hand-written ``stacked_forward`` when it has one; else, for a
    model with 2-d convolutions, the layer-by-layer executor
    (:mod:`gossamer.models.layerwise`: node axis folded into the batch, each convolution in its
    fastest batched form, ``conv`` pinning it) when it can run the model and agrees with
    ``vmap`` on a probe; otherwise ``torch.func.vmap`` over ``functional_call``. The chosen
    path is probed once on ``sample`` (one input row) so an unsupported model fails here with
    a clear message. The forward's ``path`` attribute names what was chosen.

    ``compile``: training forwards (autograd on) run through ``torch.compile`` (inductor;
    :func:`_compiled`), evaluation stays eager; dense layers then keep stacked weights (a
    low-rank weight is a Python object the compiled graph would not see).

    A model with BatchNorm layers runs layer by layer (the executor keeps each node's running
    statistics and takes its batch statistics over its own valid samples only), or is refused
    in one line naming the layer when that executor cannot run it.
    """
    norms = _check_buffers(module)
    if backend not in ("auto", "vmap", "stacked", "layerwise"):
        raise ValueError(f"unknown forward backend {backend!r}")
    own = getattr(module, "stacked_forward", None)
    if backend == "stacked" and own is None:
        raise ValueError(f"model {type(module).__name__} has no stacked_forward")

    def single(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(module, params, (x,))

    vmapped = torch.func.vmap(single)
    probe = spec.flatten(module).reshape(1, -1).repeat(2, 1)
    xs = sample.reshape(1, 1, *sample.shape).repeat(2, 1, *([1] * sample.dim()))
    path: dict[str, str] = {"forward": "vmap"}
    forward: StackedForward = vmapped
    why = f"model.forward is {backend}"
    if own is not None and backend != "vmap" and backend != "layerwise":
        forward, path, why = own, {"forward": "stacked"}, "the model's own stacked_forward runs it"
    elif backend == "layerwise" or (backend == "auto" and (norms or any(isinstance(m, nn.Conv2d)
                                                                        for m in module.modules()))):
        layered, why = layerwise_forward(module, sample, conv, device=device)
        if layered is None and backend == "layerwise":
            raise ModelNotVectorizable(f"model.forward: layerwise cannot run {type(module).__name__}: {why}")
        if layered is not None:
            training = module.training
            try:         # (BatchNorm compared in eval mode: vmap cannot update stacked statistics)
                with torch.no_grad():
                    module.train(training and not norms)
                    agree = torch.allclose(layered(spec.views(probe), xs), vmapped(spec.views(probe), xs),
                                           rtol=1e-4, atol=1e-5)
            except Exception as exc:  # noqa: BLE001 - a model the executor mis-runs: say so or fall back
                agree, why = False, f"{type(exc).__name__}: {exc}"
            finally:
                module.train(training)
            if not agree and backend == "layerwise":
                raise ModelNotVectorizable(f"model.forward: layerwise disagrees with vmap on "
                                           f"{type(module).__name__} {why}".rstrip())
            if agree:
                forward = layered
                path = {"forward": "layerwise", **{f"conv {k}": v for k, v in layered.conv.items()}}
    if norms and path["forward"] != "layerwise":
        layer = next(iter(norms))
        raise ModelNotVectorizable(
            f"model layer {layer}: BatchNorm needs the layer-by-layer executor, which cannot run "
            f"{type(module).__name__} ({why or 'it disagrees with vmap'}); use GroupNorm/LayerNorm")
    probe.requires_grad_(True)
    try:
        out = forward(spec.views(probe), xs)
        out.sum().backward()
    except Exception as exc:  # noqa: BLE001 - report any failure of the user's model clearly
        raise ModelNotVectorizable(
            f"model {type(module).__name__} cannot be vectorized across nodes by torch.func "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); avoid "
            "in-place ops on inputs, .item() and data-dependent control flow") from None
    if compile and path["forward"] == "layerwise":
        raise ModelNotVectorizable(
            "model.compile: this model runs layer by layer (convolutions, BatchNorm), which "
            "torch.compile does not speed up here (LeNet: 0.53x) and whose grouped convolutions "
            "inductor fails to compile for varying node counts; drop model.compile (or set "
            "model.forward: vmap to compile the vmap path)")
    named = _Named(forward, path, getattr(module, "stacked_loss", None), bool(norms))
    if compile:
        named.compiled, named.linears = _compiled(forward, device), {}
        named.path = {**path, "compile": "inductor"}
    return named


def _compiled(forward: StackedForward, device: torch.device | None) -> StackedForward:
    """``torch.compile(forward)`` (shapes made dynamic after a second one is seen, so a run
    compiles once or twice, not per chunk size), or one line saying what the compiler needs
    that this machine lacks: a C++ compiler for CPU kernels, Triton for GPU ones."""
    import importlib.util
    import os
    import shutil

    if device is not None and device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            raise ModelNotVectorizable("model.compile on a GPU needs Triton (pip install triton); "
                                       "drop model.compile")
    elif not (os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
        raise ModelNotVectorizable("model.compile on the CPU needs a C++ compiler (inductor builds "
                                   "its kernels with it): install g++ or set CXX, or drop model.compile")
    return torch.compile(forward, dynamic=None, backend=COMPILE_BACKEND)


COMPILE_BACKEND = "inductor"   # (tests use "aot_eager": the same tracing, no C++ build, ~10 s less)


class _Named:
    """A stacked forward and ``path``: how it runs (``{"forward": "vmap" | "stacked" |
    "layerwise", "conv <layer>": strategy, ...}``), recorded in the run's summary. ``loss``:
    the model's own per-sample training loss ``(params, x [B, n, ...], y [B, n]) -> [B, n]``
    when it defines ``stacked_loss`` (FedIns's SSF pool), else None (cross-entropy).
    ``batch_stats``: the model has BatchNorm layers, so a training forward is given ``batch``
    (which samples are real, whether to update the running statistics); without it every
    forward normalizes with the running statistics (evaluation)."""

    def __init__(self, forward: StackedForward, path: dict[str, str], loss=None,
                 batch_stats: bool = False) -> None:
        self.forward, self.path, self.loss, self.batch_stats = forward, path, loss, batch_stats
        self.compiled: StackedForward | None = None       # model.compile: the training forward
        # dense layers whose weight may be a LowRankWeight: {weight name: (in, out, rows per sample)}
        self.linears: dict[str, tuple[int, int, int]] = getattr(forward, "linears", {})

    def __call__(self, params: dict[str, torch.Tensor], x: torch.Tensor,
                 batch: tuple[torch.Tensor, bool] | None = None) -> torch.Tensor:
        # (evaluation stays eager: a no-grad graph would be a second compilation for a pass
        # that gains less)
        forward = self.compiled if self.compiled is not None and torch.is_grad_enabled() else self.forward
        if batch is not None and self.batch_stats:
            return forward(params, x, batch=batch)      # type: ignore[call-arg]
        return forward(params, x)
