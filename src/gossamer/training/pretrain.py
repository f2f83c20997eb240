"""Central pre-training of a model on the run's public rows, before round 1 (``model.pretrain``).

FedIns adapts a pre-trained backbone; no weights can be downloaded, so the backbone is trained
here on a held-out public set (``partition.public_fraction``), seeded and reproducible.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gossamer import rng


def public_rows(samples: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The public rows (``ceil(fraction * samples)``, drawn by the permutation
    ``rng.generator(seed, STREAM_PRETRAIN, 0)``) and the rest, both sorted."""
    m = int(np.ceil(fraction * samples))
    public = np.sort(rng.generator(seed, rng.STREAM_PRETRAIN, 0).permutation(samples)[:m])
    return public, np.setdiff1d(np.arange(samples), public)


def pretrain(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float,
             batch_size: int, seed: int) -> float:
    """Train ``model`` in place for ``steps`` steps of plain SGD (``lr``) on mini-batches of
    ``batch_size`` from ``x``, ``y`` (epochs in the order ``rng.generator(seed,
    STREAM_PRETRAIN, 1, epoch)``, the last batch of an epoch shorter); returns the last
    step's loss."""
    n = len(y)
    if n == 0:
        raise ValueError("no public rows to pre-train on")
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss = torch.zeros(())
    order, epoch, at = np.zeros(0, dtype=np.int64), -1, 0
    for _ in range(steps):
        if at >= len(order):
            epoch += 1
            order, at = rng.generator(seed, rng.STREAM_PRETRAIN, 1, epoch).permutation(n), 0
        idx = torch.from_numpy(order[at:at + batch_size])
        at += batch_size
        opt.zero_grad()
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
    return float(loss.detach())
