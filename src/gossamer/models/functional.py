"""Flat, stacked parameters and batched forward passes over a population of models.

The population's models live in one ``[N, P]`` tensor (one row per node). ``ParamSpec``
maps a row to the module's named parameters as views, so training, mixing, aggregation,
compression and byte counting all work on the same flat rows without copies.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

StackedForward = Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]


class ModelNotVectorizable(ValueError):
    """The user model cannot be run for many nodes at once by ``torch.func``."""


@dataclass(frozen=True)
class ParamSpec:
    """Names, shapes and offsets of a module's parameters inside a flat row."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    numel: int

    @classmethod
    def from_module(cls, module: nn.Module) -> ParamSpec:
        names, shapes, offsets, total = [], [], [], 0
        for name, p in module.named_parameters():
            names.append(name)
            shapes.append(tuple(p.shape))
            offsets.append(total)
            total += p.numel()
        return cls(tuple(names), tuple(shapes), tuple(offsets), total)

    def flatten(self, module: nn.Module) -> torch.Tensor:
        """The module's parameters as one flat float32 vector ``[P]``."""
        return torch.cat([p.detach().reshape(-1) for p in module.parameters()]).float()

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
            for name, p in module.named_parameters():
                p.copy_(views[name][0])


def _check_stateless(module: nn.Module) -> None:
    buffers = [name for name, _ in module.named_buffers()]
    if buffers:
        raise ModelNotVectorizable(
            f"model has buffers {buffers[:3]} (e.g. BatchNorm running statistics); the simulator "
            "stacks parameters only: use GroupNorm/LayerNorm or a model without buffers")


def make_stacked_forward(module: nn.Module, spec: ParamSpec, sample: torch.Tensor,
                         backend: str = "auto", conv: str = "auto",
                         device: torch.device | None = None) -> StackedForward:
    """A forward over stacked parameters ``[B, ...]`` and inputs ``[B, n, ...]``.

    ``auto`` uses the model's hand-written ``stacked_forward`` when it has one; else, for a
    model with 2-d convolutions, the layer-by-layer executor
    (:mod:`gossamer.models.layerwise`: node axis folded into the batch, each convolution in its
    fastest batched form, ``conv`` pinning it) when it can run the model and agrees with
    ``vmap`` on a probe; otherwise ``torch.func.vmap`` over ``functional_call``. The chosen
    path is probed once on ``sample`` (one input row) so an unsupported model fails here with
    a clear message. The forward's ``path`` attribute names what was chosen.
    """
    from gossamer.models.layerwise import layerwise_forward

    _check_stateless(module)
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
    if own is not None and backend != "vmap" and backend != "layerwise":
        forward, path = own, {"forward": "stacked"}
    elif backend == "layerwise" or (backend == "auto" and any(isinstance(m, nn.Conv2d) for m in module.modules())):
        layered, why = layerwise_forward(module, sample, conv, device=device)
        if layered is None and backend == "layerwise":
            raise ModelNotVectorizable(f"model.forward: layerwise cannot run {type(module).__name__}: {why}")
        if layered is not None:
            try:
                with torch.no_grad():
                    agree = torch.allclose(layered(spec.views(probe), xs), vmapped(spec.views(probe), xs),
                                           rtol=1e-4, atol=1e-5)
            except Exception as exc:  # noqa: BLE001 - a model the executor mis-runs: say so or fall back
                agree, why = False, f"{type(exc).__name__}: {exc}"
            if not agree and backend == "layerwise":
                raise ModelNotVectorizable(f"model.forward: layerwise disagrees with vmap on "
                                           f"{type(module).__name__} {why}".rstrip())
            if agree:
                forward = layered
                path = {"forward": "layerwise", **{f"conv {k}": v for k, v in layered.conv.items()}}
    probe.requires_grad_(True)
    try:
        out = forward(spec.views(probe), xs)
        out.sum().backward()
    except Exception as exc:  # noqa: BLE001 - report any failure of the user's model clearly
        raise ModelNotVectorizable(
            f"model {type(module).__name__} cannot be vectorized across nodes by torch.func "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); avoid "
            "in-place ops on inputs, .item(), data-dependent control flow and BatchNorm") from None
    return _Named(forward, path, getattr(module, "stacked_loss", None))


class _Named:
    """A stacked forward and ``path``: how it runs (``{"forward": "vmap" | "stacked" |
    "layerwise", "conv <layer>": strategy, ...}``), recorded in the run's summary. ``loss``:
    the model's own per-sample training loss ``(params, x [B, n, ...], y [B, n]) -> [B, n]``
    when it defines ``stacked_loss`` (FedIns's SSF pool), else None (cross-entropy)."""

    def __init__(self, forward: StackedForward, path: dict[str, str], loss=None) -> None:
        self.forward, self.path, self.loss = forward, path, loss

    def __call__(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return self.forward(params, x)
