"""CHOCO-SGD: D-PSGD whose nodes gossip compressed model differences and still reach consensus.

Koloskova, Stich, Jaggi, "Decentralized Stochastic Optimization and Gossip Algorithms with
Compressed Communication", ICML 2019, arXiv:1902.00340 (Algorithm 2). Every node ``i`` keeps a
public copy ``x̂_i`` of its model that all its neighbours hold too. A gossip step is

    q_i = C(x_i - x̂_i)                              sent to every neighbour
    x̂_j <- x̂_j + q_j                                 every node, for itself and its neighbours
    x_i <- x_i + gamma sum_j W_ij (x̂_j - x̂_i)        the consensus step

with any compressor ``C`` of :mod:`gossamer.compression`. Only ``q_i`` travels, and the error
of ``C`` is not lost: it stays in ``x_i - x̂_i`` and is sent in later steps. With the identity
compressor and ``gamma = 1`` a step is D-PSGD's ``x <- W x`` (up to float rounding: it is
computed as ``x + (W x - x)``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from gossamer.algorithms.dl.dpsgd import DPSGD, mix_into

PublicInit = Literal["model", "zero"]
MAX_GOSSIP_STEPS = 1 << 10      # a step's randomness key is node << 32 | round << 10 | step


@dataclass(frozen=True)
class Choco(DPSGD):
    """CHOCO-SGD: local training, then ``gossip_steps`` compressed gossip steps per round.

    ``compressor`` / ``compressor_params``: a registered compressor (docs/compression.md) and
    its params; ``gamma`` in (0, 1]: the consensus step size (the paper tunes it per
    compressor: the coarser ``C``, the smaller). ``public_init``: ``model`` starts every
    ``x̂_i`` at the shared initial model, which every node can build from the seed (no bytes);
    ``zero`` starts at 0 as in the paper, so the first messages carry the model itself.
    The schedule options of :class:`DPSGD` count gossip steps; the merge is the weighted mean.
    """

    pattern = "choco"

    compressor: str = "none"
    compressor_params: dict[str, Any] = field(default_factory=dict)
    gamma: float = 1.0
    public_init: PublicInit = "model"

    def __post_init__(self) -> None:
        from gossamer.compression import COMPRESSORS, build_compressor

        super().__post_init__()
        if self.aggregator != "mean":
            raise ValueError("CHOCO-SGD's consensus step is the weighted mean (aggregator: mean)")
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"gamma must be in (0, 1], got {self.gamma}")
        if self.gossip_steps > MAX_GOSSIP_STEPS:
            raise ValueError(f"gossip_steps must be <= {MAX_GOSSIP_STEPS}")
        if self.compressor not in COMPRESSORS:
            raise ValueError(f"unknown compressor {self.compressor!r}; known: "
                             f"{', '.join(COMPRESSORS.names())}")
        if not COMPRESSORS.get(self.compressor).needs_spec:   # else checked once the model is built
            build_compressor(self.compressor, self.compressor_params)

    def init_public(self, params: torch.Tensor) -> torch.Tensor:
        """The public copies ``x̂`` ``[N, P]`` at the start, from the initial rows ``params``."""
        return params.clone() if self.public_init == "model" else torch.zeros_like(params)

    @staticmethod
    def keys(num_nodes: int, round: int, step: int, nodes: np.ndarray | None = None) -> np.ndarray:
        """Randomness keys ``[N]`` of the messages of gossip step ``step`` (0-based) of
        ``round``; ``nodes``: only those nodes' keys (a peer: its own, a sender's)."""
        ids = np.arange(num_nodes, dtype=np.int64) if nodes is None else np.asarray(nodes, dtype=np.int64)
        return (ids << 32) + (round << 10) + step

    def gossip_step(self, mixing: torch.Tensor, params: torch.Tensor, public: torch.Tensor,
                    compressor, *, seed: int, keys: np.ndarray,
                    scratch: torch.Tensor | None = None) -> np.ndarray:
        """One compressed gossip step, in place on ``params`` and ``public`` (both ``[N, P]``);
        ``mixing``: the ``[N, N]`` (sparse) doubly stochastic matrix. Returns each node's
        message payload size in bytes ``[N]`` (without the header)."""
        enc = compressor.compress(params - public, seed=seed, keys=keys)
        public.add_(compressor.decompress(enc).to(public.dtype))
        mixed = mix_into(mixing, public, torch.empty_like(public) if scratch is None else scratch)
        mixed.sub_(public)                                  # sum_j W_ij (x̂_j - x̂_i), rows sum to 1
        params.add_(mixed, alpha=self.gamma)
        return np.asarray(enc.nbytes, dtype=np.int64)


__all__ = ["Choco"]
