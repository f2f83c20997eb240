"""Deep Gradient Compression as one pure step over caller-held state.

Lin, Han, Mao, et al. 2018, "Deep Gradient Compression: Reducing the Communication Bandwidth
for Distributed Training", arXiv:1712.01887. Per round, for each sender row:

1. local gradient clipping: ``g <- g * min(1, clip_norm / ||g||_2)`` (the paper scales the
   global threshold by ``N^-1/2``; pass the already-scaled value);
2. momentum correction: ``u <- m u + g``, ``v <- v + u`` (accumulate velocity, not gradient);
3. top-k of ``|v|`` at the round's density (exact top-k; the paper samples to estimate the
   threshold), sent with the :class:`~gossamer.compression.sparse.TopK` wire format;
4. momentum factor masking: ``u`` and ``v`` are zeroed where an entry was sent.

Warm-up: the density falls geometrically from ``start`` to ``target`` over ``warmup_rounds``;
``start=0.25, target=0.25/4**4, warmup_rounds=4`` is the paper's factor of 4 per warm-up
epoch (25%, 6.25%, 1.5625%, 0.39%, then 0.098%); ``target=0.001`` is within 2% of it.
Nesterov momentum and the sampled threshold are not implemented.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from gossamer.compression.base import Encoded, as_density
from gossamer.compression.sparse import TopK


def dgc_density(round: int, target: float, warmup_rounds: int = 0, start: float = 0.25
                ) -> float:
    """Density of round ``round`` (0-based): ``start (target/start)^(round/warmup_rounds)``
    during warm-up, ``target`` from round ``warmup_rounds`` on (and when ``target >= start``)."""
    target, start = as_density("target", target), as_density("start", start)
    if warmup_rounds <= 0 or round >= warmup_rounds or target >= start:
        return target
    return start * (target / start) ** (round / warmup_rounds)


class DGCStep(NamedTuple):
    """What one DGC step produces: the payload (``compressor`` serializes it), the dense
    ``decoded [N, P]`` the receiver rebuilds, and the new ``momentum``/``accumulation``."""

    encoded: Encoded
    decoded: torch.Tensor
    momentum: torch.Tensor
    accumulation: torch.Tensor
    compressor: TopK


def dgc_step(grad: torch.Tensor, momentum: torch.Tensor | None,
             accumulation: torch.Tensor | None, *, round: int, density: float,
             momentum_factor: float = 0.9, clip_norm: float | None = None,
             warmup_rounds: int = 0, start_density: float = 0.25) -> DGCStep:
    """One DGC step for rows ``grad [N, P]`` with state ``u = momentum``, ``v = accumulation``
    (``[N, P]``; None means zeros). The receiver adds ``decoded`` (already a momentum-corrected
    step direction) times the learning rate."""
    g = grad
    if clip_norm is not None:
        norm = grad.double().norm(dim=1, keepdim=True)
        g = grad * (clip_norm / norm.clamp_min(1e-30)).clamp(max=1.0).float()
    u = g if momentum is None else momentum_factor * momentum + g
    v = u if accumulation is None else accumulation + u
    compressor = TopK(density=dgc_density(round, density, warmup_rounds, start_density))
    enc = compressor.compress(v)
    decoded = compressor.decompress(enc)
    sent = enc.parts["indices"]
    return DGCStep(enc, decoded, u.clone().scatter_(1, sent, 0.0),
                   v.clone().scatter_(1, sent, 0.0), compressor)


def dgc_nominal_bytes(numel: int, *, round: int, density: float, warmup_rounds: int = 0,
                      start_density: float = 0.25) -> int:
    """Payload bytes of any row in round ``round`` (fixed given the round's density)."""
    return TopK(density=dgc_density(round, density, warmup_rounds, start_density)
                ).nominal_bytes(numel)


