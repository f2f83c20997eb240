"""Models in flight between gossip nodes, stored copy-on-write.

A sent model is the sender's row at the moment it was read. Copying every sent row into a
buffer costs two population-row passes per message, and in asynchronous gossip most senders
do not change their model before the message is merged. So a message first stays a
*reference* to the sender's row; just before that row changes (merge, local update, reset)
the driver calls :meth:`MessageStore.detach`, which copies it into a reusable slot. The rows
a receiver gets are bit-identical to copying at send time.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch


class MessageStore:
    """In-flight messages by id: a reference to the sender's row, or a copied row in a slot."""

    def __init__(self, numel: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)               # where the rows (and the models) are
        self.rows = torch.empty(0, numel, dtype=dtype, device=self.device)   # slots, reused once consumed
        self.free: list[int] = []
        self.slot: dict[int, int] = {}                   # message -> slot (copied)
        self.sender: dict[int, int] = {}                 # message -> sender (still a reference)
        self.by_sender: dict[int, list[int]] = {}        # sender -> its referencing messages
        self.age: dict[int, float] = {}                  # message -> the model's age when sent

    def __len__(self) -> int:
        return len(self.age)

    def put(self, msgs: list[int], senders: list[int], ages: list[float]) -> None:
        """Messages holding the senders' current rows (as references)."""
        for m, s, a in zip(msgs, senders, ages, strict=True):
            self.sender[m] = s
            self.by_sender.setdefault(s, []).append(m)
            self.age[m] = a

    def put_rows(self, msgs: list[int], rows: torch.Tensor, ages: list[float]) -> None:
        """Messages holding given rows ``[B, P]`` (e.g. crafted by an attacker), copied."""
        slots = self._slots(len(msgs))
        self.rows.index_copy_(0, self._ids(slots), rows)
        for m, s, a in zip(msgs, slots, ages, strict=True):
            self.slot[m] = s
            self.age[m] = a

    def detach(self, nodes: Iterable[int], params: torch.Tensor) -> None:
        """Copy the messages that reference the rows of ``nodes``, which are about to change."""
        hit = [n for n in nodes if n in self.by_sender]
        if not hit:
            return
        msgs, senders = [], []
        for n in hit:
            for m in self.by_sender.pop(n):
                msgs.append(m)
                senders.append(n)
                del self.sender[m]
        slots = self._slots(len(msgs))
        self.rows.index_copy_(0, self._ids(slots), params.index_select(0, self._ids(senders)))
        self.slot.update(zip(msgs, slots, strict=True))

    def take(self, msgs: list[int], params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """Remove messages and return (rows ``[B, P]``, ages ``[B]``, order): row ``j`` is message
        ``msgs[order[j]]`` (references first, then copies: each part is one gather)."""
        refs = [j for j, m in enumerate(msgs) if m in self.sender]
        copies = [j for j, m in enumerate(msgs) if m not in self.sender]
        order = np.array(refs + copies, dtype=np.int64)
        out = torch.empty(len(msgs), params.shape[1], dtype=params.dtype, device=params.device)
        if refs:
            senders = [self._unref(msgs[j]) for j in refs]
            torch.index_select(params, 0, self._ids(senders), out=out[:len(refs)])
        if copies:
            slots = [self.slot.pop(msgs[j]) for j in copies]
            torch.index_select(self.rows, 0, self._ids(slots), out=out[len(refs):])
            self.free.extend(slots)
        ages = torch.tensor([self.age.pop(msgs[j]) for j in order.tolist()], dtype=torch.float32,
                            device=self.device)
        return out, ages, order

    def discard(self, msg: int) -> None:
        """Forget a message that will never be merged (its receiver was offline)."""
        if msg in self.sender:
            self._unref(msg)
        else:
            self.free.append(self.slot.pop(msg))
        del self.age[msg]

    def state(self, params: torch.Tensor) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """(ids, rows ``[M, P]``, ages ``[M]``) of every message in flight, in id order."""
        ids = sorted(self.age)
        rows = torch.empty(len(ids), params.shape[1], dtype=params.dtype, device=params.device)
        for j, m in enumerate(ids):
            rows[j] = params[self.sender[m]] if m in self.sender else self.rows[self.slot[m]]
        return ids, rows, torch.tensor([self.age[m] for m in ids], dtype=torch.float64, device="cpu")

    def load(self, ids: list[int], rows: torch.Tensor, ages: list[float]) -> None:
        """Restore :meth:`state` (every message as a copy)."""
        numel = self.rows.shape[1]
        self.rows, self.free = torch.empty(0, numel, dtype=self.rows.dtype, device=self.device), []
        self.slot, self.sender, self.by_sender, self.age = {}, {}, {}, {}
        if ids:
            self.put_rows(ids, rows.reshape(len(ids), numel).to(self.device, self.rows.dtype), ages)

    def _ids(self, ids: list[int]) -> torch.Tensor:
        return torch.tensor(ids, dtype=torch.int64, device=self.device)

    def _unref(self, msg: int) -> int:
        sender = self.sender.pop(msg)
        refs = self.by_sender[sender]
        refs.remove(msg)
        if not refs:
            del self.by_sender[sender]
        return sender

    def _slots(self, k: int) -> list[int]:
        while len(self.free) < k:                        # grow: double the buffer
            used = self.rows.shape[0]
            size = max(64, 2 * used, used + k)
            rows = torch.empty(size, self.rows.shape[1], dtype=self.rows.dtype, device=self.device)
            rows[:used] = self.rows
            self.rows = rows
            self.free.extend(range(size - 1, used - 1, -1))
        return [self.free.pop() for _ in range(k)]
