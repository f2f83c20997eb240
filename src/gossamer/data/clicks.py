"""A synthetic click model for learn-to-rank: items with tags, user groups with different tastes,
queries, and position-biased clicks (``data.dataset: clicks``, used by ``algorithm.name: grank``).

The world: ``items`` items, each with ``tags_per_item`` distinct tags out of ``tags``; a query is
one tag (as in G-Rank's experiments, where users search for a tag). Every node belongs to one of
``groups`` user groups; a group likes ``liked_tags`` tags and asks about them more often
(``focus`` of its queries go to liked tags, the rest uniformly to all tags). The graded
relevance of item ``i`` to query ``q`` for group ``g`` is 0 when ``i`` lacks tag ``q``, else
``1 + |tags(i) ∩ liked(g) \\ {q}|``: every match is relevant, the ones that also carry the
group's other tastes more so, so groups disagree on the order of the same results.

Clicks follow the examination hypothesis: the item shown at position ``p`` (0-based) is examined
with probability ``1 / (p + 1) ** eta`` and, once examined, clicked with probability
``noise + (1 - noise) * (2**rel - 1) / (2**max_rel - 1)``; each shown item is clicked or not
independently. A ranker that puts the relevant items first gets more clicks on them, which is
what G-Rank learns from (Gold, Pouwelse, arXiv:2301.12530).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydantic import ConfigDict, TypeAdapter, ValidationError

from gossamer import rng
from gossamer.data.datasets import DATASETS, Dataset

STREAM_CLICKS = rng.STREAM_CLICKS


@dataclass(frozen=True)
class ClickModel:
    """The click model's parameters (``data.params`` of ``data.dataset: clicks``)."""

    __pydantic_config__ = ConfigDict(extra="forbid", allow_inf_nan=False)

    items: int = 120
    tags: int = 30
    tags_per_item: int = 3
    groups: int = 4
    liked_tags: int = 4
    focus: float = 0.5
    eta: float = 1.0
    noise: float = 0.02

    def __post_init__(self) -> None:
        for name in ("items", "tags", "tags_per_item", "groups", "liked_tags"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.tags_per_item > self.tags:
            raise ValueError(f"tags_per_item ({self.tags_per_item}) exceeds tags ({self.tags})")
        if self.liked_tags > self.tags:
            raise ValueError(f"liked_tags ({self.liked_tags}) exceeds tags ({self.tags})")
        if self.items * self.tags > 10**7:
            raise ValueError(f"{self.items} items x {self.tags} tags is too large for the click model")
        if not 0 <= self.focus <= 1 or not 0 <= self.noise <= 1:
            raise ValueError("focus and noise are probabilities in [0, 1]")
        if self.eta < 0:
            raise ValueError(f"eta must be >= 0, got {self.eta}")

    @classmethod
    def from_params(cls, params: dict) -> ClickModel:
        """From ``data.params``; a bad field raises one ValueError line."""
        try:
            return TypeAdapter(cls).validate_python(dict(params))
        except ValidationError as exc:
            err = exc.errors()[0]
            where, msg = ".".join(str(p) for p in err["loc"]), err["msg"].removeprefix("Value error, ")
            raise ValueError(f"{where}: {msg}" if where else msg) from None


@dataclass(frozen=True)
class ClickWorld:
    """One drawn world. Shapes: ``item_tags`` bool ``[I, T]``; ``liked`` bool ``[G, T]``;
    ``query_probs`` ``[G, Q]`` (Q = T); ``relevance`` int ``[G, Q, I]``; ``group_of`` ``[N]``."""

    model: ClickModel
    item_tags: np.ndarray
    liked: np.ndarray
    query_probs: np.ndarray
    relevance: np.ndarray
    group_of: np.ndarray

    @property
    def num_items(self) -> int:
        return self.item_tags.shape[0]

    @property
    def num_queries(self) -> int:
        return self.item_tags.shape[1]

    @property
    def max_relevance(self) -> int:
        return self.model.tags_per_item

    def sample_queries(self, seed: int, nodes: np.ndarray, step: int, repeat: np.ndarray) -> np.ndarray:
        """The query each of ``nodes`` issues at round ``step`` (its ``repeat``-th that round),
        drawn from its group's query distribution; a pure function of the keys."""
        u = rng.uniform(seed, STREAM_CLICKS, nodes, step, repeat, 0)
        cdf = np.cumsum(self.query_probs[self.group_of[nodes]], axis=1)
        q = (u[:, None] >= cdf).sum(axis=1)
        return np.minimum(q, self.num_queries - 1)

    def click_probability(self, nodes: np.ndarray, queries: np.ndarray, shown: np.ndarray) -> np.ndarray:
        """``[B, D]``: the chance that each shown item (``shown[b, p]``, position ``p``) is clicked."""
        rel = self.relevance[self.group_of[nodes][:, None], queries[:, None], shown]
        return examination(shown.shape[1], self.model.eta)[None, :] * attractiveness(
            rel, self.max_relevance, self.model.noise)


def examination(positions: int, eta: float) -> np.ndarray:
    """``[positions]``: the chance that position ``p`` (0-based) is looked at, ``1/(p+1)^eta``."""
    return 1.0 / np.arange(1, positions + 1, dtype=np.float64) ** eta


def attractiveness(rel: np.ndarray, max_rel: int, noise: float) -> np.ndarray:
    """The chance that an examined item of graded relevance ``rel`` is clicked."""
    gain = (2.0 ** rel - 1) / (2.0 ** max_rel - 1)
    return noise + (1 - noise) * gain


def ndcg_at_k(relevance: np.ndarray, ranking: np.ndarray, k: int) -> np.ndarray:
    """NDCG@k of each row: ``relevance`` ``[B, I]`` graded, ``ranking`` ``[B, I]`` item ids best
    first; gain ``2^rel - 1``, discount ``1/log2(p + 2)``; a row without relevant items scores 1."""
    k = min(k, relevance.shape[1])
    discount = 1.0 / np.log2(np.arange(2, k + 2, dtype=np.float64))
    gains = 2.0 ** np.take_along_axis(relevance, ranking[:, :k], axis=1) - 1
    ideal = 2.0 ** -np.sort(-relevance, axis=1)[:, :k] - 1
    idcg = ideal @ discount
    return np.where(idcg > 0, (gains @ discount) / np.where(idcg > 0, idcg, 1.0), 1.0)


def make_world(model: ClickModel, num_nodes: int, seed: int) -> ClickWorld:
    """Draw items' tags, groups' tastes and each node's group from ``seed``."""
    g = rng.generator(seed, STREAM_CLICKS, 1)
    n_items, n_tags = model.items, model.tags
    item_tags = np.zeros((n_items, n_tags), dtype=bool)
    for i in range(n_items):              # the first tag cycles, so every tag has items
        first = i % n_tags
        others = g.permutation(np.delete(np.arange(n_tags), first))[: model.tags_per_item - 1]
        item_tags[i, first] = True
        item_tags[i, others] = True
    liked = np.zeros((model.groups, n_tags), dtype=bool)
    for k in range(model.groups):
        liked[k, g.permutation(n_tags)[: model.liked_tags]] = True
    query_probs = (1 - model.focus) / n_tags + model.focus * liked / model.liked_tags
    # relevance[g, q, i] = [q in tags(i)] * (1 + |tags(i) & liked(g) - {q}|)
    shared = item_tags.astype(np.int64) @ liked.T.astype(np.int64)            # [I, G]
    liked_q = liked.astype(np.int64)                                           # [G, Q]
    extra = shared.T[:, None, :] - liked_q[:, :, None] * item_tags.T[None, :, :]
    relevance = item_tags.T[None, :, :] * (1 + extra)
    group_of = g.permutation(np.arange(num_nodes) % model.groups)
    return ClickWorld(model, item_tags, liked, query_probs, relevance.astype(np.int64), group_of)


@DATASETS.register("clicks")
def clicks() -> Dataset:
    """The click model is not a training set: only ``algorithm.name: grank`` reads it (the
    experiment build refuses it for other algorithms on ``data.dataset`` first)."""
    raise ValueError("clicks is a click model for learn-to-rank, read by algorithm grank only; "
                     "choose a training dataset for this algorithm")
