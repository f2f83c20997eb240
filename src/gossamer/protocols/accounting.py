"""Per-client bookkeeping of an FL run: participation, bytes, staleness, idle time.

Shared by the FL drivers; all values are simulated quantities (deterministic, safe for
``metrics.csv`` and checkpoints).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gossamer.population.columns import SparseColumn


class FLAccounting:
    """Counters of one FL run over ``num_nodes`` clients.

    - ``participation`` ``[N]``: completed tasks per client (its upload reached the server,
      whether the server then used or discarded it).
    - ``bytes_up`` / ``bytes_down`` ``[N]``: bytes each client sent / was sent (encoded sizes,
      counted when the transfer happens, lost messages included).
    - ``staleness``: histogram ``{staleness: count}`` of the updates the server accepted;
      ``discarded``: updates dropped for being staler than allowed.
    - ``client_idle_s`` ``[N]``: time a client that finished a task waits to be given the
      next one while it is still available. It starts when the task ends (:meth:`finished`)
      and stops at the first dispatch point where the server either assigns the client
      again (:meth:`assigned`) or finds it unavailable (:meth:`unavailable`); a dispatch
      point is a moment the driver looks for clients to assign. A client re-assigned at the
      moment it finishes adds 0. Time before a client's first task is not counted.
    - ``server_idle_s``: simulated time with no client task in flight (nothing could
      arrive), added by the driver through :meth:`server_idle`.
    """

    def __init__(self, num_nodes: int, sparse: bool = False) -> None:
        self.n, self.sparse = num_nodes, sparse
        if sparse:          # a registered population: only clients that acted cost memory
            self.participation, self.bytes_up = SparseColumn(num_nodes), SparseColumn(num_nodes)
            self.bytes_down = SparseColumn(num_nodes)
            self.client_idle_s = SparseColumn(num_nodes, 0.0, np.float64)
            self.waiting_since = SparseColumn(num_nodes, np.nan, np.float64)
        else:
            self.participation = np.zeros(num_nodes, dtype=np.int64)
            self.bytes_up = np.zeros(num_nodes, dtype=np.int64)
            self.bytes_down = np.zeros(num_nodes, dtype=np.int64)
            self.client_idle_s = np.zeros(num_nodes)
            self.waiting_since = np.full(num_nodes, np.nan)     # nan: not waiting
        self.staleness: dict[int, int] = {}
        self.discarded = 0
        self.server_idle_s = 0.0

    # --- events ------------------------------------------------------------------------------
    def download(self, nodes: np.ndarray, nbytes: int | np.ndarray) -> None:
        _add(self.bytes_down, nodes, np.asarray(nbytes, dtype=np.int64))

    def upload(self, nodes: np.ndarray, nbytes: int | np.ndarray) -> None:
        """Add ``nbytes`` (one size for all, or one per node) to each node's upload count."""
        _add(self.bytes_up, nodes, np.asarray(nbytes, dtype=np.int64))

    def completed(self, nodes: np.ndarray) -> None:
        _add(self.participation, nodes, 1)

    def accepted(self, staleness: np.ndarray | int) -> None:
        for s in np.atleast_1d(np.asarray(staleness, dtype=np.int64)).tolist():
            self.staleness[s] = self.staleness.get(s, 0) + 1

    def discard(self, count: int = 1) -> None:
        self.discarded += int(count)

    def finished(self, nodes: np.ndarray, t: float) -> None:
        """``nodes`` ended a task at ``t``: they wait for the server from now on."""
        self.waiting_since[np.asarray(nodes, dtype=np.int64)] = t

    def assigned(self, nodes: np.ndarray, t: float) -> None:
        """``nodes`` get a task at ``t``: their wait (if any) ends."""
        self._stop(np.asarray(nodes, dtype=np.int64), t)

    def unavailable(self, mask: np.ndarray, t: float) -> None:
        """Bool ``[N]``: clients found unavailable at a dispatch point at ``t`` stop waiting."""
        self._stop(np.flatnonzero(mask & ~np.isnan(self.waiting_since)), t)

    def _stop(self, nodes: np.ndarray, t: float) -> None:
        since = self.waiting_since[nodes]
        waiting = ~np.isnan(since)
        _add(self.client_idle_s, nodes[waiting], t - since[waiting])
        if self.sparse:
            self.waiting_since.discard(nodes)
        else:
            self.waiting_since[nodes] = np.nan

    def server_idle(self, seconds: float) -> None:
        self.server_idle_s += float(seconds)

    # --- reporting ---------------------------------------------------------------------------
    def mean_staleness(self) -> float | None:
        total = sum(self.staleness.values())
        return None if total == 0 else sum(s * c for s, c in self.staleness.items()) / total

    def summary(self) -> dict[str, Any]:
        """JSON-ready values for ``summary.json`` (a registered population's: per participant
        counts and a histogram instead of lists of length N)."""
        if self.sparse:
            return self._sparse_summary()
        both = self.bytes_up + self.bytes_down
        return {
            "participation": self.participation.tolist(),
            "bytes_up_per_client": self.bytes_up.tolist(),
            "bytes_down_per_client": self.bytes_down.tolist(),
            "mean_bytes_per_client": float(both.mean()) if self.n else 0.0,
            "max_bytes_per_client": int(both.max(initial=0)),
            "staleness_histogram": {str(k): v for k, v in sorted(self.staleness.items())},
            "mean_staleness": self.mean_staleness(),
            "discarded_stale": self.discarded,
            "client_idle_s": self.client_idle_s.tolist(),
            "mean_client_idle_s": float(self.client_idle_s.mean()) if self.n else 0.0,
            "server_idle_s": self.server_idle_s,
        }

    def _sparse_summary(self) -> dict[str, Any]:
        ids, part = self.participation.written()
        reached = np.union1d(self.bytes_down.written()[0], ids)       # every client sent a task
        both = self.bytes_up[reached] + self.bytes_down[reached]
        counts, clients = np.unique(part, return_counts=True)
        idle = self.client_idle_s[reached]
        return {
            "registered_clients": self.n,
            "participants": int(len(ids)),
            "clients_reached": int(len(reached)),
            "participation_histogram": {str(c): int(k) for c, k in zip(counts.tolist(), clients.tolist(), strict=True)},
            "mean_bytes_per_client_reached": float(both.mean()) if len(reached) else 0.0,
            "max_bytes_per_client": int(both.max(initial=0)),
            "staleness_histogram": {str(k): v for k, v in sorted(self.staleness.items())},
            "mean_staleness": self.mean_staleness(),
            "discarded_stale": self.discarded,
            "mean_client_idle_s": float(idle.mean()) if len(reached) else 0.0,
            "server_idle_s": self.server_idle_s,
        }

    # --- checkpoints: numpy arrays and plain values --------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        keys = np.array(sorted(self.staleness), dtype=np.int64)
        if self.sparse:
            return {"columns": {name: getattr(self, name).state_dict() for name in _COLUMNS},
                    "staleness_values": keys,
                    "staleness_counts": np.array([self.staleness[int(k)] for k in keys], dtype=np.int64),
                    "discarded": self.discarded, "server_idle_s": self.server_idle_s}
        return {"participation": self.participation.copy(), "bytes_up": self.bytes_up.copy(),
                "bytes_down": self.bytes_down.copy(), "staleness_values": keys,
                "staleness_counts": np.array([self.staleness[int(k)] for k in keys], dtype=np.int64),
                "discarded": self.discarded, "client_idle_s": self.client_idle_s.copy(),
                "waiting_since": self.waiting_since.copy(), "server_idle_s": self.server_idle_s}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        def arr(key: str, dtype: type) -> np.ndarray:
            value = state[key]                           # numpy, or a tensor from a checkpoint
            return np.array(value.numpy() if hasattr(value, "numpy") else value, dtype=dtype)

        self.staleness = {int(k): int(c) for k, c in zip(arr("staleness_values", np.int64),
                                                          arr("staleness_counts", np.int64), strict=True)}
        self.discarded = int(state["discarded"])
        self.server_idle_s = float(state["server_idle_s"])
        if self.sparse:
            for name in _COLUMNS:
                getattr(self, name).load_state_dict(state["columns"][name])
            return
        self.participation, self.bytes_up = arr("participation", np.int64), arr("bytes_up", np.int64)
        self.bytes_down = arr("bytes_down", np.int64)
        self.client_idle_s = arr("client_idle_s", np.float64)
        self.waiting_since = arr("waiting_since", np.float64)


_COLUMNS = ("participation", "bytes_up", "bytes_down", "client_idle_s", "waiting_since")


def _add(column: np.ndarray | SparseColumn, nodes: np.ndarray, values: Any) -> None:
    """``column[nodes] += values``, repeated nodes adding up, dense or sparse."""
    nodes = np.asarray(nodes, dtype=np.int64)
    if isinstance(column, SparseColumn):
        column.add_at(nodes, values)
    else:
        np.add.at(column, nodes, values)
