"""FAVANO: federated averaging with asynchronous nodes; the server periodically averages
whatever its clients have computed so far.

Leconte, Nguyen, Moulines, "FAVANO: Federated AVeraging with Asynchronous NOdes", 2023,
arXiv:2305.16099. The paper's exact algorithm (its weights and client sampling) was not
available to check; this is the documented interpretation. Every ``delta_t_s`` seconds the
server pulls the current local model of some clients (each with probability ``pull_fraction``,
a counter-based draw per client and period, so the pull times are known when a task starts),
averages their progress ``x <- x + server_lr * sum_i w_i Delta_i / sum_i w_i`` (``Delta_i``:
local model minus the model the client started from; ``w_i``: ``uniform`` or ``samples``) and
sends the pulled clients the new model. Clients keep computing between pulls, at most
``max_local_steps`` local steps per pull (then they wait); a client that is not pulled keeps
its progress for a later period, with the staleness of its start model. The simulator gives a
task the steps that fit before its pull (at least one: a client that cannot finish one step
delivers it late, into a later period).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gossamer.algorithms.fl.async_fl import (
    AsyncFL,
    AsyncServerState,
    StalenessFn,
    Weighting,
    importance,
)


@dataclass(frozen=True)
class FAVANO(AsyncFL):
    """FAVANO (interpretation, see the module docstring): periodic averaging of partial progress."""

    trigger = "period"
    concurrency: int | None = None
    delta_t_s: float = 1.0
    pull_fraction: float = 1.0
    max_local_steps: int = 10
    server_lr: float = 1.0
    weighting: Weighting = "uniform"
    staleness_fn: StalenessFn = "constant"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.delta_t_s > 0:
            raise ValueError("delta_t_s must be > 0")
        if not 0 < self.pull_fraction <= 1:
            raise ValueError("pull_fraction must be in (0, 1]")
        if self.max_local_steps < 1:
            raise ValueError("max_local_steps must be >= 1")
        if self.server_lr <= 0:
            raise ValueError("server_lr must be > 0")

    @property
    def pull_probability(self) -> float:
        return self.pull_fraction

    def task_steps(self, seed: int, clients: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """At most ``max_local_steps`` per pull (the executor cuts a task at its pull time)."""
        return np.full(len(clients), self.max_local_steps, dtype=np.int64)

    def aggregate(self, state: AsyncServerState, messages: torch.Tensor, staleness: np.ndarray,
                  clients: np.ndarray, sizes: np.ndarray, lr: float | None = None,
                  **context: Any) -> AsyncServerState:
        """Average the period's pulled progress (none pulled: the model stays, the version advances)."""
        if messages.shape[0] == 0:
            return AsyncServerState(state.params, state.version + 1)
        w = importance(self.weighting, np.asarray(clients), sizes) * self.weights(np.asarray(staleness))
        step = torch.as_tensor(w / w.sum(), dtype=messages.dtype, device=messages.device) @ messages
        return AsyncServerState(state.params + self.server_lr * step, state.version + 1)
