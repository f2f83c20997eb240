"""Synchronous decentralized rounds of CHOCO-SGD (see :mod:`gossamer.algorithms.dl.choco`).

A D-PSGD round (:class:`SyncDLDriver`: every node trains with the shared batched trainer)
whose mixing is replaced by compressed gossip steps. Every copy of ``x̂_j`` (node ``j``'s own
and its neighbours') receives the same ``q_j``, so one ``[N, P]`` tensor holds them all; it is
in checkpoints. A message costs the wire header plus the compressor's exact payload of its
sender, per link and gossip step; the round lasts as long as the slowest node's compute plus
sending its messages (or receiving its neighbours'). Refused, in one line each: faults,
adversaries, node availability other than ``always`` and dynamic topologies, which would leave
some copies of ``x̂_j`` without updates other copies got.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from gossamer import wire
from gossamer.config import ConfigError
from gossamer.sim.drivers.sync_dl import SyncDLDriver
from gossamer.sim.experiment import Experiment

_STALE = "would leave a neighbour's copy of x̂ without updates other copies got"


class ChocoDriver(SyncDLDriver):
    """Runs :class:`~gossamer.algorithms.dl.choco.Choco`."""

    def __init__(self, exp: Experiment) -> None:
        from gossamer.compression import build_compressor

        _refuse_unsupported(exp)
        super().__init__(exp)
        algo = exp.algorithm
        try:
            self.compressor = build_compressor(algo.compressor, algo.compressor_params, spec=exp.spec)
        except ValueError as exc:
            raise ConfigError("algorithm.params.compressor_params", str(exc).splitlines()[0]) from None
        self.public = algo.init_public(self.params)
        self.out_deg = np.bincount(self.graph.src, minlength=exp.num_nodes)
        self._sizes: list[np.ndarray] = []      # this round's message sizes [N] per gossip step

    def _mix(self, mixing) -> None:
        assert mixing is None, "CHOCO runs on the topology's own mixing matrix"
        algo, n, r = self.exp.algorithm, self.exp.num_nodes, self.round + 1
        if self._spare is None:
            self._spare = torch.empty_like(self.params)
        self._sizes = []
        for step in range(self.round_gossip_steps):
            payload = algo.gossip_step(self.mixing, self.params, self.public, self.compressor,
                                       seed=self.exp.cfg.seed, keys=algo.keys(n, r, step),
                                       scratch=self._spare)
            self._sizes.append(wire.HEADER_BYTES + payload)

    def _account(self, online: np.ndarray, samples: np.ndarray, sent: np.ndarray,
                 delivered: np.ndarray, r: int) -> None:
        """Bytes per link from each sender's message size; the round's simulated duration."""
        exp, n = self.exp, self.exp.num_nodes
        system = exp.system
        send_s, recv_s = np.zeros(n), np.zeros(n)
        for size in self._sizes:
            per_link = size[self.graph.src]
            in_bytes = np.bincount(self.graph.dst, weights=per_link, minlength=n).astype(np.int64)
            total = int(per_link.sum())
            self.bytes_up += total
            self.bytes_down += total
            self.node_bytes += self.out_deg * size + in_bytes
            send_s += self.out_deg * size / system.bandwidth_up_Bps + system.latency_s
            recv_s += in_bytes / system.bandwidth_down_Bps
        self.isolated = int((self.out_deg == 0).sum()) if n > 1 else 0
        compute_s = system.compute_s(np.arange(n), samples)
        self.sim_time += float((compute_s + np.maximum(send_s, recv_s)).max())

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["public"] = self.public
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.public = state["public"].to(self.device, copy=True)    # loaded on the host


def _refuse_unsupported(exp: Experiment) -> None:
    """One-line config errors for what would break the shared copies of ``x̂``."""
    cfg = exp.cfg
    if exp.faults is not None and exp.faults.enabled:
        raise ConfigError("faults", "CHOCO-SGD does not support faults yet: a lost message or "
                          f"a node that is down {_STALE}")
    if exp.adversary is not None and exp.adversary.model_attack:
        raise ConfigError("adversary.attack", "CHOCO-SGD does not support model attacks yet (data "
                          "attacks such as label_flip work)")
    if exp.availability.model != "always":
        raise ConfigError("system.availability", f"CHOCO-SGD needs every node online (availability: "
                          f"always): an offline node {_STALE}")
    if exp.dynamic is not None:
        raise ConfigError("topology", "CHOCO-SGD needs a static topology: a new neighbour holds no "
                          "copy of x̂")
    if cfg.model.init == "independent" and exp.algorithm.public_init == "model":
        raise ConfigError("algorithm.params.public_init", "with model.init independent no node "
                          "knows its neighbours' initial models: set public_init: zero")
