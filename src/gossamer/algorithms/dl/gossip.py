"""Asynchronous gossip learning: models random-walk between peers, merging and training on the way.

Ormándi, Hegedűs, Jelasity, "Gossip Learning with Linear Models on Fully Distributed Data",
Concurrency and Computation: Practice and Experience 2013, arXiv:1109.1396; Hegedűs, Danner,
Jelasity, "Gossip Learning as a Decentralized Alternative to Federated Learning", DAIS 2019.
Dual clocks (computation and communication on independent Poisson clocks) follow DADAO: Nabli,
Oyallon, "DADAO: Decoupled Accelerated Decentralized Asynchronous Optimization", ICML 2023,
arXiv:2208.00779. Variance-corrected averaging: Tian, Al-Ars, Kitsak, et al., "Vanishing
Variance Problem in Fully Decentralized Neural-Network Systems", 2024, arXiv:2404.04616.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from gossamer import rng
from gossamer.algorithms.base import Algorithm

if TYPE_CHECKING:
    from gossamer.models import ParamSpec


def variance_corrected_average(models: Sequence[torch.Tensor],
                               segments: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Average rows ``[B, P]`` of k models, then give every parameter tensor back its variance.

    Averaging k independently initialized models shrinks each weight tensor's spread by about
    1/k ("vanishing variance", Tian et al. 2024, arXiv:2404.04616). For every segment
    ``(offset, numel)`` of a row (one parameter tensor, e.g. a layer's weight or its bias),
    the averaged values are rescaled around their own mean so that their variance (over the
    tensor's elements) equals the mean of the k inputs' variances; the tensor's mean, which
    is the mean of the inputs' means, is kept. Tensors of one element, and tensors whose
    average is constant, are left as averaged.

    >>> a, b = torch.tensor([[1.0, -1.0]]), torch.tensor([[-1.0, 1.0]])
    >>> variance_corrected_average([a, b], [(0, 2)])   # plain mean is [0, 0]: constant, kept
    tensor([[0., 0.]])
    """
    k, width = len(models), models[0].shape[1]
    ends = sorted((offset, offset + numel) for offset, numel in segments)
    if [e[0] for e in ends] != [0] + [e[1] for e in ends[:-1]] or ends[-1][1] != width:
        raise ValueError("segments must tile the row")
    out = torch.empty_like(models[0])
    for offset, numel in segments:
        parts = [m[:, offset:offset + numel] for m in models]
        seg = out[:, offset:offset + numel]
        if numel < 2:
            seg.copy_(sum(parts) / k)
            continue
        means = [p.mean(dim=1, keepdim=True) for p in parts]
        centered = [p - mu for p, mu in zip(parts, means, strict=True)]
        target = sum(_sum_sq(c) for c in centered) / (k * (numel - 1))
        average = centered[0]                      # the mean's deviations: mean of the deviations
        for c in centered[1:]:
            average.add_(c)
        average.div_(k)
        current = _sum_sq(average) / (numel - 1)
        ok = current > 0
        scale = torch.where(ok, (target / torch.where(ok, current, 1.0)).sqrt(), 1.0)
        seg.copy_(average.mul_(scale.unsqueeze(1)).add_(sum(means) / k))
    return out


def _sum_sq(x: torch.Tensor) -> torch.Tensor:
    """Sum of squares of each row (``torch.var`` is about ten times slower on CPU)."""
    return torch.linalg.vector_norm(x, dim=1).square()


def segments_of(spec: ParamSpec) -> list[tuple[int, int]]:
    """``(offset, numel)`` of every parameter tensor in a flat row."""
    return [(off, math.prod(shape)) for off, shape in zip(spec.offsets, spec.shapes, strict=True)]


@dataclass(frozen=True)
class GossipLearning(Algorithm):
    """Nodes exchange models with random neighbours on their own clocks and merge them.

    Exchanges: ``push`` sends the own model, ``pull`` asks a neighbour for its model,
    ``push_pull`` does both. ``clocks``:

    - ``single``: one clock per node (Poisson, mean gap ``period_s``); a tick is an exchange,
      and a received model is merged and then trained on (Hegedűs et al. 2019).
    - ``dual``: as in DADAO (Nabli & Oyallon 2023), each node has two independent clocks: a
      communication clock (mean gap ``period_s``; a tick is an exchange, and a received model
      is merged on arrival, without training) and a computation clock (mean gap
      ``compute_period_s``; a tick starts one local update on the node's own data).

    ``merge``: ``average`` (plain mean), ``age_weighted`` (weights proportional to the models'
    ages, i.e. the number of local updates each has seen), or ``variance_corrected`` (the mean,
    with each parameter tensor rescaled to the mean variance of the two models; Tian et al.
    2024). The merged age is the larger of the two. ``poisson: false`` makes both clocks
    periodic with a random phase.
    """

    family = "dl"
    pattern = "async_gossip"

    mode: Literal["push", "pull", "push_pull"] = "push"
    merge: Literal["average", "age_weighted", "variance_corrected"] = "age_weighted"
    period_s: float = 1.0
    poisson: bool = True
    clocks: Literal["single", "dual"] = "single"
    compute_period_s: float = 1.0

    def __post_init__(self) -> None:
        if self.period_s <= 0:
            raise ValueError("period_s must be > 0")
        if self.compute_period_s <= 0:
            raise ValueError("compute_period_s must be > 0")

    # --- the clocks: pure functions of (seed, node, tick), shared by simulator and peers ------
    def _clock(self, compute: bool) -> tuple[int, float]:
        """(random stream, mean gap) of the exchange or the computation clock."""
        if compute:
            return rng.STREAM_GOSSIP_COMPUTE, self.compute_period_s
        return rng.STREAM_GOSSIP, self.period_s

    def _gap_from(self, u: float, k: int, period: float) -> float:
        if self.poisson:
            return -math.log1p(-u) * period
        return u * period if k == 0 else period      # periodic, after a random phase

    def clock_gap(self, seed: int, node: int, k: int, *, compute: bool = False) -> float:
        """Gap from a node's k-th tick of its exchange (or computation) clock to the next:
        exponential with mean ``period_s`` (``compute_period_s``), or with ``poisson: false``
        the period after a phase uniform in [0, period)."""
        stream, period = self._clock(compute)
        return self._gap_from(rng.uniform_scalar(seed, stream, node, k, 0), k, period)

    def clock_gaps(self, seed: int, nodes: np.ndarray, ks: np.ndarray, *,
                   compute: bool = False) -> list[float]:
        """:meth:`clock_gap` for many (node, k) at once: the same values, one vectorized draw."""
        stream, period = self._clock(compute)
        u = rng.uniform(seed, stream, nodes, ks, 0).tolist()
        return [self._gap_from(x, k, period) for x, k in zip(u, np.asarray(ks).tolist(), strict=True)]

    def merge_models(self, own: torch.Tensor, own_age: torch.Tensor, received: torch.Tensor,
                     received_age: torch.Tensor, spec: ParamSpec | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Merge rows ``own`` and ``received`` ``[B, P]`` with ages ``[B]``; returns (model, age).

        ``spec`` gives the parameter tensors inside a row (needed by ``variance_corrected``).
        """
        age = torch.maximum(own_age, received_age)
        if self.merge == "average":
            return torch.add(own, received).mul_(0.5), age
        if self.merge == "variance_corrected":
            if spec is None:
                raise ValueError("the variance_corrected merge needs the model's ParamSpec")
            return variance_corrected_average([own, received], segments_of(spec)), age
        total = own_age + received_age
        w_recv = torch.where(total > 0, received_age / total.clamp(min=1e-12), torch.full_like(total, 0.5))
        return torch.lerp(own, received, w_recv.unsqueeze(1).to(own.dtype)), age
