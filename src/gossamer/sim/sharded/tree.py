"""Sums of block rows along a binary tree fixed by block id (docs/scale.md).

Whatever crosses ranks is first summed per block of ``sharding.block`` node ids (a block is
owned whole by one rank). The blocks' sums are then added along the implicit binary tree over
block ids: leaf ``b`` is block ``b``; the node at level ``l`` and index ``i`` covers blocks
``[i 2^l, (i + 1) 2^l)`` and is its left child plus its right child, or the one child that holds
a block with a row (no addition then). The tree depends on the block ids alone, so the total has
the same bits on any number of ranks and with any cut between them.

Distributed (:func:`tree_reduce`): a node is formed by the rank holding its leftmost block with
a row. A rank's blocks are contiguous in id, so at each level it receives at most one row (the
right sibling of its last node, from a later rank) and sends at most one (its first node, to an
earlier rank): ``2 * levels`` rows of P values a rank, then the root comes from its rank by one
broadcast. ``levels`` is the bit length of the largest block id (14 for 10^6 nodes in blocks of
64), where an ``all_gather`` of the blocks would bring every rank one row per block.
"""

from __future__ import annotations

import numpy as np
import torch

from gossamer.sim.sharded.base import Shard, block_sums, rank_lost, send_recv


def merges(ids: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """The tree's additions over the sorted, distinct block ids ``ids``, level by level: for each
    level that adds anything, ``(left, right)``, the positions (in that level's list of nodes) of
    each addition's left and right child; the next level's list is this one without the right
    children, in order. The same on every rank."""
    keys = np.asarray(ids, dtype=np.int64)
    if len(keys) and np.any(np.diff(keys) <= 0):
        raise ValueError("tree sums need sorted, distinct block ids")
    out = []
    while len(keys) > 1:
        parent = keys >> 1
        left = np.flatnonzero(parent[1:] == parent[:-1])
        if len(left):
            out.append((left, left + 1))
            keep = np.ones(len(keys), dtype=bool)
            keep[left + 1] = False
            parent = parent[keep]
        keys = parent
    return out


def tree_sum(rows: torch.Tensor, ids: np.ndarray) -> torch.Tensor:
    """The total of ``rows`` (row ``j`` the sum of block ``ids[j]``; ``ids`` sorted and distinct)
    along the tree of block ids; the rows are summed in place (the total is a view of one of
    them). Zeros for no rows."""
    return _reduce(rows, np.asarray(ids, dtype=np.int64), np.zeros(len(ids), dtype=np.int64), None, "")


def tree_reduce(shard: Shard, rows: torch.Tensor, ids: np.ndarray, holders: np.ndarray, during: str
                ) -> torch.Tensor:
    """:func:`tree_sum` of every rank's block rows, on every rank: ``ids`` every block with a row
    (sorted, the same on every rank), ``holders`` the rank holding each (non-decreasing),
    ``rows`` this rank's rows in id order (summed in place). The same bits as :func:`tree_sum` of
    all the rows in one process; one line if a rank is gone."""
    ids, holders = np.asarray(ids, dtype=np.int64), np.asarray(holders, dtype=np.int64)
    if len(ids) and np.any(np.diff(holders) < 0):
        raise ValueError("each rank's blocks must be contiguous in id")
    return _reduce(rows, ids, holders, shard if shard.world > 1 else None, during)


def population_mean(shard: Shard, own: torch.Tensor, n: int, during: str) -> torch.Tensor:
    """The mean of all ``n`` nodes' rows ``[P]`` from each rank's own rows ``own``: block
    sums by their owners, added along the tree of block ids; the same bits for any rank count."""
    blocks = block_sums(own, shard.lo, shard.block)
    counts = [-(-c // shard.block) for c in shard.counts]
    ids = np.concatenate([np.arange(c, dtype=np.int64) + edge // shard.block
                          for edge, c in zip(shard.edges[:-1], counts, strict=True)])
    holders = np.repeat(np.arange(shard.world), counts)
    return tree_reduce(shard, blocks, ids, holders, during) / n


def _reduce(rows: torch.Tensor, ids: np.ndarray, holders: np.ndarray, shard: Shard | None,
            during: str) -> torch.Tensor:
    rank = 0 if shard is None else shard.rank
    mine = holders == rank
    if int(mine.sum()) != len(rows):
        raise ValueError(f"rank {rank} holds {int(mine.sum())} blocks but was given {len(rows)} rows")
    width = rows.shape[1:]
    if not len(ids):
        return torch.zeros(width, dtype=rows.dtype, device=rows.device)
    slot = np.full(len(ids), -1, dtype=np.int64)          # each node's row here, -1 elsewhere
    slot[mine] = np.arange(len(rows))
    for level, (left, right) in enumerate(merges(ids)):
        hl, hr = holders[left], holders[right]
        here = (hl == rank) & (hr == rank)
        if here.any():                                     # left + right, one vectorized addition
            a, b = torch.from_numpy(slot[left[here]]), torch.from_numpy(slot[right[here]])
            rows[a] += rows[b]
        if shard is not None:
            _across(shard, rows, slot, left, right, hl, hr, level, during)
        keep = np.ones(len(slot), dtype=bool)
        keep[right] = False
        slot, holders = slot[keep], holders[keep]
    root = int(holders[0])
    total = rows[int(slot[0])] if root == rank else torch.empty(width, dtype=rows.dtype, device=rows.device)
    if shard is not None:
        import torch.distributed as dist

        try:
            dist.broadcast(total, src=root)
        except (RuntimeError, dist.DistBackendError) as exc:
            raise rank_lost(shard, exc, during) from None
    return total


def _across(shard: Shard, rows: torch.Tensor, slot: np.ndarray, left: np.ndarray, right: np.ndarray,
            hl: np.ndarray, hr: np.ndarray, level: int, during: str) -> None:
    """One level's additions whose children are on different ranks: the right child's rank sends
    it to the left child's, which adds it (at most one each way a rank, by contiguity)."""
    rank, cross = shard.rank, hl != hr
    sends = np.flatnonzero(cross & (hr == rank))
    recvs = np.flatnonzero(cross & (hl == rank))
    got = [torch.empty(rows.shape[1:], dtype=rows.dtype, device=rows.device) for _ in recvs]
    send_recv(shard, [(rows[int(slot[right[j]])].contiguous(), int(hl[j])) for j in sends],
              [(buf, int(hr[j])) for j, buf in zip(recvs, got, strict=True)], during, tag=level)
    for j, buf in zip(recvs, got, strict=True):
        rows[int(slot[left[j]])] += buf


__all__ = ["merges", "population_mean", "tree_reduce", "tree_sum"]
