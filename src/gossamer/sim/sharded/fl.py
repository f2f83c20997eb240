"""Synchronous FL sharded over ranks: clients train on the rank that owns them, and the
aggregate is summed in an order fixed by node id (docs/scale.md).

Each block's weighted sum (``sharding.block`` ids, 64 by default) is formed by the rank that
owns the block: a matrix product over its clients' trained parameters in id order, taken from
the trainer's parameter-major workspace (``mean_groups``); a model too large for a block's
clients in one pass sums them in groups of a pass, added in id order. The round's blocks
(those holding a selected client) are added along the binary tree of block ids
(:mod:`.tree`): on one machine every rank reads every block from shared memory and adds them
itself; across machines each rank sends at most one row a level of the tree point to point,
and the total is broadcast (instead of every block reaching every rank).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from gossamer.algorithms.fl.payload import Payload
from gossamer.sim.drivers.sync_fl import SyncFLDriver
from gossamer.sim.drivers.sync_fl_personal import PersonalRounds
from gossamer.sim.experiment import Experiment
from gossamer.sim.sharded.barrier import barrier
from gossamer.sim.sharded.base import (
    Shard,
    gather,
    gather_rows,
    gather_uneven,
    shared_if_possible,
)
from gossamer.sim.sharded.owned import OwnedTraining
from gossamer.sim.sharded.tree import tree_reduce, tree_sum
from gossamer.training.trainer import TrainResult


class ShardedSyncFLDriver(SyncFLDriver):
    """:class:`SyncFLDriver` whose clients train on the rank that owns them (see the module)."""

    def __init__(self, exp: Experiment, shard: Shard) -> None:
        # batch shapes fixed by the population, not by the other clients of a call: a client
        # then trains bit for bit the same whichever rank (and cohort) trains it
        exp.trainer.batch_width = "population"
        super().__init__(exp)
        self.shard = shard
        # FED-PUB's server also reads each trained model (its embedding): it travels beside the upload
        self._with_trained = self.algorithm.uses_embeddings
        width = (self.algorithm.upload_vectors + int(self._with_trained)) * exp.spec.numel
        self.owned = OwnedTraining(shard, width, exp.init_params.dtype)
        self.personal_owned = OwnedTraining(shard, exp.spec.numel, exp.init_params.dtype)
        self.scores_here = shard.primary    # contribution scores change nothing else: rank 0's
        self._shared: torch.Tensor | None = None     # [2, world, L]: each rank's sends, two slots
        self._transport = "gather" if shard.world == 1 else "auto"
        self._exchanges = 0

    def _exchange(self, send: torch.Tensor, r: int) -> list[torch.Tensor]:
        """Every rank's ``send`` (equal sizes), in rank order: through shared memory where the
        ranks share this machine (a barrier each; two slots taken in turn, so a rank never writes
        a slot another may still read), else one ``all_gather``."""
        shard, during = self.shard, f"round {r}'s aggregate"
        if self._ready(len(send), send.dtype) == "gather":
            return gather(shard, send, during)
        slot = self._shared[self._exchanges % 2]
        self._exchanges += 1
        slot[shard.rank, : len(send)] = send
        barrier(shard, during)
        return [slot[k, : len(send)] for k in range(shard.world)]

    def _ready(self, length: int, dtype: torch.dtype) -> str:
        """The transport of an exchange of ``length`` values a rank: ``shared`` memory (made or
        grown here) or ``gather``. Every rank sees the same sizes, so all take this step together."""
        if self._transport == "auto" or (self._shared is not None and self._shared.shape[2] < length):
            self._shared = shared_if_possible(self.shard, (2, self.shard.world, 2 * length), dtype)
            self._transport = "gather" if self._shared is None else "shared"
        return self._transport

    @property
    def collective_state(self) -> bool:
        """A checkpoint gathers every rank's client states (SCAFFOLD's c_i) on rank 0."""
        return self.client_state is not None and self.shard.world > 1

    def _train_and_aggregate(self, r: int, trained: np.ndarray, delivered: np.ndarray) -> None:
        if not self._uploads_are_models(delivered):      # the general path, its training split
            super()._train_and_aggregate(r, trained, delivered)
            return
        self._mean_round(r, trained)

    def _train_clients(self, r: int, trained: np.ndarray, payload: Payload, start: torch.Tensor
                       ) -> tuple[torch.Tensor, TrainResult, torch.Tensor]:
        """Each rank trains its clients (and keeps their states); every rank gets every upload,
        in the round's order, and runs the server's side alike."""
        def train(mine: np.ndarray):
            uploads, result, _ = SyncFLDriver._train_clients(self, r, trained[mine], payload, start)
            if self._with_trained:
                uploads = torch.cat([uploads, result.params.to(uploads.dtype)], dim=1)
            return uploads, result

        rows, samples, steps, loss = self.owned(trained, train, f"round {r}'s uploads")
        params = None
        if self._with_trained:
            width = self.algorithm.upload_vectors * self.exp.spec.numel
            rows, params = rows[:, :width], rows[:, width:]
        algo, idx = self.algorithm, torch.from_numpy(trained)
        if algo.local_entries:                 # FedBN: every client keeps its trained model (its upload)
            self.personal[idx] = rows[:, : self.exp.spec.numel]
        starts = start.expand(len(trained), -1)
        if self.personal is not None and algo.server_personalizes:    # FedCAC: what each started from
            starts = algo.train_start(self.personal[idx])
        return rows, TrainResult(params, samples, steps, loss), starts

    def _anchor_uploads(self, r: int, trained: np.ndarray, anchors: np.ndarray, payload: Payload
                        ) -> tuple[torch.Tensor, np.ndarray, torch.Tensor]:
        """FedAMD: each rank computes its anchors' full-shard gradients and trains its miners;
        every rank gets every upload in the round's order (then attacks and aggregates alike)."""
        def train(mine: np.ndarray):
            ups, steps, loss = SyncFLDriver._anchor_uploads(self, r, trained[mine], anchors[mine], payload)
            return ups, TrainResult(None, np.zeros(len(mine)), steps, loss)

        uploads, _, steps, loss = self.owned(trained, train, f"round {r}'s uploads")
        return uploads, steps, loss

    def _test_scores(self, models: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each rank scores an even range of the test batches; every rank adds every batch's
        scores in batch order, as one process does (the same bits)."""
        evaluator, shard = self.exp.evaluator, self.shard
        batches = evaluator.num_batches
        if (shard.world > 1 and batches < 2 and len(models) == 1 and not shard.primary
                and self.exp.cfg.stop.target_accuracy is None):
            # one test batch, which is not split: rank 0 writes the metrics, and no rank decides
            # anything from the score (no stop at a target accuracy), so the others skip it
            nothing = torch.full((1,), float("nan"), device=models.device)
            return nothing, nothing
        if shard.world == 1 or batches < 2 or len(models) != 1:
            return evaluator.evaluate(models)
        cuts = [batches * k // shard.world for k in range(shard.world + 1)]
        correct, loss = evaluator.batch_scores(models, range(cuts[shard.rank], cuts[shard.rank + 1]))
        mine = torch.stack([correct[0].double(), loss[0]], dim=1)      # [batches here, 2]: exact in float64
        every = gather_rows(shard, mine, [b - a for a, b in zip(cuts[:-1], cuts[1:], strict=True)],
                            f"round {self.round}'s evaluation")
        return evaluator.totals(every[:, 0].float()[None], every[:, 1][None])

    def _personal_accuracy(self, nodes: np.ndarray) -> np.ndarray:
        """Each rank measures its own clients; every rank gets every accuracy, in id order."""
        shard = self.shard
        if shard.world == 1:
            return PersonalRounds._personal_accuracy(self, nodes)
        mine = nodes[(nodes >= shard.lo) & (nodes < shard.hi)]
        own = PersonalRounds._personal_accuracy(self, mine) if len(mine) else np.zeros(0, dtype=np.float32)
        counts = np.bincount(shard.owner(nodes), minlength=shard.world).tolist()
        every = gather_rows(shard, torch.from_numpy(own.astype(np.float64))[:, None], counts,
                            f"round {self.round}'s personal evaluation")
        return every[:, 0].numpy().astype(own.dtype)

    def _personal_train(self, r: int, clients: np.ndarray, received: torch.Tensor) -> TrainResult:
        """Each rank takes its own clients' personal steps; every rank gets every row (each
        holds every client's personal model, so the server's side runs alike everywhere)."""
        def train(mine: np.ndarray):
            result = PersonalRounds._personal_train(self, r, clients[mine], received)
            return result.params, result

        rows, samples, steps, loss = self.personal_owned(clients, train, f"round {r}'s personal steps")
        return TrainResult(rows, samples, steps, loss)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.collective_state:           # every rank's client states, by id, on rank 0
            shard, during = self.shard, f"round {self.round}'s checkpoint"
            own = state["client_state"]
            ids, rows = gather_uneven(shard, [own["ids"].to(torch.int64), own["rows"]], during)
            order = torch.argsort(ids)
            state["client_state"] = {"ids": ids[order], "rows": rows[order]}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("client_state")
        if isinstance(saved, dict) and self.shard.world > 1:    # this rank's clients' states
            ids = torch.as_tensor(saved["ids"])
            keep = (ids >= self.shard.lo) & (ids < self.shard.hi)
            state = {**state, "client_state": {"ids": ids[keep], "rows": saved["rows"][keep]}}
        super().load_state_dict(state)

    def summary(self) -> dict[str, Any]:
        out = super().summary()
        if "client_state" in out and self.shard.world > 1:     # rank 0 writes it: its own store
            out["client_state"] = {**out["client_state"], "of_rank": 0, "ranks": self.shard.world}
        return out

    def _mean_round(self, r: int, trained: np.ndarray) -> None:
        """A round whose aggregate is the uploads' weighted mean: each rank's block sums."""
        exp, algo, shard = self.exp, self.algorithm, self.shard
        payload = algo.broadcast(self.state)
        start = payload.model
        with self.timer("train_s"):
            if np.any(np.diff(trained) <= 0):
                raise RuntimeError("the sharded simulator needs each round's clients sorted by id")
            weights = algo.mean_weights(exp.trainer.sizes[trained], start.dtype, start.device)   # [K], every rank
            mine = (trained >= shard.lo) & (trained < shard.hi)
            own = trained[mine]
            # the blocks holding this round's clients (the same on every rank), one row each,
            # and which rank owns each block and each client
            block = shard.block
            active = np.unique(trained // block)
            block_rank, client_rank = shard.owner(active * block), shard.owner(trained)
            width = max(int(np.bincount(block_rank, minlength=shard.world).max()), 1)
            count = max(int(np.bincount(client_rank, minlength=shard.world).max()), 1)
            # what this rank sends: its blocks' sums, then its clients' losses and steps
            # (float32 losses, and step counts below 2^24, are exact in the model's dtype)
            numel = exp.spec.numel
            send = torch.zeros(width * numel + 2 * count, dtype=start.dtype, device=start.device)
            mine_blocks = send[: width * numel].view(width, numel)
            mine_stats = send[width * numel:].view(2, count)
            where = np.flatnonzero(mine)                 # own clients' positions in the round
            w = weights[torch.from_numpy(where)]
            block_of = own // block
            first_block = int(np.searchsorted(active, shard.lo // block))
            cuts = np.flatnonzero(np.diff(block_of)) + 1     # own clients, grouped by block
            starts = np.concatenate([[0], cuts]).astype(np.int64)
            per_pass = exp.trainer.nodes_per_pass
            # a block with more clients than a pass holds: groups of per_pass in id order, whose
            # sums are added in that order (fixed by the block and the model, not by the rank)
            bounds = np.unique(np.concatenate([
                np.arange(a, b, per_pass) for a, b in zip(starts, np.append(starts[1:], len(own)), strict=True)]
                + [[len(own)]])).astype(np.int64)
            block_starts = set(starts.tolist())
            g = 0
            while len(own) and g < len(bounds) - 1:      # whole blocks per call, one pass each
                h = g + 1
                while h < len(bounds) - 1 and bounds[h + 1] - bounds[g] <= per_pass:
                    h += 1
                a, b = int(bounds[g]), int(bounds[h])
                result = exp.trainer.train(start.expand(b - a, -1), own[a:b], r,
                                           objective=algo.local_objective(payload, None),
                                           mean_weights=w[a:b], mean_groups=bounds[g:h + 1] - a)
                rows = np.searchsorted(active, block_of[bounds[g:h]]) - first_block
                for j, (row, at) in enumerate(zip(rows.tolist(), bounds[g:h].tolist(), strict=True)):
                    if at in block_starts:               # a block's first group
                        mine_blocks[row] = result.mean[j]
                    else:
                        mine_blocks[row] += result.mean[j]
                mine_stats[0, a:b] = result.loss.to(start.dtype)
                mine_stats[1, a:b] = torch.from_numpy(result.steps).to(start.dtype)
                g = h
        with self.timer("communicate_s"):
            stats = torch.empty(2, len(trained), dtype=start.dtype, device=start.device)
            if shard.world > 1 and self._ready(len(send), start.dtype) == "gather":
                # across machines: the losses and steps gathered, the blocks added along the tree
                during = f"round {r}'s aggregate"
                received = gather(shard, send[width * numel:], during)
                own_blocks = int(np.sum(block_rank == shard.rank))
                mean = tree_reduce(shard, mine_blocks[:own_blocks], active, block_rank, during)
            else:                  # every rank's blocks here (shared memory, or one rank)
                received = self._exchange(send, r)
                partial = torch.empty(len(active), numel, dtype=start.dtype, device=start.device)
                for k, got in enumerate(received):
                    blocks = np.flatnonzero(block_rank == k)
                    partial[torch.from_numpy(blocks)] = got[: width * numel].view(width, numel)[: len(blocks)]
                received = [got[width * numel:] for got in received]
                mean = tree_sum(partial, active)
            for k, got in enumerate(received):
                clients = np.flatnonzero(client_rank == k)
                stats[:, torch.from_numpy(clients)] = got.view(2, count)[:, : len(clients)]
            self.state = algo.aggregate_mean(self.state, mean)
        self.train_loss = float(stats[0].float().mean())
        self.node_steps += int(stats[1].double().sum())
