"""CO2: local updating with the whole-model exchange overlapped with the next outer step.

Weigao Sun, Zhen Qin, Weixuan Sun, et al., "CO2: Efficient Distributed Training with Full
Communication-Computation Overlap", 2024. arXiv:2401.16265. The outer rule (momentum on the
outer gradient divided by the staleness gap penalty, the momentum clipped element-wise) is the
one of the authors' released implementation (weigao266/fairscale-CO2,
``CO2DistributedDataParallel``), whose clip is meant to clamp the momentum to
``[-threshold, threshold]``; the paper's Algorithm 1 was not available to check against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from gossamer.algorithms.fl.diloco import DiLoCo
from gossamer.algorithms.fl.fedavg import ServerState


@dataclass(frozen=True)
class CO2(DiLoCo):
    """Every worker takes ``H`` inner AdamW steps (``local.steps: H``) from the outer model
    ``x_r`` and launches the average of its outer gradient ``y_r - x_r`` (through
    ``compression.uplink`` if set); without waiting for it, the next outer step begins. At the
    end of that step the average of the previous one, ``d``, has arrived and steps the outer
    model one outer step late::

        m <- server_momentum * m + d / gap_penalty
        m <- clamp(m, -clip_threshold, clip_threshold)        (if clip_threshold is set)
        x_{r+1} <- x_r + server_lr * m

    and every worker starts the next outer step from ``x_{r+1}`` (its inner AdamW state kept).
    No outer gradient is lost: each is applied exactly once, one outer step after it was
    computed (the last one is still in flight when the run stops). On the simulated clock
    an outer step lasts ``max(compute, previous exchange)``: the exchange is hidden whenever it
    is shorter than ``H`` inner steps. The decisions are in :mod:`gossamer.protocols.islands`."""

    pattern: ClassVar[str] = "islands"
    one_step_late: ClassVar[bool] = True
    fragments: ClassVar[int] = 1                 # the whole model is exchanged
    fragment_by: ClassVar[str] = "size"
    server_optimizer: str = "momentum"
    server_lr: float = 1.0
    server_momentum: float = 0.0                 # the authors' fairseq default up to 16 workers
    gap_penalty: float = 1.0
    clip_threshold: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.server_optimizer != "momentum":
            raise ValueError("co2 steps the outer model with its own momentum rule: "
                             "server_optimizer momentum only")
        if self.gap_penalty <= 0:
            raise ValueError("gap_penalty must be > 0")
        if self.clip_threshold is not None and self.clip_threshold <= 0:
            raise ValueError("clip_threshold must be > 0 (or null for no clipping)")
        if self.aggregator != "mean":
            raise ValueError("co2 averages the outer gradients: aggregator mean only")

    def outer_step(self, state: ServerState, index: torch.Tensor, delta: torch.Tensor) -> ServerState:
        """The late outer step with ``delta``, the average of ``local - global`` of the
        previous outer step (``index``: every coordinate)."""
        m = state.extra.get("server_v")
        m = torch.zeros_like(state.params) if m is None else m
        m = self.server_momentum * m + delta / self.gap_penalty
        if self.clip_threshold is not None:
            m = m.clamp(-self.clip_threshold, self.clip_threshold)
        params = state.params.clone()
        params[index] = state.params[index] + self.server_lr * m[index]
        return ServerState(params, state.round + 1, {**state.extra, "server_v": m})
