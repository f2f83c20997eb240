"""Per-client columns over a registered population that store only the clients written."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


class SparseColumn:
    """A length-``n`` array of ``dtype`` that is ``default`` wherever nothing was written.

    Reads and writes take one id or an int array of ids, like a numpy array's; memory grows
    with the number of distinct ids written, never with ``n``.
    """

    def __init__(self, n: int, default: Any = 0, dtype: Any = np.int64) -> None:
        self.n, self.dtype = int(n), np.dtype(dtype)
        self.default = self.dtype.type(default)
        self._values: dict[int, Any] = {}

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, ids: Any) -> Any:
        get, d = self._values.get, self.default
        if np.ndim(ids) == 0:
            return self.dtype.type(get(int(ids), d))
        ids = np.asarray(ids, dtype=np.int64)
        return np.fromiter((get(i, d) for i in ids.tolist()), dtype=self.dtype, count=ids.size)

    def __setitem__(self, ids: Any, values: Any) -> None:
        ids = np.atleast_1d(np.asarray(ids, dtype=np.int64))
        values = np.broadcast_to(np.asarray(values, dtype=self.dtype), ids.shape)
        self._values.update(zip(ids.tolist(), values.tolist(), strict=True))

    def add_at(self, ids: Any, values: Any) -> None:
        """``column[ids] += values`` with repeated ids adding up (``np.add.at``)."""
        ids = np.atleast_1d(np.asarray(ids, dtype=np.int64))
        values = np.broadcast_to(np.asarray(values, dtype=self.dtype), ids.shape)
        get, d = self._values.get, self.default
        for i, v in zip(ids.tolist(), values.tolist(), strict=True):
            self._values[i] = get(i, d) + v

    def discard(self, ids: Any) -> None:
        """Forget ``ids``: they read as ``default`` again and cost nothing."""
        for i in np.atleast_1d(np.asarray(ids, dtype=np.int64)).tolist():
            self._values.pop(i, None)

    def written(self) -> tuple[np.ndarray, np.ndarray]:
        """The ids written, ascending, and their values."""
        ids = np.array(sorted(self._values), dtype=np.int64)
        return ids, self[ids]

    def __contains__(self, i: int) -> bool:
        return int(i) in self._values

    def state_dict(self) -> dict[str, Any]:
        """Tensors (checkpoints load weights-only)."""
        ids, values = self.written()
        return {"ids": torch.from_numpy(ids), "values": torch.from_numpy(values)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ids = np.asarray(state["ids"].numpy() if hasattr(state["ids"], "numpy") else state["ids"])
        values = state["values"]
        values = np.asarray(values.numpy() if hasattr(values, "numpy") else values, dtype=self.dtype)
        self._values = dict(zip(ids.tolist(), values.tolist(), strict=True))


class Everyone:
    """A length-``n`` column that is ``value`` for every client (e.g. "has data")."""

    def __init__(self, n: int, value: Any = True, dtype: Any = bool) -> None:
        self.n, self.value, self.dtype = int(n), value, np.dtype(dtype)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, ids: Any) -> Any:
        if np.ndim(ids) == 0:
            return self.dtype.type(self.value)
        return np.full(np.shape(ids), self.value, dtype=self.dtype)
