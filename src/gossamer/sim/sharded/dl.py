"""Synchronous DL (D-PSGD, DFedSAM) sharded over ranks (docs/scale.md).

Each rank trains and evaluates the nodes it owns and mixes their rows. Where the ranks share a
machine (``--ranks``, or torchrun on one node) every node's model lives in shared memory,
twice (the mixing step's input and output): each rank multiplies its rows of ``W`` with the
whole input and writes its rows of the output, and a barrier before each step is all the
synchronisation. Across machines a rank holds its own rows and, while it mixes, the rows of
their neighbours on other ranks (its halo): before each mixing step every rank sends each
other rank the own rows that rank's nodes mix with (point to point, nothing else of the
population). Either way each mixed row sums the same terms in the same order as one product
over the whole population (the halo's columns are the held rows sorted by node id), so the
models are bit-identical for any number of ranks. The metrics over all nodes are fixed by
node id, not by rank (:mod:`.rows`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from gossamer.algorithms.dl.dpsgd import mix_into
from gossamer.config import ConfigError
from gossamer.sim.drivers.sync_dl import SyncDLDriver
from gossamer.sim.experiment import Experiment
from gossamer.sim.gathered import MergeStats, gathered_merge
from gossamer.sim.sharded.barrier import barrier
from gossamer.sim.sharded.base import (
    TRANSPORT_ENV,
    Shard,
    gather_rows,
    send_recv,
    shared_if_possible,
    shared_tensor,
)
from gossamer.sim.sharded.rows import ShardedRows
from gossamer.sim.sharded.tree import population_mean
from gossamer.topology import to_torch_sparse
from gossamer.training.evaluator import local_losses


@dataclass(frozen=True)
class Halo:
    """One rank's part of a mixing matrix: it holds ``below`` rows of lower ids than its own
    (from lower ranks), its own, then ``above``; ``mixing`` is its own rows of ``W`` over the
    held rows; rank k sends ``send[k]`` (positions among its own rows) and receives
    ``recv[k]`` rows from k."""

    below: int
    above: int
    mixing: torch.Tensor
    send: tuple[np.ndarray, ...]
    recv: tuple[int, ...]
    local: sp.csr_matrix | None = None     # ``mixing`` as scipy rows (robust merges read it)
    ids: np.ndarray | None = None          # the held rows' node ids, in order


def halo(w: sp.csr_matrix, shard: Shard, dtype: torch.dtype) -> Halo:
    """The halo of ``shard`` under mixing matrix ``w`` (``[N, N]``, row i: what node i mixes),
    its mixing rows on the shard's device."""
    lo, hi, edges = shard.lo, shard.hi, shard.edges
    own = sp.csr_matrix(w[lo:hi])
    own.sort_indices()                      # each row's terms in node-id order, as in one product
    held = np.union1d(own.indices, np.arange(lo, hi))
    below = int(np.searchsorted(held, lo))
    local = sp.csr_matrix((own.data, np.searchsorted(held, own.indices), own.indptr),
                          shape=(hi - lo, len(held)))
    recv = tuple(int(((held >= edges[k]) & (held < edges[k + 1])).sum()) if k != shard.rank else 0
                 for k in range(shard.world))
    send = []
    for k in range(shard.world):
        if k == shard.rank:
            send.append(np.zeros(0, dtype=np.int64))
            continue
        need = np.unique(w[edges[k]:edges[k + 1]].indices)
        send.append((need[(need >= lo) & (need < hi)] - lo).astype(np.int64))
    return Halo(below, len(held) - below - (hi - lo), to_torch_sparse(local, dtype, shard.device), tuple(send),
                recv, local, held)


def _square(plan: Halo) -> sp.csr_matrix:
    """``plan``'s own rows of ``W`` as a square matrix over the held rows whose other rows are
    empty (own node ``i`` is row and column ``below + i - lo``): what :func:`gathered_merge`
    reads for the held rows."""
    own, held = plan.local, plan.local.shape[1]
    indptr = np.concatenate([np.zeros(plan.below, dtype=own.indptr.dtype), own.indptr,
                             np.full(plan.above, own.indptr[-1], dtype=own.indptr.dtype)])
    return sp.csr_matrix((own.data, own.indices, indptr), shape=(held, held))


class ShardedSyncDLDriver(ShardedRows, SyncDLDriver):
    """:class:`SyncDLDriver` over the nodes of one rank (see the module)."""

    def __init__(self, exp: Experiment, shard: Shard) -> None:
        self.shard = shard
        # batch shapes fixed by the population, not by the other nodes of a call: a node then
        # trains bit for bit the same whichever rank trains it
        exp.trainer.batch_width = "population"
        super().__init__(exp)
        self.row_base = shard.lo                    # ``params`` holds the own rows
        self._held: torch.Tensor | None = None     # halo: [below + own + above, P]; params: its own rows
        self._spare_held: torch.Tensor | None = None
        self._plan_for: Any = None
        self.plan: Halo | None = None
        self.shared = self._shared_rows()          # one host: every node's rows [2, N, P], shared
        self._cur = 0                               # which of the two holds the current models
        if self.shared is not None:
            self.shared[0, shard.lo:shard.hi] = self.params
            self.params = self.shared[0, shard.lo:shard.hi]
        self._use_plan(self.graph.mixing)

    def _shared_rows(self) -> torch.Tensor | None:
        """Every node's rows twice ``[2, N, P]``, shared by the ranks of this machine (None:
        each rank holds its own rows and a halo)."""
        return shared_if_possible(self.shard, (2, self.exp.num_nodes, self.params.shape[1]), self.params.dtype)

    def _shared_pair(self, what: str) -> torch.Tensor | None:
        """Every node's rows of another model-sized state (``what``) twice ``[2, N, P]``, in
        shared memory where the models are (None where the ranks send rows instead); one line
        naming the transport when there is no room for them beside the models."""
        if self.shared is None:
            return None
        rows = shared_tensor(self.shard, (2, self.exp.num_nodes, self.params.shape[1]), self.params.dtype)
        if rows is None:
            raise ConfigError(TRANSPORT_ENV, f"/dev/shm has no room for {what} besides the models: "
                              "set it to p2p")
        return rows

    def _halo_rows(self, plan: Halo) -> torch.Tensor:
        """An empty ``[below + own + above, P]`` tensor: the rows mixing under ``plan`` holds
        (the own rows at ``plan.below``)."""
        return torch.empty(plan.below + self.own + plan.above, self.params.shape[1], dtype=self.params.dtype,
                           device=self.params.device)

    def _own_rows(self) -> torch.Tensor:
        return self.params

    def _initial_params(self) -> torch.Tensor:
        init, lo, hi = self.exp.init_params, self.shard.lo, self.shard.hi
        return init.expand(hi - lo, -1).clone() if init.dim() == 1 else init[lo:hi].clone()

    def _use_plan(self, w: sp.csr_matrix) -> None:
        """Hold the rows that mixing with ``w`` needs (a new plan only when ``w`` changed)."""
        if w is self._plan_for:
            return
        if self.shared is not None:                  # every row is at hand: the own rows of W
            self.plan = Halo(0, 0, to_torch_sparse(w[self.shard.lo:self.shard.hi], self.params.dtype,
                                                   self.params.device), (), ())
            self._plan_for = w
            return
        plan = halo(w, self.shard, self.params.dtype)
        if self._held is None or (plan.below, plan.above) != (self.plan.below, self.plan.above):
            held = self._halo_rows(plan)
            held[plan.below: plan.below + self.own] = self.params
            self._held, self._spare_held = held, torch.empty_like(held)
            self.params = held[plan.below: plan.below + self.own]
        self.plan, self._plan_for = plan, w

    # --- one round: SyncDLDriver.run_round, with these steps -------------------------------------
    def _train_round(self, online: np.ndarray, r: int) -> np.ndarray:
        """This rank's nodes train; every rank then has every node's samples, steps and loss."""
        exp, shard = self.exp, self.shard
        lo = shard.lo
        training = self.has_data & online                              # the same on every rank
        train_ids = lo + np.flatnonzero(training[lo:shard.hi])
        mine = torch.zeros(len(train_ids), 3, dtype=torch.float64, device="cpu")   # loss, steps, samples
        result = self._train_rows(train_ids, r, first=lo)
        if result is not None:
            mine[:, 0] = result.loss.double()
            mine[:, 1] = torch.from_numpy(np.asarray(result.steps, dtype=np.float64))
            mine[:, 2] = torch.from_numpy(np.asarray(result.samples, dtype=np.float64))
        everyone = np.flatnonzero(training)
        with self.timer("communicate_s"):
            counts = [int(training[shard.edges[k]:shard.edges[k + 1]].sum()) for k in range(shard.world)]
            stats = gather_rows(shard, mine, counts, f"round {r}'s training")
        samples = np.zeros(exp.num_nodes)
        samples[everyone] = stats[:, 2].numpy()
        if len(everyone):
            self.node_steps += int(stats[:, 1].sum())
            self.train_loss = float(stats[:, 0].float().mean())
        return samples

    def _use_round_graph(self, r: int) -> None:
        super()._use_round_graph(r)
        self._use_plan(self.graph.mixing)

    def _round_plan(self, mixing) -> None:
        """Hold what this round's mixing matrix needs: the graph's own, or (``mixing``, when
        nodes are offline) the one where they keep their model and their neighbours fold their
        weight onto their own."""
        self._use_plan(self.graph.mixing if mixing is None else mixing)

    def _mix(self, mixing) -> None:
        self._round_plan(mixing)
        if self.shared is not None:
            lo, hi = self.shard.lo, self.shard.hi
            for step in range(self.round_gossip_steps):
                # every rank has written its rows of the input, and read the last output
                barrier(self.shard, f"round {self.round + 1}'s mixing step {step + 1}")
                mix_into(self.plan.mixing, self.shared[self._cur], self.shared[1 - self._cur, lo:hi])
                self._cur = 1 - self._cur
            self.params = self.shared[self._cur, lo:hi]
            return
        plan, a = self.plan, self.plan.below
        src, dst = self._held, self._spare_held
        for step in range(self.round_gossip_steps):
            self._fetch_halo(src, step)
            mix_into(plan.mixing, src, dst[a:a + self.own])
            src, dst = dst, src
        self._held, self._spare_held = src, dst
        self.params = src[a:a + self.own]

    def _merge_gathered(self, mixing, online: np.ndarray, r: int) -> None:
        """Robust merges (``algorithm.params.aggregator``): each rank merges its own online
        nodes from the rows they hold, a step's input and output kept apart as in mixing
        (every row in shared memory, else the own rows and their halo); the merges skipped are
        counted over every rank."""
        exp, shard = self.exp, self.shard
        self._round_plan(mixing)
        w = self.graph.mixing if mixing is None else mixing
        lo, hi = shard.lo, shard.hi
        mine = np.flatnonzero(online[lo:hi] & self.honest[lo:hi])     # positions among own rows
        stats, params = MergeStats(), dict(exp.algorithm.aggregator_params)
        scorer = local_losses(exp.trainer)
        adv = exp.adversary
        attack = adv is not None and adv.model_attack      # Byzantine neighbours craft, keyed by receiver
        if self.shared is None:
            square, a = _square(self.plan), self.plan.below
            src, dst = self._held, self._spare_held
        for step in range(self.round_gossip_steps):
            if self.shared is not None:          # every rank has written its rows of the input
                barrier(shard, f"round {r}'s merge step {step + 1}")
                held, matrix, rows, first, ids = self.shared[self._cur], w, lo + mine, 0, None
                out = self.shared[1 - self._cur, lo:hi]
                out.copy_(held[lo:hi])
            else:
                self._fetch_halo(src, step)
                held, matrix, rows, first, ids = src, square, a + mine, lo - a, self.plan.ids
                out = dst[a:a + self.own]
                out.copy_(src[a:a + self.own])
            losses = (lambda cand, at, first=first: scorer(cand, at + first))  # noqa: E731  (node ids)
            merged = gathered_merge(matrix, held, rows, aggregator=self.aggregator, params=params,
                                    losses=losses, stats=stats, ids=ids,
                                    byzantine=adv.byzantine if attack else None,
                                    corrupt=self._crafter(r, step) if attack else None)
            out[torch.from_numpy(mine)] = merged
            if self.shared is not None:
                self._cur = 1 - self._cur
                self.params = self.shared[self._cur, lo:hi]
            else:
                src, dst = dst, src
        if self.shared is None:
            self._held, self._spare_held = src, dst
            self.params = src[a:a + self.own]
        skipped = gather_rows(shard, torch.tensor([[float(stats.skipped)]], dtype=torch.float64, device="cpu"),
                              [1] * shard.world, f"round {r}'s merges")
        self.skipped += int(skipped.sum())

    def _fetch_halo(self, held: torch.Tensor, step: int) -> None:
        """Fill ``held``'s halo rows from their owners (and send them ours)."""
        shard, plan = self.shard, self.plan
        if shard.world == 1:
            return
        own = held[plan.below: plan.below + self.own]
        where = np.concatenate([[0], np.cumsum(plan.recv)])
        at = np.where(np.arange(shard.world) < shard.rank, where[:-1], where[:-1] + self.own)
        sends = [(own[torch.from_numpy(plan.send[k])], k) for k in range(shard.world) if len(plan.send[k])]
        recvs = [(held[at[k]: at[k] + plan.recv[k]], k) for k in range(shard.world) if plan.recv[k]]
        send_recv(shard, sends, recvs, f"round {self.round + 1}'s mixing step {step + 1}")

    def _average(self, members: np.ndarray) -> None:
        # the online members take their exact mean: block sums with the others' rows as zeros
        # (the same blocks on any number of ranks)
        n, lo, hi = self.exp.num_nodes, self.shard.lo, self.shard.hi
        if len(members) == n:
            mean = population_mean(self.shard, self.params, n, "the final merge")
            self.params.copy_(mean.expand_as(self.params))
            return
        own = torch.from_numpy(members[(members >= lo) & (members < hi)] - lo)
        rows = torch.zeros_like(self.params)
        rows[own] = self.params[own]
        mean = population_mean(self.shard, rows, len(members), "the final merge")
        self.params[own] = mean.expand(len(own), -1)

    # --- checkpoints: every node's row, on rank 0, as one process would write them ------------------
    def _all_rows(self) -> torch.Tensor | None:
        """Every node's model ``[N, P]`` on rank 0 (None on the others)."""
        shard = self.shard
        if shard.world == 1:
            return self.params
        if self.shared is not None:                  # every rank done writing, then reading
            during = f"round {self.round}'s checkpoint"
            barrier(shard, during)
            full = self.shared[self._cur].clone() if shard.primary else None
            barrier(shard, during)
            return full
        return self._on_primary(self.params)

    def state_dict(self) -> dict[str, Any]:
        full = self._all_rows()
        state = super().state_dict()
        state["params"] = full
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        lo, hi = self.shard.lo, self.shard.hi
        super().load_state_dict({**state, "params": state["params"][lo:hi]})
        self._held, self._plan_for = None, None          # hold the loaded rows anew
        if self.shared is not None:
            self._cur = 0
            self.shared[0, lo:hi] = self.params
            self.params = self.shared[0, lo:hi]
        self._use_plan(self.graph.mixing)


__all__ = ["Halo", "ShardedSyncDLDriver", "halo"]
