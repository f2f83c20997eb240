"""Differential privacy mechanisms over stacked rows: clipping and counter-based Gaussian noise.

Client level (DP-FedAvg): McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private
Recurrent Language Models", ICLR 2018, arXiv:1710.06963. Sample level (DP-SGD, used by
:class:`gossamer.training.trainer.BatchedTrainer`): Abadi et al., "Deep Learning with Differential
Privacy", CCS 2016, arXiv:1607.00133. Epsilon: :mod:`gossamer.privacy.accounting`.

Noise is a pure function of ``(seed, tag, keys)`` (``rng.STREAM_DP``), so a row's noise does
not depend on the other rows of the batch, and runs are deterministic and resume exactly.
"""

from __future__ import annotations

import numpy as np
import torch

from gossamer import rng

TAG_CLIENT_SHARE = 1     # noise: clients: client's share, keys (client, round)
TAG_SERVER = 2           # noise: server: one vector per round, keys (round,)
TAG_SGD = 3              # DP-SGD: keys (node, activation key, step)


def clip_rows(rows: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """Each row of ``rows`` ``[B, P]`` scaled to L2 norm at most ``clip_norm`` (rows already
    inside the ball are unchanged)."""
    norms = rows.norm(dim=1, keepdim=True)
    return rows * (clip_norm / (norms + 1e-12)).clamp(max=1.0)


def clip_factors(sq_norms: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """Per-row scale ``min(1, C / ||g||)`` from squared norms (as opacus, with a 1e-6 guard)."""
    return (clip_norm / (sq_norms.sqrt() + 1e-6)).clamp(max=1.0)


def gaussian(seed: int, tag: int, keys: np.ndarray, numel: int,
             device: torch.device | None = None) -> torch.Tensor:
    """Standard normal rows ``[B, numel]`` (float32), row ``b`` keyed by ``keys[b]`` (``[B, K]``
    int64). Box-Muller on two 53-bit uniforms per pair of values, so tails reach ~8.6 sigma.
    Drawn on the host (the same bits for every device), then moved to ``device``."""
    keys = np.asarray(keys, dtype=np.int64).reshape(len(keys), -1)
    cols = [keys[:, c: c + 1] for c in range(keys.shape[1])]
    pair = np.arange((numel + 1) // 2, dtype=np.int64)[None, :]
    u1 = rng.uniform(seed, rng.STREAM_DP, tag, *cols, 2 * pair)
    u2 = rng.uniform(seed, rng.STREAM_DP, tag, *cols, 2 * pair + 1)
    radius = np.sqrt(-2.0 * np.log1p(-u1))                   # 1 - u1 in (0, 1]
    angle = 2.0 * np.pi * u2
    z = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)], axis=1)[:, :numel]
    out = torch.from_numpy(np.ascontiguousarray(z, dtype=np.float32))
    return out if device is None else out.to(device)


def dp_fedavg_updates(deltas: torch.Tensor, clients: np.ndarray, round: int, *, clip_norm: float,
                      noise_multiplier: float, noise: str, expected: int, seed: int) -> torch.Tensor:
    """DP-FedAvg's rows: their plain mean is ``(sum_i clip(delta_i) + N(0, (z C)^2)) / expected``.

    ``deltas`` ``[k, P]`` are the updates ``model - start`` that reached the server from
    ``clients`` ``[k]`` in ``round``; ``expected`` is the fixed denominator (the clients the
    round selected). ``noise: server`` adds one noise vector to the sum; ``noise: clients``
    has each client add its own share of std ``z C / sqrt(expected)`` (the sum has std ``z C``
    when all ``expected`` clients deliver).
    """
    k, numel = deltas.shape
    clipped = clip_rows(deltas, clip_norm)
    std = noise_multiplier * clip_norm
    if std > 0 and noise == "clients":
        keys = np.stack([np.asarray(clients, dtype=np.int64), np.full(k, round)], axis=1)
        clipped = clipped + gaussian(seed, TAG_CLIENT_SHARE, keys, numel, deltas.device) * (std / np.sqrt(expected))
    total = clipped.sum(0)
    if std > 0 and noise == "server":
        total = total + gaussian(seed, TAG_SERVER, np.array([[round]]), numel, deltas.device)[0] * std
    return (total / expected).expand(k, -1).clone()
