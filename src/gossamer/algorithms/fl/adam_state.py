"""Clients that keep their local AdamW state between their rounds (DiLoCo's workers, FED-PUB's
clients with ``keep_optimizer_state``)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from gossamer.algorithms.fl.payload import Payload
from gossamer.algorithms.local import LocalObjective


class KeptAdamState:
    """A mixin before a :class:`~gossamer.algorithms.fl.fedavg.FedAvg` subclass: each client's
    AdamW state (``m``, ``v`` and the step count, ``[2P + 1]``, ``AdamW.state_width``) lives
    with the executor (the simulator's client store, a client process) and local training
    updates it in place (:attr:`LocalObjective.optimizer_state`); it is never sent.
    ``keeps_adam_state`` says whether this instance keeps it; ``missing_state`` is the error
    when an executor passes none."""

    keeps_adam_state = True
    missing_state = "the clients' AdamW state is missing"

    @property
    def client_state_vectors(self) -> int:
        return 2 if self.keeps_adam_state else 0          # m and v (and one step count)

    def init_client_state(self, numel: int) -> torch.Tensor | None:
        return torch.zeros(2 * numel + 1) if self.keeps_adam_state else None

    def local_objective(self, payload: Payload, client_state: torch.Tensor | None
                        ) -> LocalObjective | None:
        base = super().local_objective(payload, None)
        if not self.keeps_adam_state:
            return base
        if client_state is None:
            raise ValueError(self.missing_state)
        return replace(base or LocalObjective(), optimizer_state=client_state)

    def client_update(self, trained: torch.Tensor, payload: Payload,
                      client_state: torch.Tensor | None, steps: np.ndarray, lr: float
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The uploads; the new state is ``client_state``, which local training updated in
        place (None when this instance keeps none)."""
        uploads, _ = super().client_update(trained, payload, None, steps, lr)
        return uploads, client_state if self.keeps_adam_state else None
