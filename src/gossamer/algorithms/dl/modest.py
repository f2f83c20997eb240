"""MoDeST: decentralized sampling; each round a small sample trains and a few of them aggregate.

de Vos, Dhasade, Kermarrec, et al., "MoDeST: Bridging the Gap between Federated and
Decentralized Learning with Decentralized Sampling", 2023, arXiv:2302.13837.

Every node can compute the sample of any round on its own: candidates (the registry's
members, its *view*) are ranked by a hash of (seed, round, node id), and the sample is the
first responsive nodes of that ranking. A sender pings the first ``k`` candidates at once;
each one that does not answer within ``timeout_s`` is replaced by the next in the ranking
(:func:`probe`). Nodes with the same view therefore agree on the sample without talking.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from gossamer import rng
from gossamer.algorithms.base import Algorithm


@dataclass(frozen=True)
class Probe:
    """Outcome of pinging a ranked candidate list until ``k`` answered.

    ``chosen``: the responsive nodes found, in rank order (fewer than ``k`` when the list ran
    out); ``wave``: for each chosen node, how many timeouts had passed when it was pinged;
    ``skipped``: the unresponsive candidates pinged, each one a timeout; ``waves``: timeouts
    the sender sat through before it knew the sample (its wait is at least ``waves * timeout``).
    """

    chosen: np.ndarray
    wave: np.ndarray
    skipped: np.ndarray
    waves: int


def rank(candidates: np.ndarray, seed: int, round: int) -> np.ndarray:
    """Candidate ids ``[C]`` ordered by the round's hash ``uniform(seed, SAMPLE, round, id)``.

    Depends only on the *set* of candidates: their order in the input does not matter.
    """
    ids = np.asarray(candidates, dtype=np.int64)
    keys = rng.uniform(seed, rng.STREAM_SAMPLE, round, ids)
    return ids[np.lexsort((ids, keys))]


def sample(candidates: np.ndarray, seed: int, round: int, k: int) -> np.ndarray:
    """The round's sample: the first ``k`` of :func:`rank` (before any node is found unresponsive)."""
    return rank(candidates, seed, round)[:k]


def probe(ranked: np.ndarray, responsive: np.ndarray, k: int) -> Probe:
    """Ping ``ranked`` ``[C]`` (with ``responsive`` ``[C]`` bool) the paper's way.

    The first ``k`` candidates are pinged in parallel; each wave's unanswered pings time out
    together and are replaced by as many next candidates, until ``k`` answered or the list
    ran out. Example: ranked ``[5, 2, 7, 1]``, responsive ``[T, F, T, T]``, ``k = 2`` gives
    chosen ``[5, 7]``, wave ``[0, 1]``, skipped ``[2]``, waves ``1``.
    """
    ranked = np.asarray(ranked, dtype=np.int64)
    responsive = np.asarray(responsive, dtype=bool)
    pinged = np.full(len(ranked), -1, dtype=np.int64)       # the wave each was pinged in; -1: never
    pos, pending, wave = 0, k, 0
    while pending > 0 and pos < len(ranked):
        end = min(pos + pending, len(ranked))
        pinged[pos:end] = wave
        pending = int((~responsive[pos:end]).sum())
        pos, wave = end, wave + (pending > 0)
    ok = (pinged >= 0) & responsive
    return Probe(ranked[ok], pinged[ok], ranked[(pinged >= 0) & ~responsive], wave)


def quorum_mask(arrival: np.ndarray, q: int) -> np.ndarray:
    """Which models each aggregator averages: its ``q`` earliest finite ``arrival`` ``[A, S]``.

    Ties go to the lower column (rank order). Rows with fewer than ``q`` finite arrivals
    keep all of them.
    """
    order = np.argsort(arrival, axis=1, kind="stable")
    mask = np.zeros(arrival.shape, dtype=bool)
    np.put_along_axis(mask, order[:, :q], True, axis=1)
    return mask & np.isfinite(arrival)


def aggregate(models: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted averages of ``models`` ``[S, P]``: ``weights`` ``[S]`` gives ``[P]``, ``[A, S]``
    gives one average per row ``[A, P]`` (each row normalized to sum to one)."""
    w = weights.to(models.device, models.dtype)
    return (w / w.sum(dim=-1, keepdim=True)) @ models


@dataclass(frozen=True)
class MoDeST(Algorithm):
    """Decentralized sampling: per round ``sample_size`` trainers and ``aggregators`` aggregators.

    The aggregators of round ``r - 1`` send their model to the ``sample_size`` trainers of
    round ``r``; each trainer trains from the first model that reaches it and sends the result
    to the ``aggregators`` aggregators of round ``r``, the first responsive nodes of round
    ``r + 1``'s ranking (so they usually train in the next round and keep their model
    locally). An aggregator averages the first ``ceil(success_fraction * sample_size)``
    models that reach it, so slow or failed trainers do not hold the round up.

    ``timeout_s``: how long a node waits for a ping answer before it takes the next
    candidate. ``weighting``: ``uniform`` (the paper's plain average) or ``samples``.
    ``announce_churn``: nodes going offline or online announce it (leave/join) and the
    registry update reaches the next round's sample; with ``False`` offline nodes stay in
    every view and are only found out by timeouts (crashes, as in the paper's failure runs).
    """

    family = "dl"
    pattern = "sampled_dl"

    sample_size: int = 10
    aggregators: int = 1
    success_fraction: float = 1.0
    timeout_s: float = 5.0
    weighting: Literal["uniform", "samples"] = "uniform"
    announce_churn: bool = True

    def __post_init__(self) -> None:
        if self.sample_size < 1:
            raise ValueError("sample_size must be >= 1")
        if self.aggregators < 1:
            raise ValueError("aggregators must be >= 1")
        if not 0 < self.success_fraction <= 1:
            raise ValueError("success_fraction must be in (0, 1]")
        if self.timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")

    def quorum(self, trainers: int | None = None) -> int:
        """Models an aggregator waits for: ``ceil(success_fraction * s)``, where ``s`` is the
        sample size, or the number of trainers found when the population had fewer."""
        s = self.sample_size if trainers is None else min(self.sample_size, trainers)
        return max(1, math.ceil(self.success_fraction * s - 1e-9))

    def model_weights(self, num_samples: np.ndarray) -> torch.Tensor:
        """Per-trainer averaging weights ``[S]`` from their sample counts."""
        if self.weighting == "samples":
            return torch.as_tensor(np.asarray(num_samples, dtype=np.float64), device="cpu")
        return torch.ones(len(num_samples), dtype=torch.float64, device="cpu")
