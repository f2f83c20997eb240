"""Per-client state rows of a population, held only for clients that have written one.

SCAFFOLD's control variates, error-feedback residuals or Ditto's personal models are rows
``[P]`` per client. A :class:`ClientStore` keeps the rows of clients that have participated,
at most ``budget_bytes`` of them in memory; past the budget the least recently used rows move
to a memory-mapped file (``spill_dir``) and come back when read. A client never written
reads as ``init``. Reads and writes are exact: a spilled row comes back bit for bit.
"""

from __future__ import annotations

import os
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch


class ClientStore:
    """Rows ``[P]`` by client id: ``get(ids)`` ``[B, P]``, ``set(ids, rows)``.

    Memory holds the rows in blocks of at most ``CHUNK_BYTES`` (growing one block at a time,
    never copying what is held); the spill file is written and read with ``pwrite``/``pread``,
    so spilled rows live in the kernel's page cache, which it may drop, not in this process.
    """

    CHUNK_BYTES = 32 << 20

    def __init__(self, init: torch.Tensor, budget_bytes: float = float("inf"),
                 spill_dir: str | os.PathLike | None = None) -> None:
        self.init = init.reshape(-1).clone()
        self.numel, self.dtype = self.init.numel(), self.init.dtype
        self.row_bytes = max(1, self.numel * self.init.element_size())
        self.capacity = int(min(budget_bytes // self.row_bytes, 1 << 40)) \
            if budget_bytes != float("inf") else 1 << 40
        if self.capacity < 1:
            raise ValueError(f"a state budget of {budget_bytes:.0f} bytes holds no client's row "
                             f"({self.row_bytes} bytes)")
        self.chunk_rows = max(1, self.CHUNK_BYTES // self.row_bytes)
        self.spill_dir = spill_dir
        self.chunks: list[torch.Tensor] = []
        self.slot: OrderedDict[int, int] = OrderedDict()    # id -> memory row, least recent first
        self.free: list[int] = []
        self.disk_slot: dict[int, int] = {}                 # id -> row of the spill file
        self.disk_free: list[int] = []
        self.disk_rows = 0
        self._fd: int | None = None
        self._path: Path | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None

    # --- size ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.slot) + len(self.disk_slot)

    def __contains__(self, i: int) -> bool:
        return int(i) in self.slot or int(i) in self.disk_slot

    @property
    def memory_bytes(self) -> int:
        return sum(c.numel() for c in self.chunks) * self.init.element_size()

    @property
    def disk_bytes(self) -> int:
        return self.disk_rows * self.row_bytes

    def _row(self, s: int) -> torch.Tensor:
        return self.chunks[s // self.chunk_rows][s % self.chunk_rows]

    # --- reads and writes ------------------------------------------------------------------------
    def get(self, ids: np.ndarray) -> torch.Tensor:
        """The rows of ``ids`` ``[B, P]`` (a new tensor)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        out = self.init.expand(len(ids), -1).clone()
        for j, i in enumerate(ids.tolist()):
            s = self.slot.get(i)
            if s is not None:
                self.slot.move_to_end(i)
                out[j] = self._row(s)
            elif i in self.disk_slot:
                raw = os.pread(self._fd, self.row_bytes, self.disk_slot[i] * self.row_bytes)
                out[j] = torch.frombuffer(bytearray(raw), dtype=self.dtype)
        return out

    def set(self, ids: np.ndarray, rows: torch.Tensor) -> None:
        """Write the rows ``[B, P]`` of ``ids`` (distinct)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        rows = rows.detach().reshape(len(ids), self.numel).to(self.dtype)
        if len(np.unique(ids)) != len(ids):
            raise ValueError("ClientStore.set: ids must be distinct")
        for j, i in enumerate(ids.tolist()):
            s = self.slot.get(i)
            if s is None:
                s = self._memory_row()
                self.slot[i] = s
                d = self.disk_slot.pop(i, None)
                if d is not None:
                    self.disk_free.append(d)
            else:
                self.slot.move_to_end(i)
            self._row(s).copy_(rows[j])

    def _memory_row(self) -> int:
        """A free memory row: a freed one, a new one within the budget, or the least recently
        used client's, whose row moves to the spill file."""
        if self.free:
            return self.free.pop()
        used = len(self.slot)
        if used < self.capacity:
            if used >= len(self.chunks) * self.chunk_rows:
                rows = min(self.chunk_rows, self.capacity - used)
                self.chunks.append(torch.empty(rows, self.numel, dtype=self.dtype, device="cpu"))
            return used
        victim, s = self.slot.popitem(last=False)
        self._spill(victim, self._row(s))
        return s

    def _spill(self, i: int, row: torch.Tensor) -> None:
        if self._fd is None:
            if self.spill_dir is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="gossamer-state-")
                folder = Path(self._tmp.name)
            else:
                folder = Path(self.spill_dir)
                folder.mkdir(parents=True, exist_ok=True)
            self._fd, name = tempfile.mkstemp(prefix="client_state-", suffix=".bin", dir=folder)
            self._path = Path(name)
        if self.disk_free:
            d = self.disk_free.pop()
        else:
            d, self.disk_rows = self.disk_rows, self.disk_rows + 1
        os.pwrite(self._fd, row.contiguous().numpy().tobytes(), d * self.row_bytes)
        self.disk_slot[i] = d

    def close(self) -> None:
        """Remove the spill file."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._path is not None:
            self._path.unlink(missing_ok=True)
            self._path = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:       # interpreter shutdown: nothing left to clean safely
            pass

    # --- checkpoints -------------------------------------------------------------------------------
    def ids(self) -> np.ndarray:
        """Every stored client, ascending."""
        return np.array(sorted([*self.slot, *self.disk_slot]), dtype=np.int64)

    def state_dict(self) -> dict[str, Any]:
        ids = self.ids()
        return {"ids": torch.from_numpy(ids), "rows": self.get(ids) if len(ids) else torch.zeros(0, self.numel, device="cpu")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.close()
        self.chunks, self.slot, self.free = [], OrderedDict(), []
        self.disk_slot, self.disk_free, self.disk_rows = {}, [], 0
        ids = np.asarray(state["ids"].numpy() if hasattr(state["ids"], "numpy") else state["ids"])
        for s in range(0, len(ids), 4096):
            self.set(ids[s: s + 4096], state["rows"][s: s + 4096])
