"""Zeroth-order FL with shared randomness (``zo_fedavg``): what a round decides.

The round's clients are :class:`gossamer.protocols.sync_fl.SyncRound`'s selection. Each
uploads ``K`` scalars; the server regenerates the directions from their keys
(:mod:`gossamer.algorithms.fl.zo`). What a client downloads is this module's
:class:`ScalarRelay`: the model, or (``broadcast: scalars``) the scalars of every round since
it last synced, whichever is smaller; either way it then holds the previous round's model.
The simulator executes it (``sim/drivers/zo_fl.py``); the runtime has no zo_fl process yet.
"""

from __future__ import annotations

import numpy as np
import torch

from gossamer import wire


class ScalarRelay:
    """The scalars relayed so far and the last round each client synced to."""

    def __init__(self, num_nodes: int, model_bytes: int, broadcast: str) -> None:
        self.model_bytes, self.broadcast = model_bytes, broadcast
        self.synced = np.zeros(num_nodes, dtype=np.int64)
        self.relayed = [0]                  # relay payload bytes of rounds 1..r, cumulative

    def download_bytes(self, ids: np.ndarray, r: int) -> np.ndarray:
        """Per client of round ``r``: the bytes it downloads; it then holds round ``r - 1``."""
        if self.broadcast == "model":
            return np.full(len(ids), self.model_bytes, dtype=np.int64)
        relayed = np.asarray(self.relayed, dtype=np.int64)
        missed = wire.HEADER_BYTES + relayed[r - 1] - relayed[self.synced[ids]]
        self.synced[ids] = r - 1
        return np.minimum(missed, self.model_bytes)

    def relay(self, record_bytes: int) -> None:
        """The round's scalars (a message of ``record_bytes``; 0 bytes for an idle round)."""
        self.relayed.append(self.relayed[-1] + max(0, record_bytes - wire.HEADER_BYTES))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"synced": torch.from_numpy(self.synced.copy()),
                "relayed": torch.tensor(self.relayed, dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.synced = state["synced"].numpy().copy()
        self.relayed = [int(v) for v in state["relayed"].tolist()]
