"""Gradient coding: synchronous full-gradient descent that recovers the exact gradient without
waiting for stragglers.

Classic gradient coding: Tandon, Lei, Dimakis, Karampatziakis, "Gradient Coding: Avoiding
Stragglers in Distributed Learning", ICML 2017, arXiv:1612.03301. Sequential gradient coding
(the selective-reattempt scheme): Krishnan, Ebrahimi, Khisti, "Sequential Gradient Coding For
Straggler Mitigation", ICLR 2023, arXiv:2211.13802. The codes, the decoding and when a round
closes are in :mod:`gossamer.protocols.coding`; ``sim/drivers/coded.py`` runs them, and
``runtime/coded.py`` on real processes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from gossamer.algorithms.base import Algorithm
from gossamer.algorithms.fl.fedavg import ServerState
from gossamer.algorithms.fl.server_opt import ServerOptimizer, ServerOptimizerName, from_fields


def sequential_s(burst: int, window: int, stragglers: int) -> int:
    """The gradient code's ``s`` of the selective-reattempt scheme: ``ceil(B lambda / (W - 1 + B))``."""
    return math.ceil(burst * stragglers / (window - 1 + burst))


@dataclass(frozen=True)
class _CodedDescent(Algorithm):
    """What both schemes share: the code, the weighting of the partitions and the server's step.

    The full gradient is ``sum_j w_j grad L_j(x)`` over the ``n`` partitions (node ``j``'s shard,
    ``L_j`` its mean loss), ``w_j`` proportional to the shard's samples (``weighting: samples``,
    the gradient of the mean loss over all data) or ``1 / n`` (``uniform``). The server steps
    with ``server_optimizer`` on the pseudo-gradient ``-g``: ``sgd`` is ``x -= server_lr * g``;
    ``momentum``, ``nesterov``, ``adam``, ... as in :mod:`gossamer.algorithms.fl.server_opt`.
    ``code``: ``fractional`` (fractional repetition: ``n / (s + 1)`` groups of workers holding
    the same ``s + 1`` partitions, needs ``(s + 1) | n``; decoding adds one 0/1-weighted vector
    per group, so float32 messages decode to float32 rounding) or ``cyclic`` (cyclic repetition,
    any ``s < n``; its random real coefficients are badly conditioned, so its messages travel
    as float64)."""

    family = "fl"
    pattern = "coded"

    code: Literal["fractional", "cyclic"] = "fractional"
    weighting: Literal["samples", "uniform"] = "samples"
    server_optimizer: ServerOptimizerName = "sgd"
    server_lr: float = 0.1
    server_momentum: float = 0.9
    server_beta2: float = 0.99
    server_tau: float = 1e-3
    server_weight_decay: float = 0.0

    def __post_init__(self) -> None:
        _ = self.optimizer                                          # validates server_* fields

    @property
    def optimizer(self) -> ServerOptimizer:
        return from_fields(self)

    @property
    def code_s(self) -> int:
        """The gradient code's ``s``: each worker holds ``s + 1`` partitions."""
        raise NotImplementedError

    @property
    def delay(self) -> int:
        """Rounds between a job's start and the round that decodes and applies it."""
        return 0

    @property
    def load(self) -> int:
        """Partition gradients each worker computes per round."""
        return self.code_s + 1

    def select(self, candidates: np.ndarray, gen: np.random.Generator) -> np.ndarray:
        """Every worker, every round (a synchronous round's selection on real processes)."""
        return np.asarray(candidates, dtype=np.int64)

    def partition_weights(self, num_samples: np.ndarray) -> np.ndarray:
        """``w`` ``[n]`` (float64, summing to 1) of the partitions in the full gradient."""
        sizes = np.asarray(num_samples, dtype=np.float64)
        w = sizes if self.weighting == "samples" else np.ones(len(sizes))
        return w / w.sum()

    def init_state(self, params: torch.Tensor) -> ServerState:
        return ServerState(params.clone(), 0, self.optimizer.init(params))

    def step(self, state: ServerState, gradient: torch.Tensor) -> ServerState:
        """The server's step on the decoded full gradient ``gradient`` ``[P]``."""
        params, extra = self.optimizer.step(state.params, -gradient, dict(state.extra))
        return ServerState(params, state.round + 1, extra)


@dataclass(frozen=True)
class GradientCoding(_CodedDescent):
    """Classic gradient coding (Tandon et al. 2017): each round every worker computes the
    gradients of its ``s + 1`` partitions at the current model and sends one coded vector; the
    server decodes the exact full gradient from the first ``n - s`` arrivals and steps. Any
    ``s`` stragglers per round are tolerated, at ``s + 1`` times the compute of an uncoded
    worker."""

    s: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.s < 0:
            raise ValueError("s (stragglers tolerated per round) must be >= 0")

    @property
    def code_s(self) -> int:
        return self.s


@dataclass(frozen=True)
class SequentialGradientCoding(_CodedDescent):
    """Sequential gradient coding, the selective-reattempt scheme (Krishnan, Ebrahimi, Khisti,
    ICLR 2023), for the ``(B, W, lambda)``-bursty straggler model: in any ``window`` (``W``)
    consecutive rounds at most ``stragglers`` (``lambda``) distinct workers straggle, each within
    ``burst`` (``B``) consecutive rounds; ``W - 1`` must be a multiple of ``B``. Gradient ``t``
    (job ``t``, at the model of round ``t``) is decoded exactly at the end of round ``t + B``
    and applied then: one model is trained by gradient descent with a fixed delay of ``B``
    rounds (``x_{r+1} = x_r - lr * g(x_{r-B})``; the paper's setting trains ``B + 1`` models
    round-robin, where the delay costs nothing). Workers run a gradient code with ``s =
    ceil(B lambda / (W - 1 + B))``, below ``lambda``, so each computes ``s + 1`` partition
    gradients per round where classic gradient coding tolerating ``lambda`` stragglers per
    round computes ``lambda + 1``; workers whose task of job ``t`` was not received reattempt
    it in round ``t + B`` when more than ``s`` are missing. A straggler pattern outside the
    model is not decoded early: the server then waits for more workers that round."""

    burst: int = 1
    window: int = 2
    stragglers: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.burst < 1:
            raise ValueError("burst (B) must be >= 1")
        if self.window < self.burst + 1 or (self.window - 1) % self.burst:
            raise ValueError(f"window (W) must be 1 plus a multiple of burst (B = {self.burst}), "
                             f"e.g. {self.burst + 1}")
        if self.stragglers < 1:
            raise ValueError("stragglers (lambda) must be >= 1")

    @property
    def code_s(self) -> int:
        return sequential_s(self.burst, self.window, self.stragglers)

    @property
    def delay(self) -> int:
        return self.burst
