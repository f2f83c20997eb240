"""The asynchronous rules of the General Theory paper, as its authors define them.

Fraboni, Vidal, Kameni, Lorenzi, "A General Theory for Federated Optimization with
Asynchronous and Heterogeneous Clients Updates", JMLR 24(110) 2023, arXiv:2206.10189. Its
asynchronous FedAvg ("FedAsync") applies every arriving update ``Delta_i`` (trained minus start
model) at once: ``x <- x + server_lr * d_i Delta_i``. The authors' reference code
(Accenture/Labs-Federated-Learning, ``FL/server.py``, schemes ``Async_identical`` and
``Async_weight``) has two weightings:

- ``identical``: ``d_i = 1``, a full add of each update (Xie et al.'s ``fedasync`` mixes the
  client's model into the server's instead, a different baseline);
- ``task_time`` (bias-corrected): ``d_i = (sum_j 1 / tau_j) tau_i p_i``, with ``tau_i`` client
  i's update time and ``p_i`` its importance (``samples``: ``n_i / n``; ``uniform``). A client
  arriving every ``tau_i`` seconds then contributes ``p_i`` per unit of time in expectation, so
  fast clients no longer dominate. The paper fixes ``tau_i`` per client; here ``tau_i`` is the
  client's latest measured task time (arrival minus dispatch, as the protocol reports it) and the
  sum runs over the clients measured so far (exact once every client has arrived once when
  task times are fixed; smaller steps before).

``staleness_fn`` (default ``constant``, as in the paper) multiplies ``d_i`` by ``s(staleness)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from gossamer.algorithms.fl.async_fl import (
    AsyncFL,
    AsyncServerState,
    StalenessFn,
    Weighting,
    importance,
)


@dataclass
class TaskTimeState(AsyncServerState):
    """The model, its version and every client's latest task time ``[N]`` (nan: not measured)."""

    task_s: torch.Tensor | None = None


@dataclass(frozen=True)
class AsyncFedAvg(AsyncFL):
    """The General Theory's asynchronous FedAvg: every accepted arrival ``x <- x + server_lr d_i Delta_i``."""

    trigger = "arrival"
    concurrency: int | None = None
    aggregation: Literal["identical", "task_time"] = "identical"
    weighting: Weighting = "samples"
    server_lr: float = 1.0
    staleness_fn: StalenessFn = "constant"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.server_lr <= 0:
            raise ValueError("server_lr must be > 0")

    def init_state(self, params: torch.Tensor) -> TaskTimeState:
        return TaskTimeState(params.clone())

    def aggregate(self, state: AsyncServerState, messages: torch.Tensor, staleness: np.ndarray,
                  clients: np.ndarray, sizes: np.ndarray, lr: float | None = None,
                  **context: Any) -> TaskTimeState:
        """Apply the arriving update(s) with ``d_i`` of the configured aggregation."""
        clients, task_s = np.asarray(clients, dtype=np.int64), getattr(state, "task_s", None)
        d = self.weights(np.asarray(staleness))
        if self.aggregation == "task_time":
            if context.get("task_s") is None:
                raise ValueError("task_time aggregation needs each task's time (task_s)")
            tau = np.full(len(sizes), np.nan) if task_s is None else task_s.numpy().copy()
            tau[clients] = np.asarray(context["task_s"], dtype=np.float64)
            known = ~np.isnan(tau) & (np.asarray(sizes) > 0)
            rate = float(np.sum(1.0 / tau[known]))
            d = d * rate * tau[clients] * importance(self.weighting, clients, sizes)
            task_s = torch.from_numpy(tau)
        step = torch.as_tensor(d, dtype=messages.dtype, device=messages.device) @ messages
        return TaskTimeState(state.params + self.server_lr * step, state.version + 1, task_s)
