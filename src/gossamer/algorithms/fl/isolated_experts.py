"""Isolated experts with a router: islands that never talk, combined at inference.

After "Decentralized Diffusion Models" (David McAllister, Matthew Tancik, Jiaming Song, et
al., CVPR 2025, arXiv:2501.05450): the data is split into clusters, one expert per cluster is
trained in complete isolation, and a router trained to predict a sample's cluster combines
them at inference (top-1: the router's most likely expert alone, the paper's best; top-k: the
router-weighted mixture of the k most likely). Here an island is a group of nodes and trains
its expert with FedAvg over its own nodes only; the router is trained by FedAvg over every
node, each sample labelled with its node's island. The pure parts are below; the pattern's
decisions are in ``protocols/experts.py``, run by ``sim/drivers/experts.py`` and, on real
processes, ``runtime/experts.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch

from gossamer import rng
from gossamer.algorithms.base import Algorithm


@dataclass(frozen=True)
class IsolatedExperts(Algorithm):
    """``islands`` experts, each trained by FedAvg (every island node, every round, sample-
    weighted mean) over its own nodes only; ``assign``: ``label_blocks`` sorts the nodes by
    their most frequent label (then the next ones) and cuts them into equal consecutive
    groups, so islands hold disjoint parts of the label space and about as many nodes each;
    ``label_clusters`` groups nodes whose label histograms are alike (k-means; islands may
    differ much in size); ``blocks`` splits node ids into equal consecutive blocks (an island
    per site, by config). The router (the same model with ``islands``
    outputs) is trained by FedAvg over all nodes when ``router`` is true; evaluation reports
    the routed ensemble (``test_accuracy``: top-1 routing; ``topk_accuracy``: the mixture of
    the ``top_k`` most likely experts) and the best single expert on the whole test set."""

    family: ClassVar[str] = "fl"
    pattern: ClassVar[str] = "experts"

    islands: int = 4
    assign: Literal["label_blocks", "label_clusters", "blocks"] = "label_blocks"
    top_k: int = 2
    router: bool = True

    def __post_init__(self) -> None:
        if self.islands < 1:
            raise ValueError("islands must be >= 1")
        if not 1 <= self.top_k <= self.islands:
            raise ValueError("top_k must be between 1 and islands")

    def select(self, candidates: np.ndarray, gen: np.random.Generator) -> np.ndarray:
        """Every candidate trains every round (a synchronous round's selection on real processes)."""
        return np.asarray(candidates, dtype=np.int64)

    def island_of(self, label_hist: np.ndarray, seed: int) -> np.ndarray:
        """Each node's island ``[N]``, from the nodes' label counts ``[N, C]``; every island
        gets at least one node (a one-line error when there are fewer nodes than islands)."""
        n = len(label_hist)
        if n < self.islands:
            raise ValueError(f"islands ({self.islands}) must be at most the {n} nodes holding data")
        blocks = (np.arange(n) * self.islands) // n
        if self.assign == "blocks":
            return blocks
        if self.assign == "label_blocks":
            hist = np.asarray(label_hist)
            key = np.argsort(-hist, axis=1, kind="stable")[:, 0]        # each node's main label
            order = np.lexsort((np.arange(n), key))
            island = np.empty(n, dtype=np.int64)
            island[order] = blocks
            return island
        return label_clusters(label_hist, self.islands, seed)


def label_clusters(label_hist: np.ndarray, k: int, seed: int, iterations: int = 50) -> np.ndarray:
    """k-means (Lloyd) on the nodes' label distributions, k-means++ seeded from counter-based
    draws, ties to the lowest index; an island left empty takes the node farthest from its
    centre. Deterministic for a seed."""
    hist = np.asarray(label_hist, dtype=np.float64)
    p = hist / np.maximum(hist.sum(1, keepdims=True), 1)
    n = len(p)
    u = rng.uniform(seed, rng.STREAM_SYSTEM, np.arange(k), 77)         # one draw per centre
    centres = [p[int(u[0] * n) % n]]
    for j in range(1, k):
        d = np.min(((p[:, None, :] - np.array(centres)[None]) ** 2).sum(-1), axis=1)
        cum = np.cumsum(d)
        pick = int(np.searchsorted(cum, u[j] * cum[-1], side="right")) if cum[-1] > 0 else j % n
        centres.append(p[min(pick, n - 1)])
    centre = np.array(centres)
    assign = np.zeros(n, dtype=np.int64)
    for it in range(iterations):
        dist = ((p[:, None, :] - centre[None]) ** 2).sum(-1)
        new = dist.argmin(1)
        for j in range(k):                                       # no island stays empty
            if not (new == j).any():
                far = int(dist[np.arange(n), new].argmax())
                new[far] = j
        if it > 0 and np.array_equal(new, assign):
            break
        assign = new
        centre = np.stack([p[assign == j].mean(0) for j in range(k)])
    return assign


def route(router_logits: torch.Tensor, expert_logits: torch.Tensor, top_k: int
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Class log-probabilities ``[T, C]`` of the top-1 and the top-``k`` routed ensembles from
    the router's logits ``[T, K]`` and the experts' ``[K, T, C]``: top-1 takes the most likely
    expert's log-softmax; top-k mixes the k most likely experts' probabilities with the
    router's probabilities renormalized over them."""
    probs = torch.softmax(router_logits, dim=-1)                       # [T, K]
    expert_logp = torch.log_softmax(expert_logits, dim=-1).transpose(0, 1)   # [T, K, C]
    weight, which = probs.topk(top_k, dim=-1)                          # [T, k]
    rows = torch.arange(len(probs), device=probs.device)
    top1 = expert_logp[rows, which[:, 0]]
    chosen = expert_logp[rows[:, None], which]                         # [T, k, C]
    mix = torch.logsumexp(chosen + torch.log(weight / weight.sum(-1, keepdim=True))[..., None], dim=1)
    return top1, mix
