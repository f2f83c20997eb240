"""CHOCO-SGD sharded over ranks (docs/scale.md): :class:`ShardedSyncDLDriver`'s rounds with
compressed gossip steps, as :class:`~gossamer.sim.drivers.choco.ChocoDriver` runs them in
one process.

Each rank compresses its own nodes' ``x_i - x̂_i`` (the compressor's randomness is keyed per
node, so a row compresses to the same bytes whichever rank holds it), moves their public
copies ``x̂_i``, and takes the consensus step from every neighbour's ``x̂_j``: where the
ranks share a machine the copies live in shared memory twice (a step writes the other one,
then a barrier), else each step sends the own copies the other ranks' nodes mix with, point
to point (the models' halo plan). Each mixed row sums the same terms in the same order as one
product, so the run is bit-identical for any number of ranks. The message sizes of a round
are gathered once for the byte accounting; checkpoints gather every node's ``x̂`` on rank 0.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from gossamer import wire
from gossamer.algorithms.dl.dpsgd import mix_into
from gossamer.config import ConfigError
from gossamer.sim.drivers.choco import ChocoDriver, _refuse_unsupported
from gossamer.sim.experiment import Experiment
from gossamer.sim.sharded.barrier import barrier
from gossamer.sim.sharded.base import Shard, gather_rows
from gossamer.sim.sharded.dl import ShardedSyncDLDriver


class ShardedChocoDriver(ShardedSyncDLDriver):
    """CHOCO-SGD over the nodes of one rank (see the module)."""

    def __init__(self, exp: Experiment, shard: Shard) -> None:
        from gossamer.compression import build_compressor

        _refuse_unsupported(exp)
        super().__init__(exp, shard)
        algo, n = exp.algorithm, exp.num_nodes
        try:
            self.compressor = build_compressor(algo.compressor, algo.compressor_params, spec=exp.spec)
        except ValueError as exc:
            raise ConfigError("algorithm.params.compressor_params", str(exc).splitlines()[0]) from None
        self.out_deg = np.bincount(self.graph.src, minlength=n)
        self._sizes: list[np.ndarray] = []
        self._ids = np.arange(shard.lo, shard.hi, dtype=np.int64)
        self.public = algo.init_public(self.params)           # own rows of x̂
        self._copies = self._shared_pair("the public copies")   # one host: every node's x̂, twice
        self._pcur = 0
        if self._copies is not None:
            self._copies[0, shard.lo:shard.hi] = self.public
            self.public = self._copies[0, shard.lo:shard.hi]

    def _mix(self, mixing) -> None:
        assert mixing is None, "CHOCO runs on the topology's own mixing matrix"
        algo, n, r = self.exp.algorithm, self.exp.num_nodes, self.round + 1
        lo, hi, a = self.shard.lo, self.shard.hi, self.plan.below
        mixed = torch.empty_like(self.params)
        held = None if self._copies is not None else self._halo_rows(self.plan)
        sizes = np.zeros((self.own, self.round_gossip_steps), dtype=np.int64)
        for step in range(self.round_gossip_steps):
            enc = self.compressor.compress(self.params - self.public, seed=self.exp.cfg.seed,
                                           keys=algo.keys(n, r, step, nodes=self._ids))
            sizes[:, step] = np.asarray(enc.nbytes, dtype=np.int64)
            q = self.compressor.decompress(enc).to(self.public.dtype)
            if held is None:                     # the other copy: others may still read this one
                new = 1 - self._pcur
                torch.add(self.public, q, out=self._copies[new, lo:hi])
                self._pcur, self.public = new, self._copies[new, lo:hi]
                barrier(self.shard, f"round {r}'s gossip step {step + 1}")
                mix_into(self.plan.mixing, self._copies[new], mixed)
            else:
                self.public.add_(q)
                held[a:a + self.own] = self.public
                self._fetch_halo(held, step)
                mix_into(self.plan.mixing, held, mixed)
            mixed.sub_(self.public)              # sum_j W_ij (x̂_j - x̂_i), as in one process
            self.params.add_(mixed, alpha=algo.gamma)
        every = gather_rows(self.shard, torch.from_numpy(sizes), self.shard.counts, f"round {r}'s message sizes")
        self._sizes = [wire.HEADER_BYTES + every[:, s].numpy() for s in range(self.round_gossip_steps)]

    _account = ChocoDriver._account            # the round's bytes and length from every size

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["public"] = self._on_primary(self.public)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        lo, hi = self.shard.lo, self.shard.hi
        public = state["public"][lo:hi].to(self.device, copy=True)
        if self._copies is None:
            self.public = public
            return
        self._pcur = 0
        self._copies[0, lo:hi] = public
        self.public = self._copies[0, lo:hi]


__all__ = ["ShardedChocoDriver"]
