"""G-Rank: unsupervised, continuous learn-to-rank from click logs gossiped between peers.

Andrew Gold, Johan Pouwelse, "G-Rank: Unsupervised Continuous Learn-to-Rank for Edge Devices in
a P2P Network", arXiv:2301.12530, 2023 (MSc thesis, TU Delft; code: awrgold/G-Rank).

No model is trained. Every node keeps a click log of ``(origin node, query, clicked item)``
records, its own and those gossiped to it; it scores every peer whose records it holds with a
modified Jaccard similarity (:func:`similarity`), ranks the results of a query it has seen by
clicks weighted with the clicking node's similarity plus an offset (:func:`click_scores`,
:func:`rank`), swaps two shown positions with probability ``swap_prob`` to explore
(:func:`explore`), and pushes a random sample of its log (:func:`sample_log`) to a neighbour
it finds similar (:func:`pick_peers`). Functions take the node axis first; the simulator's
executor is ``sim/drivers/grank.py``.

Counts are held as ``counts[v, j, q, i]``: records in node ``v``'s log that node ``j`` made by
clicking item ``i`` for query ``q``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gossamer.algorithms.base import Algorithm

RECORD_BYTES = 12        # a record on the wire: origin node, query, item (three int32)


@dataclass(frozen=True)
class GRank(Algorithm):
    """G-Rank's hyper-parameters (``algorithm.params``).

    ``gossip``: false keeps every log local (the no-gossip baseline). ``sample_rate``: each
    record of the sender's log goes into a message with this probability (1: the whole log).
    ``swap_prob``: the chance of one exploration swap per result list (0.5 in the paper).
    ``offset``: added to a peer's similarity when its clicks are counted (the notebook's
    ``normalization``; its final score line drops it, hence 0 by default), so that clicks of
    a peer of similarity 0 still count.
    ``top_queries``: how many of a node's most frequent queries enter the similarity (10).
    ``display``: results shown per query (clicks happen there); ``ndcg_k``: the cut-off of the
    measured NDCG. ``queries_per_round``: queries each online node issues per round;
    ``period_s``: simulated seconds per round (one gossip push per online node).
    """

    family = "dl"
    pattern = "grank"

    gossip: bool = True
    sample_rate: float = 0.5
    swap_prob: float = 0.5
    offset: float = 0.0
    top_queries: int = 10
    display: int = 10
    ndcg_k: int = 10
    queries_per_round: int = 1
    period_s: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if not 0 <= self.swap_prob <= 1:
            raise ValueError(f"swap_prob must be in [0, 1], got {self.swap_prob}")
        if self.offset < 0:
            raise ValueError(f"offset must be >= 0, got {self.offset}")
        for name in ("top_queries", "display", "ndcg_k", "queries_per_round"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.period_s <= 0:
            raise ValueError(f"period_s must be > 0, got {self.period_s}")


def _top_sets(per_query: np.ndarray, k: int) -> np.ndarray:
    """Bool, same shape: the ``k`` most frequent queries with a record (ties: lower query id)."""
    order = np.argsort(-per_query, axis=-1, kind="stable")
    place = np.empty_like(order)
    np.put_along_axis(place, order, np.arange(per_query.shape[-1]), axis=-1)
    return (place < k) & (per_query > 0)


def similarity(counts: np.ndarray, top_queries: int = 10) -> np.ndarray:
    """``[V, N]``: how similar node ``v`` finds node ``j``, from ``v``'s log only.

    ``counts`` ``[V, N, Q, I]`` with viewer ``v`` = node ``v`` (V = N). With ``C_v``/``C_j``
    the items ``v``/``j`` clicked, ``S`` the queries both issued, ``M`` the items ``v`` clicked
    for a query in ``S`` that ``j`` also clicked for a query in ``S``, and ``T_v``/``T_j`` their
    ``top_queries`` most frequent queries, the score is
    ``(|M| + |T_v ∩ T_j|^2) / |C_v ∪ C_j|`` when ``S`` is not empty, else 0 (the author's code;
    the notebook text squares the other term), each row divided by its maximum. Node ``v``
    scores itself too, as in the code, and its own clicks are weighted by that score.
    """
    n = counts.shape[0]
    clicked = counts > 0                                             # [V, N, Q, I]
    own = clicked[np.arange(n), np.arange(n)]                        # [V, Q, I]
    their_q = clicked.any(-1)                                        # [V, N, Q]
    shared = their_q & own.any(-1)[:, None, :]                       # [V, N, Q]
    s = shared.astype(np.float32)
    mine = (s @ own.astype(np.float32)) > 0                          # [V, N, I]
    theirs = (s[:, :, None, :] @ clicked.astype(np.float32))[:, :, 0] > 0
    matched = (mine & theirs).sum(-1)
    tops = _top_sets(counts.sum(-1), top_queries)                    # [V, N, Q]
    own_top = tops[np.arange(n), np.arange(n)]                       # [V, Q]
    overlap = (tops & own_top[:, None, :]).sum(-1)
    union = (clicked.any(2) | own.any(1)[:, None, :]).sum(-1)
    score = np.where(shared.any(-1) & (union > 0), (matched + overlap ** 2) / np.maximum(union, 1), 0.0)
    top = score.max(axis=1, keepdims=True)
    return np.where(top > 0, score / np.where(top > 0, top, 1.0), 0.0)


def click_scores(counts_q: np.ndarray, sim_rows: np.ndarray, offset: float) -> np.ndarray:
    """``[B, I]``: each item's score for one query per row, ``Σ_j clicks_j(i) * (sim_j + offset)``.
    ``counts_q`` ``[B, N, I]`` (the viewer's records of that query by origin), ``sim_rows`` ``[B, N]``."""
    return np.einsum("bni,bn->bi", counts_q.astype(np.float64), sim_rows + offset)


def rank(scores: np.ndarray, tag_match: np.ndarray, popularity: np.ndarray) -> np.ndarray:
    """``[B, I]`` item ids, best first: clicked items (score > 0) by score, then the items whose
    tags match the query (the local metadata fallback), then by popularity in the log, then id."""
    ids = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    return np.lexsort((ids, -popularity, -tag_match.astype(np.int8), -scores), axis=-1)


def explore(shown: np.ndarray, u: np.ndarray, swap_prob: float) -> np.ndarray:
    """Swap two distinct positions of each row of ``shown`` ``[B, D]`` where ``u[:, 0] < swap_prob``;
    ``u`` ``[B, 3]`` uniforms in [0, 1) pick the positions. Returns a new array."""
    out = shown.copy()
    d = shown.shape[1]
    if d < 2:
        return out
    rows = np.flatnonzero(u[:, 0] < swap_prob)
    a = (u[rows, 1] * d).astype(np.int64)
    b = (u[rows, 2] * (d - 1)).astype(np.int64)
    b = b + (b >= a)                                                  # distinct from a
    out[rows, a], out[rows, b] = shown[rows, b], shown[rows, a]
    return out


def pick_peers(adjacency: np.ndarray, sim_rows: np.ndarray, u: np.ndarray) -> np.ndarray:
    """``[S]``: each sender's gossip target, uniform among its neighbours it finds similar
    (similarity > 0), or among all its neighbours when none is; -1 without neighbours.
    ``adjacency`` bool ``[S, N]``, ``sim_rows`` ``[S, N]``, ``u`` ``[S]``."""
    similar = adjacency & (sim_rows > 0)
    cand = np.where(similar.any(1, keepdims=True), similar, adjacency)
    count = cand.sum(1)
    pick = (u * count).astype(np.int64)                               # the pick-th candidate
    place = np.cumsum(cand, axis=1) - 1
    hit = cand & (place == pick[:, None])
    return np.where(count > 0, hit.argmax(1), -1)


def sample_log(held: np.ndarray, u: np.ndarray, rate: float) -> np.ndarray:
    """Bool ``[S, R]``: the records each sender puts in its message, each held record with
    probability ``rate`` (``rate`` 1 sends the whole log)."""
    return held & (u < rate) if rate < 1 else held.copy()
