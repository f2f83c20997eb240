"""Hierarchical aggregation (a tree of aggregators between clients and the server), as pure
functions: the tree, the times at which eager aggregators forward their partial sums, the
downlink's path delays, the bytes per tier, and the mean summed up the tree.

After LIFL (Shixiong Qi, K. K. Ramakrishnan, Myungjin Lee, "LIFL: A Lightweight, Event-driven
Serverless Platform for Federated Learning", MLSys 2024, arXiv:2405.10968): aggregators near
the clients aggregate eagerly, each upload as it arrives, and forward one partial aggregate up
the tree once their last child has delivered; the server's link carries one message per
top-level aggregator instead of one per client.

``levels`` lists the number of aggregators per level from the top (``[4]``: four aggregators
under the server; ``[2, 8]``: two under the server, eight leaves, four under each). Clients
are assigned to leaves in contiguous id ranges (``assign: contiguous``) or by a seeded
permutation (``random``); aggregators of level ``l + 1`` to their parents of level ``l`` in
contiguous ranges. Each level's aggregators have one link (``latency_s`` and
``bandwidth_Bps``, each direction): their children's messages queue on it in arrival order,
and the partial sum then crosses it to the parent. A leaf aggregator that is down for a round
(``failures``) reaches none of its clients: they get no task and the round goes on without
them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from gossamer import rng


@dataclass(frozen=True)
class Link:
    latency_s: float
    bandwidth_Bps: float

    def seconds(self, nbytes: float) -> float:
        return self.latency_s + nbytes / self.bandwidth_Bps


@dataclass(frozen=True)
class Tree:
    """``parents[l]``: each level-``l`` aggregator's parent at level ``l - 1`` (-1: the server);
    ``leaf_of``: each client's leaf aggregator; ``links[l]``: level ``l``'s link."""

    parents: tuple[np.ndarray, ...]
    leaf_of: np.ndarray
    links: tuple[Link, ...]
    failures: tuple[tuple[int, int, int], ...] = ()     # (leaf, first round, last round) down

    def down_at(self, round_: int) -> np.ndarray:
        """Which leaf aggregators are down in ``round_`` (bool ``[leaves]``)."""
        down = np.zeros(len(self.parents[-1]), dtype=bool)
        for leaf, first, last in self.failures:
            if first <= round_ <= last:
                down[leaf] = True
        return down

    @property
    def depth(self) -> int:
        return len(self.parents)

    @property
    def top(self) -> int:
        """Aggregators directly under the server."""
        return len(self.parents[0])

    # Real processes number the aggregators 0.. level by level from the top (``gossamer
    # aggregator --id``); on the wire aggregator ``g`` is node ``num_clients + g``.
    @property
    def count(self) -> int:
        """Aggregators in all levels."""
        return sum(len(p) for p in self.parents)

    def locate(self, g: int) -> tuple[int, int]:
        """(level, index in its level) of aggregator ``g``; ValueError outside the tree."""
        for level, p in enumerate(self.parents):
            if 0 <= g < len(p):
                return level, g
            g -= len(p)
        raise ValueError("no such aggregator")

    def number(self, level: int, index: int) -> int:
        """The number of aggregator ``index`` of ``level``."""
        return sum(len(p) for p in self.parents[:level]) + index

    def parent(self, g: int) -> int:
        """The aggregator above ``g`` (-1: the server)."""
        level, index = self.locate(g)
        return -1 if level == 0 else self.number(level - 1, int(self.parents[level][index]))

    def rehomed(self, round_: int) -> Tree:
        """The tree of ``round_`` with the clients of each leaf that is down moved to the next
        leaf that is up (in leaf order, cyclically), as real clients re-home down their
        address lists (``hierarchy.rehome``); itself when no leaf, or every leaf, is down."""
        down = self.down_at(round_)
        if not down.any() or down.all():
            return self
        target = np.arange(len(down))
        for leaf in np.flatnonzero(down):
            nxt = (leaf + 1) % len(down)
            while down[nxt]:
                nxt = (nxt + 1) % len(down)
            target[leaf] = nxt
        return replace(self, leaf_of=target[self.leaf_of], failures=())

    def home(self, node: int) -> int:
        """The leaf aggregator client ``node`` is assigned to."""
        return self.number(self.depth - 1, int(self.leaf_of[node]))


def _ranges(children: int, parents: int) -> np.ndarray:
    """Parent of each of ``children`` items split into ``parents`` contiguous, near-equal runs."""
    return (np.arange(children) * parents) // children


def build_tree(levels: list[int], links: list[Link], num_nodes: int, assign: str, seed: int,
               failures: list[tuple[int, int, int]] = ()) -> Tree:
    """The tree for ``num_nodes`` clients (ValueError, one line, for an impossible shape);
    ``failures``: leaf aggregators down from a round to a round (both included)."""
    if not levels:
        raise ValueError("levels must list at least one level of aggregators")
    if len(links) != len(levels):
        raise ValueError(f"links must give one link per level ({len(levels)}), got {len(links)}")
    if any(b < a for a, b in zip(levels, levels[1:], strict=False)) or levels[0] < 1:
        raise ValueError("levels must not shrink going down (each aggregator needs a parent)")
    if levels[-1] > num_nodes:
        raise ValueError(f"{levels[-1]} leaf aggregators for {num_nodes} clients")
    parents = [np.full(levels[0], -1, dtype=np.int64)]
    for above, count in zip(levels, levels[1:], strict=False):
        parents.append(_ranges(count, above).astype(np.int64))
    leaf = _ranges(num_nodes, levels[-1]).astype(np.int64)
    if assign == "random":
        leaf = leaf[rng.generator(seed, rng.STREAM_SYSTEM, 1 << 20).permutation(num_nodes)]
    elif assign != "contiguous":
        raise ValueError(f"assign must be contiguous or random, got {assign!r}")
    for leaf_id, first, last in failures:
        if not 0 <= leaf_id < levels[-1] or not 1 <= first <= last:
            raise ValueError(f"failures: leaf aggregator {leaf_id} (of {levels[-1]}) from round "
                             f"{first} to {last} is not a leaf and a round range")
    return Tree(tuple(parents), leaf, tuple(links), tuple(tuple(f) for f in failures))


def _queue(arrivals: np.ndarray, sizes: np.ndarray, link: Link) -> float:
    """When the last of the messages arriving at ``arrivals`` has crossed ``link``'s ingress
    (served one after the other in arrival order): eager aggregation adds each on arrival."""
    t = 0.0
    for i in np.argsort(arrivals, kind="stable"):
        t = max(t, float(arrivals[i])) + float(sizes[i]) / link.bandwidth_Bps
    return t


def upward(tree: Tree, clients: np.ndarray, arrival: np.ndarray, up_bytes: np.ndarray,
           partial_bytes: int) -> tuple[float, np.ndarray]:
    """When the server holds every top-level partial of the delivered ``clients`` (whose
    uploads reach their leaves at ``arrival`` with ``up_bytes`` each), and the messages sent
    per tier (``[depth]``: tier 0 is the server's). An aggregator with no delivered child sends
    nothing."""
    ready = {tree.depth: (tree.leaf_of[clients], np.asarray(arrival, dtype=float),
                          np.broadcast_to(np.asarray(up_bytes, dtype=float), len(clients)))}
    messages = np.zeros(tree.depth, dtype=np.int64)
    for level in range(tree.depth - 1, -1, -1):
        into, times, sizes = ready[level + 1]
        link = tree.links[level]
        aggs = np.unique(into)
        leave = np.array([_queue(times[into == a], sizes[into == a], link) + link.seconds(partial_bytes)
                          for a in aggs])
        messages[level] = len(aggs)
        ready[level] = (tree.parents[level][aggs], leave, np.full(len(aggs), float(partial_bytes)))
    return float(ready[0][1].max()) if len(ready[0][1]) else 0.0, messages


def downward_s(tree: Tree, clients: np.ndarray, nbytes: int) -> np.ndarray:
    """Extra downlink seconds of each of the round's ``clients``: down the tree from the
    server, each aggregator forwarding the model to its children in the round one after the
    other on its link (the last child waits for the whole fan-out)."""
    delay = np.zeros(len(clients))
    node = tree.leaf_of[clients]                       # each client's ancestor at this level
    fan = np.bincount(node, minlength=len(tree.parents[-1]))
    for level in range(tree.depth - 1, -1, -1):
        link = tree.links[level]
        delay += link.latency_s + fan[node] * nbytes / link.bandwidth_Bps
        if level:
            active = np.unique(node)
            fan = np.bincount(tree.parents[level][active], minlength=len(tree.parents[level - 1]))
        node = tree.parents[level][node]
    return delay


def tree_mean(tree: Tree, clients: np.ndarray, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The weighted mean of ``rows`` summed up the tree: each leaf sums its clients' weighted
    rows (in client order), each parent its children's partial sums, the server the top
    level's and divides by the total weight. Equal to the flat mean up to float rounding."""
    w = weights.to(rows.dtype)
    parts = {}
    leaf = tree.leaf_of[clients]
    for a in np.unique(leaf):
        pick = torch.from_numpy(np.flatnonzero(leaf == a))
        parts[int(a)] = (w[pick] @ rows[pick], w[pick].sum())
    for level in range(tree.depth - 1, 0, -1):
        up: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for a in sorted(parts):
            p = int(tree.parents[level][a])
            s, t = parts[a]
            if p in up:
                up[p] = (up[p][0] + s, up[p][1] + t)
            else:
                up[p] = (s, t)
        parts = up
    total = sum(t for _, t in parts.values())
    acc = None
    for a in sorted(parts):
        acc = parts[a][0] if acc is None else acc + parts[a][0]
    return acc / total
