"""Sample-level DP accounting over ranks: each rank's trainer records its own nodes' DP-SGD
steps; epsilon and the checkpoint come from every rank's steps summed (docs/scale.md)."""

from __future__ import annotations

from typing import Any

import torch

from gossamer.privacy import DPLedger
from gossamer.sim.sharded.base import Shard, rank_lost


class RankSummedLedger:
    """A rank's :class:`~gossamer.privacy.DPLedger` (its own nodes' steps) seen whole. Its
    :meth:`epsilon` and :meth:`state_dict` are collectives: every rank builds each metrics row
    and (``collective_state``) each checkpoint together. A loaded checkpoint (every node's
    steps, from any rank count) keeps this rank's own nodes' steps."""

    def __init__(self, local: DPLedger, shard: Shard) -> None:
        self.local, self.shard = local, shard

    def _whole(self) -> DPLedger:
        import torch.distributed as dist

        steps = torch.from_numpy(self.local.steps.copy())
        try:
            dist.all_reduce(steps)
        except (RuntimeError, dist.DistBackendError) as exc:
            raise rank_lost(self.shard, exc, "the privacy accounting") from None
        return self.local.with_steps(steps.numpy())

    def epsilon(self) -> float:
        """Rank 0's row is the one written; the others take part in the sum only (the
        accountant costs ~0.17 s per sampling rate the first time)."""
        whole = self._whole()
        return whole.epsilon() if self.shard.primary else float("nan")

    def state_dict(self) -> dict[str, Any]:
        return self._whole().state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.local.load_state_dict(state)
        self.local.steps[: self.shard.lo] = 0
        self.local.steps[self.shard.hi:] = 0


__all__ = ["RankSummedLedger"]
