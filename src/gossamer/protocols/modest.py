"""MoDeST (decentralized sampling): who trains, who aggregates, what an aggregator averages.

Round ``r``'s trainers are the first ``sample_size`` responsive nodes of :func:`trainers`
(the pool of nodes with data ranked by ``(seed, r)``); its aggregators the first
``aggregators`` responsive nodes of :func:`aggregators` (the view ranked by ``(seed, r + 1)``,
so they usually train next round). Before any aggregate exists, the first ``sample_size`` of
the ranking start from the initial model by themselves (:func:`bootstrap`). A trainer
trains from the first model that reaches it; an aggregator averages the first ``quorum``
models to arrive, or those it holds once ``timeout_s`` passed without a new one, in the
round's rank order (:func:`average`).

The simulator decides all of a round at once from arrival times
(:func:`~gossamer.algorithms.dl.modest.quorum_mask`); a peer meets the same decisions one
event at a time, so for it the protocol is a state machine, :class:`Inbox`: models arrive,
time passes, and it answers with the next action (train from this model, aggregate these).
It knows no clock: the executor passes the time in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from gossamer.algorithms.dl.modest import aggregate, rank, sample

TRAIN, AGGREGATE = 0, 1     # what a model is sent for


def trainers(pool: np.ndarray, seed: int, r: int) -> np.ndarray:
    """Round ``r``'s trainer candidates in rank order (probed until ``sample_size`` answer)."""
    return rank(pool, seed, r)


def aggregators(view: np.ndarray, seed: int, r: int) -> np.ndarray:
    """Round ``r``'s aggregator candidates in rank order: round ``r + 1``'s ranking."""
    return rank(view, seed, r + 1)


def bootstrap(pool: np.ndarray, seed: int, r: int, k: int) -> np.ndarray:
    """Who starts from the initial model when no aggregate exists yet: round ``r``'s sample."""
    return sample(pool, seed, r, k)


def average(algorithm: Any, models: torch.Tensor, samples: np.ndarray) -> torch.Tensor:
    """An aggregator's average ``[P]`` of the models ``[S, P]`` it took, stacked in rank order."""
    return aggregate(models, algorithm.model_weights(samples))


@dataclass
class Arrival:
    sender: int
    tensor: torch.Tensor        # [P]
    samples: int                # the trainer's sample count (weighting "samples")
    t: float = 0.0              # when it arrived (the executor's clock)


@dataclass(frozen=True)
class Train:
    round: int
    start: Arrival              # the first model that arrived


@dataclass(frozen=True)
class Aggregate:
    round: int
    arrivals: list[Arrival]     # in rank order


@dataclass
class Inbox:
    """One node's MoDeST state: the last round it trained and aggregated, the models it holds.

    Events: :meth:`deliver` (a model arrived for round ``r``), :meth:`next_action` (the
    executor asks what to do now; time only moves forward). Actions: :class:`Train`,
    :class:`Aggregate`, or None (wait at most :meth:`wait_s`). The lowest round goes
    first, training before aggregating; a round that is acted on makes older ones of the
    same kind obsolete. Time a node spends busy (``free_since``) does not count toward an
    aggregation's timeout.
    """

    quorum: int
    timeout_s: float
    ranking: Any                # r -> round r's trainer ranking (orders an aggregator's models)
    trained: int = 0
    aggregated: int = 0
    held: dict[tuple[int, int], list[Arrival]] = field(default_factory=dict)

    def deliver(self, r: int, purpose: int, arrival: Arrival) -> bool:
        """File a model for round ``r``; models for rounds this node is done with are dropped."""
        if r <= (self.trained if purpose == TRAIN else self.aggregated):
            return False
        self.held.setdefault((r, purpose), []).append(arrival)
        return True

    def open_rounds(self) -> list[tuple[int, list[Arrival]]]:
        """Aggregations waiting for models."""
        return [(r, a) for (r, p), a in self.held.items() if p == AGGREGATE and r > self.aggregated]

    def _ready(self, r: int, purpose: int, arrivals: list[Arrival], now: float, free_since: float) -> bool:
        if purpose == TRAIN:
            return r > self.trained
        return r > self.aggregated and (len(arrivals) >= self.quorum
                                        or now - max(arrivals[-1].t, free_since) >= self.timeout_s)

    def next_action(self, now: float, free_since: float) -> Train | Aggregate | None:
        ready = [key for key, a in self.held.items() if self._ready(*key, a, now, free_since)]
        if not ready:
            return None
        r, purpose = min(ready)
        arrivals = self.held.pop((r, purpose))
        for key in [key for key in self.held if key[1] == purpose and key[0] < r]:
            del self.held[key]                        # overtaken: those rounds are over
        if purpose == TRAIN:
            self.trained = r
            return Train(r, arrivals[0])
        self.aggregated = r
        return Aggregate(r, in_rank_order(arrivals[:self.quorum], self.ranking(r)))

    def wait_s(self, now: float, free_since: float, deadline: float) -> float:
        """How long to wait for the next event: until an aggregation times out, or ``deadline``."""
        ends = [max(a[-1].t, free_since) + self.timeout_s for _, a in self.open_rounds()]
        return max(0.01, min(ends + [deadline]) - now)


def in_rank_order(arrivals: Sequence[Arrival], ranked: np.ndarray) -> list[Arrival]:
    """``arrivals`` sorted by their senders' positions in ``ranked`` (unranked ones last)."""
    position = {int(j): i for i, j in enumerate(ranked)}
    return sorted(arrivals, key=lambda a: position.get(a.sender, len(position)))
