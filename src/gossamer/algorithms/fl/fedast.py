"""FedAST: buffered asynchronous training of several models on one pool of clients.

Askin, Sharma, Joe-Wong, Joshi, "FedAST: Federated Asynchronous Simultaneous Training", UAI
2024, arXiv:2406.00302; the rules follow the authors' code (askinb/FedAST, ``server.py``,
``async_run_fedast``/``aggregation``): model ``m`` keeps ``active[m]`` tasks in flight and its
own buffer; an update of model ``m`` joins buffer ``m``, and once it holds ``buffer_sizes[m]``
updates ``x_m <- x_m + server_lr[m] * (1/B) sum_j Delta_j`` (no staleness weight; ``staleness_fn``
may add one). A freed slot goes to the model furthest below its share ``active`` (equal shares
when null), and the protocol picks the idle client (one task per client at a time, where the
authors' simulation samples clients with replacement). Here every model has the config's
architecture, data and initialization (the paper's tasks are different datasets), so the models
differ in their server hyper-parameters and client draws. Not implemented: the paper's dynamic
reallocation of active tasks by update variance (``varBasedR``) and handing a finished model's
share to the others. ``round`` counts updates of any model; staleness counts versions of the
task's own model; ``test_accuracy`` is model 0's (``summary.json``: every model's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gossamer.algorithms.fl.async_fl import AsyncFL, AsyncServerState, StalenessFn


@dataclass
class FedASTState(AsyncServerState):
    """``params`` is model 0; ``models`` ``[M, P]``, ``versions`` ``[M]`` updates of each model."""

    models: torch.Tensor | None = None
    versions: torch.Tensor | None = None


@dataclass(frozen=True)
class FedAST(AsyncFL):
    """FedAST (Askin et al., UAI 2024, arXiv:2406.00302): see the module docstring."""

    trigger = "buffer"
    buffer_sizes: tuple[int, ...] = (5, 5)
    server_lrs: tuple[float, ...] | None = None
    active: tuple[int, ...] | None = None
    staleness_fn: StalenessFn = "constant"

    def __post_init__(self) -> None:
        super().__post_init__()
        m = len(self.buffer_sizes)
        if m < 1 or min(self.buffer_sizes) < 1:
            raise ValueError("buffer_sizes must list one size >= 1 per model")
        for name in ("server_lrs", "active"):
            value = getattr(self, name)
            if value is not None and len(value) != m:
                raise ValueError(f"{name} must have one entry per model ({m}, as buffer_sizes)")
        if self.server_lrs is not None and min(self.server_lrs) <= 0:
            raise ValueError("server_lrs must be > 0")
        if self.active is not None and min(self.active) < 0:
            raise ValueError("active must be >= 0")

    @property
    def num_models(self) -> int:
        return len(self.buffer_sizes)

    def init_state(self, params: torch.Tensor) -> FedASTState:
        models = params.reshape(1, -1).repeat(self.num_models, 1)
        return FedASTState(models[0], 0, models, torch.zeros(self.num_models, dtype=torch.int64, device="cpu"))

    def due(self, model: int) -> int:
        return self.buffer_sizes[model]

    def pick_models(self, count: int, active: list[int]) -> list[int]:
        """Each new task to the model furthest below its share (ties: the lowest index)."""
        load = np.bincount(np.asarray(active, dtype=np.int64), minlength=self.num_models)[: self.num_models]
        share = np.ones(self.num_models) if self.active is None else np.asarray(self.active, dtype=np.float64)
        out = []
        for _ in range(count):
            m = int(np.argmax(share - load))
            load[m] += 1
            out.append(m)
        return out

    def model_params(self, state: AsyncServerState, model: int) -> torch.Tensor:
        return state.models[model]

    def model_version(self, state: AsyncServerState, model: int) -> int:
        return int(state.versions[model])

    def aggregate(self, state: AsyncServerState, messages: torch.Tensor, staleness: np.ndarray,
                  clients: np.ndarray, sizes: np.ndarray, lr: float | None = None,
                  **context: Any) -> FedASTState:
        """Apply one full buffer of model ``context["model"]``."""
        m = int(context.get("model", 0))
        if messages.shape[0] != self.buffer_sizes[m]:
            raise ValueError(f"FedAST model {m} applies exactly {self.buffer_sizes[m]} updates, "
                             f"got {messages.shape[0]}")
        server_lr = 1.0 if self.server_lrs is None else self.server_lrs[m]
        w = torch.as_tensor(self.weights(np.asarray(staleness)), dtype=messages.dtype, device=messages.device)
        models, versions = state.models.clone(), state.versions.clone()
        models[m] += server_lr * (w @ messages) / messages.shape[0]
        versions[m] += 1
        return FedASTState(models[0], state.version + 1, models, versions)
