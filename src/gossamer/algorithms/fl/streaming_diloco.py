"""Streaming DiLoCo: DiLoCo synchronizing one fragment of the model at a time, with overlap.

Douillard, Donchev, Rush, et al., "Streaming DiLoCo with overlapping communication: Towards a
Distributed Free Lunch", arXiv:2501.18512.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from gossamer.algorithms.fl.diloco import DiLoCo
from gossamer.algorithms.fl.fedavg import ServerState


@dataclass(frozen=True)
class StreamingDiLoCo(DiLoCo):
    """Workers keep their own model and inner AdamW state; every ``H / fragments`` inner steps
    (``local.steps: H``) one fragment of about ``P / fragments`` values is exchanged
    (``fragment_by: size``: equal runs of the flat parameter vector, so one exchange carries
    exactly ``1 / fragments`` of the model; ``layers``: runs of whole layers, as the paper
    cuts a large model, unequal on a small one): the
    workers' outer gradients for it (``global - local``, through ``compression.uplink`` if set,
    e.g. 4-bit quantization) are averaged, the outer optimizer (Nesterov) steps that fragment
    of the global model, and ``overlap`` inner steps later every worker sets its fragment to
    ``alpha * local + (1 - alpha) * global``; the exchange proceeds during those steps on the
    simulated clock. ``fragments: 1, overlap: 0, alpha: 0`` is DiLoCo. The peak bytes of one
    exchange fall by about ``fragments``; the total per ``H`` steps is DiLoCo's.
    The decisions are in :mod:`gossamer.protocols.islands`."""

    pattern: ClassVar[str] = "islands"
    fragments: int = 4
    overlap: int = 1
    alpha: float = 0.5
    fragment_by: Literal["size", "layers"] = "size"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.fragments < 1:
            raise ValueError("fragments must be >= 1")
        if self.overlap < 0:
            raise ValueError("overlap must be >= 0 inner steps")
        if not 0 <= self.alpha <= 1:
            raise ValueError("alpha must be in [0, 1]")
        if self.server_optimizer not in ("sgd", "momentum", "nesterov"):
            raise ValueError("streaming_diloco steps fragments with server_optimizer sgd, momentum "
                             "or nesterov (per-coordinate buffers only)")
        if self.aggregator != "mean":
            raise ValueError("streaming_diloco averages the outer gradients: aggregator mean only")

    def outer_step(self, state: ServerState, index: torch.Tensor, delta: torch.Tensor) -> ServerState:
        """The outer optimizer's step on the coordinates ``index`` only, with their slice of
        its buffers; ``delta`` is the averaged ``local - global`` of that fragment."""
        buffers = {k: v for k, v in state.extra.items() if k.startswith("server_")}
        if not buffers:
            buffers = self.optimizer.init(state.params)
        new, sub = self.optimizer.step(state.params[index], delta, {k: v[index] for k, v in buffers.items()})
        params = state.params.clone()
        params[index] = new
        extra = dict(state.extra)
        for key, value in sub.items():
            whole = buffers[key].clone()
            whole[index] = value
            extra[key] = whole
        return ServerState(params, state.round + 1, extra)
