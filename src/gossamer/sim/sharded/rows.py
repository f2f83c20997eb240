"""What every sharded decentralized driver measures over its own nodes' rows (docs/scale.md).

A rank evaluates the nodes it owns; the metrics over all nodes are fixed by node id, not by
rank: accuracies and losses per node, gathered in id order; the average model from block sums
(``sharding.block`` ids) added along the tree of block ids (:mod:`.tree`); the consensus
distance from each node's squared distance to it (float64, summed by numpy in id order). A checkpoint's ``[N, ...]`` states come to rank 0
point to point.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from gossamer.protocols import dl_metrics
from gossamer.sim.sharded.base import Shard, gather_rows, rank_lost
from gossamer.sim.sharded.tree import population_mean

DISTANCE_CHUNK_BYTES = 16 << 20      # float64 rows at a time for the consensus distances


class ShardedRows:
    """A mixin over a :class:`~gossamer.sim.drivers.sync_dl.SyncDLDriver` whose rank owns the
    node ids ``[shard.lo, shard.hi)``; :meth:`_own_rows` is their models ``[own, P]``."""

    shard: Shard
    honest: np.ndarray               # the driver's: which nodes are honest (measured, averaged)
    collective_state = True          # the checkpoint gathers every rank's rows

    @property
    def own(self) -> int:
        return self.shard.hi - self.shard.lo

    def _own_rows(self) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self) -> dict[str, Any]:
        row = self.base_row()
        shard, exp = self.shard, self.exp
        lo, hi = shard.lo, shard.hi
        nodes = self._measured_nodes()
        own = self._own_rows()
        during = f"round {self.round}'s evaluation"
        with self.timer("eval_s"):
            evaluate = exp.evaluator.evaluate
            mine = nodes[(nodes >= lo) & (nodes < hi)]
            measured = torch.zeros(len(mine), 2, dtype=torch.float64, device=own.device)
            if len(mine):                            # all own nodes: the rows as they are
                rows = own if len(mine) == self.own else own[torch.from_numpy(mine - lo)]
                acc, loss = evaluate(rows)
                measured[:, 0], measured[:, 1] = acc.double(), loss.double()
            counts = np.bincount(shard.owner(nodes), minlength=shard.world).tolist()
            honest, n, keep = self._honest(own)
            mean = population_mean(shard, honest, n, during)
            distances = self._squared_distances(own, mean)
            if keep is not None:                     # Byzantine nodes are not measured
                distances[~keep] = 0.0
            every = gather_rows(shard, torch.from_numpy(distances)[:, None], shard.counts, during)
            measured = gather_rows(shard, measured, counts, during)
            acc, loss = measured[:, 0].float(), measured[:, 1].float()
            row.update(dl_metrics.accuracy_row(acc, loss), online=int(self.last_online.sum()),
                       isolated=self.isolated, lost_messages=self.lost, merges_skipped=self.skipped,
                       **dl_metrics.node_bytes_row(self.node_bytes))
            self.node_accuracy = (np.asarray(nodes), acc.cpu().numpy())    # -> nodes.csv
            row["consensus_distance"] = float(every[:, 0].cpu().numpy().sum()) / n
            if exp.cfg.eval.average_model:
                row.update(dl_metrics.average_model_row(evaluate, mean[None]))
        return row

    def _squared_distances(self, own: torch.Tensor, mean: torch.Tensor) -> np.ndarray:
        """Each own node's ``||x_i - mean||^2`` in float64 (exact squares, numpy's pairwise
        sum along the row: the same bits whatever else a rank holds)."""
        rows = max(1, DISTANCE_CHUNK_BYTES // (8 * max(own.shape[1], 1)))
        out = np.empty(self.own)
        for a in range(0, self.own, rows):
            diff = (own[a:a + rows] - mean).double().cpu().numpy()
            out[a:a + rows] = np.square(diff).sum(axis=1)
        return out

    def global_params(self) -> torch.Tensor:
        honest, n, _ = self._honest(self._own_rows())
        return population_mean(self.shard, honest, n, "the final model")

    def _honest(self, own: torch.Tensor) -> tuple[torch.Tensor, int, np.ndarray | None]:
        """What the average model and the consensus distance are over, as in one process: the
        honest nodes (``own`` with the Byzantine rows zeroed, their count, and which own rows
        are honest; ``own``, N and None without attackers)."""
        if self.honest.all():
            return own, self.exp.num_nodes, None
        keep = self.honest[self.shard.lo:self.shard.hi]
        return own * torch.from_numpy(keep).to(own.device, own.dtype)[:, None], int(self.honest.sum()), keep

    def _on_primary(self, own: torch.Tensor) -> torch.Tensor | None:
        """Every node's rows of ``own`` (this rank's rows of a ``[N, ...]`` state) on rank 0,
        sent point to point; None on the other ranks."""
        shard = self.shard
        if shard.world == 1:
            return own
        import torch.distributed as dist

        try:
            if not shard.primary:
                if self.own:
                    dist.send(own.contiguous(), 0)
                return None
            full = torch.empty(self.exp.num_nodes, *own.shape[1:], dtype=own.dtype, device=own.device)
            full[shard.lo:shard.hi] = own
            for k in range(1, shard.world):
                a, b = shard.edges[k], shard.edges[k + 1]
                if b > a:
                    dist.recv(full[a:b], k)
            return full
        except (RuntimeError, dist.DistBackendError) as exc:
            raise rank_lost(shard, exc, f"round {self.round}'s checkpoint") from None


__all__ = ["DISTANCE_CHUNK_BYTES", "ShardedRows"]
