"""Anarchic Federated Learning: clients choose when to work and how many local steps to take.

Yang, Zhang, Khanduri, Liu, "Anarchic Federated Learning", ICML 2022, arXiv:2108.09875.
Two server rules with two-sided learning rates (server ``eta = server_lr``, local
``eta_L = local.lr``), over the ``async_fl`` pattern:

- a client ``i`` that decides to work pulls the current model ``x``, takes ``K_i`` local SGD
  steps of its own choosing and returns the average of its stochastic gradients
  ``G_i = (1 / K_i) sum_k g_i(x_k)``. With plain SGD this is ``(x_start - x_end) / (eta_L K_i)``,
  which is what the simulator uploads (with momentum or weight decay it is the average
  local direction);
- **AFA-CD** (cross-device): after ``M = buffer_size`` returned updates, from any clients and
  of any staleness, ``x <- x - eta eta_L (1/M) sum_{j in buffer} G_j``;
- **AFA-CS** (cross-silo): the server keeps every client's most recent ``G_i`` (zeros before
  its first upload) and after each ``M`` arrivals steps with the average over all N
  clients: ``x <- x - eta eta_L (1/N) sum_{i=1..N} G_i``. N counts clients holding data.

The anarchic behaviour is modelled in the simulator: an idle online client starts a task
after an exponential think time (mean ``think_time_s``; 0: at once) with ``K`` drawn
uniformly from ``[min_local_steps, max_local_steps]``, both counter-based draws keyed by
the client and its task count (:data:`gossamer.rng.STREAM_ANARCHIC`), so a client's choices
do not depend on the others. ``max_staleness`` drops staler updates (Papaya's control, not
in the paper); ``staleness_fn`` (default ``constant``, as in the paper) multiplies each
``G`` by ``s(staleness)`` when it arrives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gossamer import rng
from gossamer.algorithms.fl.async_fl import AsyncFL, AsyncServerState, StalenessFn


@dataclass
class AnarchicState(AsyncServerState):
    """AFA-CS's server state: the model, its version and every client's latest ``G_i`` ``[N, P]``
    (None until the first update)."""

    memory: torch.Tensor | None = None


@dataclass(frozen=True)
class Anarchic(AsyncFL):
    """Shared by AFA-CD and AFA-CS: client-side choices and the uploaded average direction."""

    trigger = "buffer"
    self_dispatch = True
    concurrency: int | None = None
    buffer_size: int = 5
    server_lr: float = 1.0
    min_local_steps: int = 1
    max_local_steps: int = 10
    think_time_s: float = 0.0
    staleness_fn: StalenessFn = "constant"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.buffer_size < 1:
            raise ValueError("buffer_size must be >= 1")
        if self.server_lr <= 0:
            raise ValueError("server_lr must be > 0")
        if self.min_local_steps < 1:
            raise ValueError("min_local_steps must be >= 1")
        if self.max_local_steps < self.min_local_steps:
            raise ValueError("max_local_steps must be >= min_local_steps")
        if self.think_time_s < 0:
            raise ValueError("think_time_s must be >= 0")

    def task_steps(self, seed: int, clients: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """``K`` of each client's next task: uniform on ``[min_local_steps, max_local_steps]``."""
        u = rng.uniform(seed, rng.STREAM_ANARCHIC, np.asarray(clients), np.asarray(counts), 1)
        span = self.max_local_steps - self.min_local_steps + 1
        return self.min_local_steps + np.minimum(np.floor(u * span), span - 1).astype(np.int64)

    def think_time(self, seed: int, clients: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Seconds before each client starts its next task: exponential, mean ``think_time_s``."""
        if self.think_time_s == 0:
            return np.zeros(len(clients))
        u = rng.uniform(seed, rng.STREAM_ANARCHIC, np.asarray(clients), np.asarray(counts), 0)
        return -self.think_time_s * np.log1p(-u)

    def client_message(self, trained: torch.Tensor, start: torch.Tensor, steps: np.ndarray | None = None,
                       lr: float | None = None) -> torch.Tensor:
        """``G_i = (start - trained) / (lr K_i)`` ``[B, P]``: the average local direction."""
        if steps is None or lr is None:
            raise ValueError("Anarchic FL uploads need the local steps and learning rate")
        k = torch.as_tensor(np.maximum(np.asarray(steps), 1), dtype=trained.dtype, device=trained.device).unsqueeze(1)
        return (start - trained) / (lr * k)

    def _check(self, messages: torch.Tensor, lr: float | None) -> float:
        if messages.shape[0] != self.buffer_size:
            raise ValueError(f"{type(self).__name__} applies exactly {self.buffer_size} updates, "
                             f"got {messages.shape[0]}")
        if lr is None:
            raise ValueError("Anarchic FL's server step needs the local learning rate")
        return float(lr)

    def _scaled(self, messages: torch.Tensor, staleness: np.ndarray) -> torch.Tensor:
        if self.staleness_fn == "constant":
            return messages
        w = torch.as_tensor(self.weights(np.asarray(staleness)), dtype=messages.dtype, device=messages.device)
        return messages * w.unsqueeze(1)


@dataclass(frozen=True)
class AFACD(Anarchic):
    """AFA-CD: ``x <- x - server_lr * lr * mean(G)`` over each buffer of ``buffer_size`` arrivals."""

    def aggregate(self, state: AsyncServerState, messages: torch.Tensor, staleness: np.ndarray,
                  clients: np.ndarray, sizes: np.ndarray, lr: float | None = None,
                  **context: Any) -> AsyncServerState:
        lr = self._check(messages, lr)
        g = self._scaled(messages, staleness).mean(dim=0)
        return AsyncServerState(state.params - self.server_lr * lr * g, state.version + 1)


@dataclass(frozen=True)
class AFACS(Anarchic):
    """AFA-CS: store each arrival's ``G_i`` as client i's latest; after ``buffer_size`` arrivals
    ``x <- x - server_lr * lr * (1/N) sum_i G_i`` over all N clients with data."""

    def init_state(self, params: torch.Tensor) -> AnarchicState:
        return AnarchicState(params.clone())

    def aggregate(self, state: AsyncServerState, messages: torch.Tensor, staleness: np.ndarray,
                  clients: np.ndarray, sizes: np.ndarray, lr: float | None = None,
                  **context: Any) -> AnarchicState:
        lr = self._check(messages, lr)
        memory = getattr(state, "memory", None)
        memory = state.params.new_zeros((len(sizes), state.params.numel())) if memory is None else memory.clone()
        for i, g in zip(np.asarray(clients).tolist(), self._scaled(messages, staleness), strict=True):
            memory[i] = g                                  # arrival order: the latest one wins
        holders = max(1, int((np.asarray(sizes) > 0).sum()))
        step = memory.sum(dim=0) / holders
        return AnarchicState(state.params - self.server_lr * lr * step, state.version + 1, memory)
