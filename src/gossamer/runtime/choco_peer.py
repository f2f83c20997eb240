"""A CHOCO-SGD peer: the D-PSGD peer whose gossip messages are compressed model differences.

It executes the ``choco`` pattern (:class:`~gossamer.algorithms.dl.choco.Choco`, Koloskova et
al. 2019) for one node. The peer keeps its model ``x_i``, its public copy ``x̂_i`` and a copy
``x̂_j`` of every neighbour's. A gossip step compresses ``x_i - x̂_i`` with the step's key
(``Choco.keys``: the simulator's per-row randomness, so a peer produces the simulator's bytes),
pushes the compressor's exact payload (``to_bytes``) to its neighbours, adds it to ``x̂_i``,
adds each neighbour's decoded payload (``from_bytes``, which validates it) to ``x̂_j``, and
takes the consensus step ``x_i += gamma (sum_j W_ij x̂_j - x̂_i)`` with the D-PSGD peer's mixing
row, so the run equals the simulator's round by round. The copies are checkpointed.

The copies assume every message arrives, as the simulator does (it refuses faults): a
neighbour's missing message is mixed as D-PSGD mixes it (its weight folded onto this node's
own copy) and leaves that neighbour's copy behind the others' copies of it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from gossamer.config import ConfigError, ExperimentConfig
from gossamer.runtime.codec import WireError, read_counted_model
from gossamer.runtime.dl_peer import Peer


class ChocoPeer(Peer):
    """A peer of the ``choco`` pattern (one node; see the module)."""

    pattern = "choco"

    @classmethod
    def check_config(cls, cfg: ExperimentConfig) -> Any:
        from gossamer.topology import DYNAMIC_TOPOLOGIES

        algo = super().check_config(cfg)

        if cfg.topology.name in DYNAMIC_TOPOLOGIES or cfg.topology.resample != "never":
            raise ConfigError("topology", "CHOCO-SGD needs a static topology: a new neighbour holds "
                              "no copy of x̂")
        if cfg.model.init == "independent" and algo.public_init == "model":
            raise ConfigError("algorithm.params.public_init", "with model.init independent no node "
                              "knows its neighbours' initial models: set public_init: zero")
        if algo.final_merge:
            raise ConfigError("algorithm.params.final_merge", "CHOCO-SGD peers have no final merge "
                              "yet; use gossamer run")
        return algo

    def _init_state(self) -> None:
        from gossamer.compression import build_compressor

        algo = self.algorithm
        try:
            self.compressor = build_compressor(algo.compressor, algo.compressor_params, spec=self.exp.spec)
        except ValueError as exc:
            raise ConfigError("algorithm.params.compressor_params", str(exc).splitlines()[0]) from None
        start = algo.init_public(self.params)                      # the shared start, or zeros
        self.public = {j: start[0].clone() for j in [self.node, *self.neighbors]}

    def _state(self) -> dict[str, Any]:
        ids = sorted(self.public)
        return {"public_ids": torch.tensor(ids, dtype=torch.int64),
                "public": torch.stack([self.public[j] for j in ids])}

    def _load_state(self, state: dict[str, Any]) -> None:
        self.public = {int(j): row.clone() for j, row in zip(state["public_ids"].tolist(), state["public"],
                                                             strict=True)}

    def _key(self, node: int, round_: int, step: int) -> int:
        """The randomness key of ``node``'s message of gossip ``step`` of ``round_``."""
        return int(self.algorithm.keys(self.exp.num_nodes, round_, step, nodes=[node])[0])

    def _accept(self, chunks) -> tuple[Any, torch.Tensor, int]:
        """A neighbour's compressed difference, decoded (``from_bytes`` validates its sizes)."""
        numel = self.exp.spec.numel
        meta, data, size = read_counted_model(chunks, expected_numel=None, run_id=self.cfg.runtime.run_id,
                                              limits=self.limits, dtype=torch.uint8)
        sender = int(meta.sender)
        if sender not in self.neighbors or sender == self.node:
            raise WireError(f"{sender} is not a neighbour")
        if data.dim() != 1 or data.numel() > 8 * numel + 4096:
            raise WireError(f"a compressed message of shape {list(data.shape)} is larger than the model")
        if int(meta.meta) >= 1 << 10:
            raise WireError(f"gossip step {int(meta.meta)} is out of range")
        try:
            q = self.compressor.from_bytes(data.numpy().tobytes(), numel, seed=self.cfg.seed,
                                           key=self._key(sender, int(meta.round), int(meta.meta)))
        except ValueError as exc:
            raise WireError(str(exc).splitlines()[0]) from None
        if not bool(torch.isfinite(q).all()):
            raise WireError("a decoded difference is not finite")
        return meta, q, size

    def _round(self, stubs: dict[int, Any], r: int) -> None:
        """Round ``r``: train on the own shard, then the round's compressed gossip steps."""
        algo, own = self.algorithm, self.node
        if self.exp.trainer.sizes[own] > 0:
            self.exp.trainer.train(self.params, np.array([own]), r, inplace=True)
        for step in range(algo.gossip_steps_at(r, self.cfg.stop.rounds)):
            key = np.array([self._key(own, r, step)])
            enc = self.compressor.compress(self.params - self.public[own], seed=self.cfg.seed, keys=key)
            data = self.compressor.to_bytes(enc, 0)
            self._send(stubs, r, step, torch.frombuffer(bytearray(data), dtype=torch.uint8))
            self.public[own] = self.public[own] + self.compressor.decompress(enc)[0].to(self.params.dtype)
            weights, ids, received = self._gather_ids(r, step)
            for j, q in zip(ids, received, strict=True):
                self.public[j] = self.public[j] + q.reshape(-1).to(self.params.dtype)
            copies = torch.stack([self.public[own]] + [self.public[j] for j in ids])
            mixed = algo.mix_row(weights, copies).reshape(-1) - self.public[own]
            self.params = self.params.add(mixed, alpha=algo.gamma)      # the simulator's add_
