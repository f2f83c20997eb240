"""The synchronous coordinator's checkpoint (``checkpoints/server.pt`` after every round) and
``--resume``: the server state, bytes, joined clients, wall seconds so far, the DP ledger, EF21
estimates, secure aggregation's aborts, personal rows and contribution scores; a pattern adds
its own through :meth:`ServerCheckpoint._checkpoint_state` and reads it back in
:meth:`ServerCheckpoint._restore_state` (gradient coding's scheme and held vectors). Mixed into
:class:`~gossamer.runtime.fl_server.Coordinator`; :func:`read_checkpoint` serves the
asynchronous coordinator too."""

from __future__ import annotations

import time
from typing import Any

import torch

from gossamer.algorithms.fl.fedavg import ServerState
from gossamer.metrics.runstore import checkpoint_exists, load_checkpoint, save_checkpoint
from gossamer.runtime.common import log


class ServerCheckpoint:
    """Writes and reads the coordinator's checkpoint (mixed into the synchronous coordinator)."""

    def _checkpoint(self, start: float) -> None:
        save_checkpoint(self.run_dir / "checkpoints" / "server.pt", self._checkpoint_state(start))

    def _checkpoint_state(self, start: float) -> dict[str, Any]:
        return {
            "round": self.state.round, "params": self.state.params, "extra": dict(self.state.extra),
            "bytes_up": self.bytes_up, "bytes_down": self.bytes_down,
            "clients": torch.tensor(sorted(self.clients.items()), dtype=torch.int64).reshape(-1, 2),
            "elapsed": self.elapsed_before + time.monotonic() - start,
            "dp_ledger": None if self.dp_ledger is None else self.dp_ledger.state_dict(),
            "secagg_aborted": self.secagg_aborted,
            "contribution": None if self.exp.contribution is None else self.exp.contribution.state_dict(),
            "personal": self.personal_rows,
            "ef21": {str(k): v for k, v in self.estimates.items()}}

    def _restore_state(self, state: dict[str, Any]) -> None:
        """What a pattern adds to :meth:`_checkpoint_state`, read back (none here)."""

    def _restore(self) -> None:
        state = read_checkpoint(self)
        if state is None:
            return
        self.state = ServerState(state["params"], int(state["round"]), dict(state["extra"]))
        if self.dp_ledger is not None and state.get("dp_ledger") is not None:
            self.dp_ledger.load_state_dict(state["dp_ledger"])
        self.secagg_aborted = int(state.get("secagg_aborted", 0))
        if self.personal_rows is not None and state.get("personal") is not None:
            self.personal_rows = state["personal"].clone()
        if self.exp.contribution is not None and state.get("contribution") is not None:
            self.exp.contribution.load_state_dict(state["contribution"])
        self._restore_state(state)
        # clients are not restored: the interrupted round starts once they have joined again
        self.metrics.load_existing(self.state.round)
        log.info("resumed after round %d", self.state.round)


def read_checkpoint(coord) -> dict[str, Any] | None:
    """A coordinator's ``checkpoints/server.pt`` (synchronous or asynchronous), with what both
    restore from it the same way: bytes sent and received, wall seconds so far, the EF21
    estimates. None without one (the metrics start afresh)."""
    path = coord.run_dir / "checkpoints" / "server.pt"
    if not checkpoint_exists(path):
        coord.metrics.load_existing(-1)
        return None
    state = load_checkpoint(path)
    coord.bytes_up, coord.bytes_down = int(state["bytes_up"]), int(state["bytes_down"])
    coord.elapsed_before = float(state["elapsed"])
    coord.estimates = {int(k): v for k, v in (state.get("ef21") or {}).items()}
    return state
