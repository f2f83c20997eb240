"""Decentralized merging node by node, vectorized: what D-PSGD does when ``W @ X`` is not enough.

Plain D-PSGD mixing is one sparse product. A robust merge (median, Krum, ... of the models a
node holds) or a Byzantine neighbour that sends each receiver a different model needs, for
every receiver ``i``, the stack of models it holds: its own and one per in-neighbour.
Receivers are grouped by how many models they hold, so each group is one dense
``[G, k, P]`` tensor; a group is split into chunks that bound memory. Rules and attacks are
the pure functions of :mod:`gossamer.aggregators` and :mod:`gossamer.attacks`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from gossamer.training.evaluator import Losses

# corrupt(messages [G, k, P], receivers' models [G, P], byzantine [G, k], receivers' ids [G])
Corrupt = Callable[[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray], torch.Tensor]


@dataclass
class MergeStats:
    skipped: int = 0          # receivers whose rule could not run on what they held (kept their model)


def gathered_merge(W: sp.csr_matrix, X: torch.Tensor, receivers: np.ndarray, *, aggregator: str,
                   params: dict, byzantine: np.ndarray | None = None, corrupt: Corrupt | None = None,
                   losses: Losses | None = None, chunk_bytes: int = 128 << 20,
                   stats: MergeStats | None = None, ids: np.ndarray | None = None) -> torch.Tensor:
    """New models ``[len(receivers), P]`` of ``receivers`` after one merge step.

    Args:
        W: effective mixing matrix ``[N, N]`` of this step (CSR, diagonal included); row ``i``
            lists what node ``i`` holds and the weights it gives them.
        X: models ``[N, P]`` before the step.
        receivers: node ids to merge (others keep their rows; the caller writes results back).
        aggregator: a rule of :mod:`gossamer.aggregators`; ``mean`` is the weighted average
            (equal to ``W @ X`` on those rows).
        byzantine, corrupt: Byzantine senders ``[N]`` (by node id) and the function crafting
            what they send, given the receivers' node ids (its randomness keyed by them).
        ids: the node id of each row of ``W`` and ``X`` (default: the row itself; the sharded
            simulator's halo holds a rank's rows and its neighbours').
    """
    from gossamer.aggregators import can_merge, merge_held, needs_losses

    W = sp.csr_matrix(W)
    out = X[torch.from_numpy(receivers)].clone()
    counts = np.diff(W.indptr)[receivers]
    scored = needs_losses(aggregator) and losses is not None
    row_bytes = X.shape[1] * X.element_size()
    for k in np.unique(counts):
        members = np.flatnonzero(counts == k)
        if k <= 1:
            continue                                   # holds only its own model
        if not can_merge(aggregator, int(k), params):
            if stats is not None:
                stats.skipped += len(members)
            continue
        cols, weights = _own_first(W, receivers[members], int(k))
        step = max(1, chunk_bytes // (int(k) * row_bytes))
        for c0 in range(0, len(members), step):
            sl = slice(c0, c0 + step)
            held = X[torch.from_numpy(cols[sl])]                          # [g, k, P]
            if corrupt is not None and byzantine is not None:
                byz = byzantine[cols[sl] if ids is None else ids[cols[sl]]]
                byz[:, 0] = False
                if byz.any():
                    who = receivers[members[sl]]
                    held = corrupt(held, held[:, 0], byz, who if ids is None else ids[who])
            scores = losses(held, receivers[members[sl]]) if scored else None
            merged = merge_held(aggregator, held, torch.from_numpy(weights[sl]), params, scores)
            out[torch.from_numpy(members[sl])] = merged.to(X.dtype)
    return out


def _own_first(W: sp.csr_matrix, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Column ids and weights ``[len(rows), k]`` of each row's entries, the row's own id first."""
    at = W.indptr[rows][:, None] + np.arange(k)[None, :]
    cols, vals = W.indices[at], W.data[at]
    order = np.argsort(cols != rows[:, None], axis=1, kind="stable")   # own id first
    return np.take_along_axis(cols, order, axis=1), np.take_along_axis(vals, order, axis=1)
