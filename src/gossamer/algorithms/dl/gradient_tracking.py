"""Gradient tracking with local steps: D-PSGD whose local steps are corrected by a tracker.

With one full-batch local step and ``W`` doubly stochastic, a round is the adapt-then-combine
gradient-tracking recursion ``x+ = W (x - lr y)``, ``y+ = W y + g(x+) - g(x)`` (``y_0 =
g(x_0)``): ``y`` tracks the average gradient, so with a fixed learning rate the nodes reach
the exact minimizer of the average loss, where D-PSGD stops at a point biased by the spread
of the local gradients. With ``K`` local steps the tracker enters as a correction (the
local-step form of gradient tracking): node ``i`` keeps ``c_i`` (``sum_i c_i = 0``) and

    z_i = x_i after K steps along g_i(z) + c_i;        y_i = (x_i - z_i) / (K lr)
    x_i <- sum_j W_ij z_j;                              c_i <- c_i - y_i + sum_j W_ij y_j

``y_i`` is the node's average corrected direction; at a fixed point ``y_i = 0`` and the
average of the local gradients vanishes. For K = 1 this is exactly the recursion above
(``y = g + c``). Gradient tracking is a standard method whose papers are not in the
project's reference list yet, so none is cited (see docs/dpsgd_variants.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from gossamer.algorithms.dl.dpsgd import DPSGD
from gossamer.algorithms.local import LocalObjective


@dataclass(frozen=True)
class GradientTracking(DPSGD):
    """D-PSGD plus a gradient tracker: each message carries the model and ``y`` (2 vectors).

    The schedule options of :class:`DPSGD` apply to both (a round without gossip leaves the
    correction unchanged); the merge is the plain weighted mean (robust rules would break
    the tracker's invariant ``sum_i c_i = 0``).
    """

    pattern = "gradient_tracking"
    message_vectors = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.aggregator != "mean":
            raise ValueError("gradient tracking merges with the weighted mean only (aggregator: mean)")

    def init_correction(self, num_nodes: int, numel: int, dtype: torch.dtype = torch.float32,
                        device: torch.device | None = None) -> torch.Tensor:
        """Trackers start at the local gradients: correction 0, ``[N, P]``."""
        return torch.zeros(num_nodes, numel, dtype=dtype, device=device)

    def local_objective(self, correction: torch.Tensor) -> LocalObjective:
        """Local steps go along ``g + c_i`` (``correction`` ``[B, P]``)."""
        return LocalObjective(correction=correction)

    def directions(self, start: torch.Tensor, trained: torch.Tensor, steps: np.ndarray, lr: float,
                   correction: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``y = (start - trained) / (K lr)`` per row ``[N, P]``; a node that took no step
        (``K = 0``) has a zero gradient estimate, so ``y = c``. ``out`` may be ``start``."""
        k = torch.as_tensor(np.asarray(steps), dtype=start.dtype, device=start.device)
        scale = torch.where(k > 0, 1.0 / (k.clamp(min=1) * lr),
                            torch.zeros((), dtype=start.dtype, device=start.device))
        out = torch.sub(start, trained, out=out if out is not None else torch.empty_like(start))
        out.mul_(scale.unsqueeze(1))
        idle = torch.from_numpy(np.flatnonzero(np.asarray(steps) == 0))
        if len(idle):
            out[idle] = correction[idle]
        return out

    def remove_directions(self, correction: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
        """First half of the tracker update, in place: ``c <- c - y``."""
        return correction.sub_(directions)

    def add_mixed(self, correction: torch.Tensor, mixed_directions: torch.Tensor) -> torch.Tensor:
        """Second half, in place: ``c <- c + W^Q y`` (``mixed_directions``)."""
        return correction.add_(mixed_directions)


__all__ = ["GradientTracking"]
