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
and the partial sum then crosses it to the parent. An aggregator that is down for a round
(``failures``, any level) reaches none of the clients below it: they get no task and the
round goes on without them. With re-homing (:meth:`Tree.rehomed`) a down leaf's clients reach
the next leaf that is up, and the children of a down aggregator above the leaves send to the
server directly (``parents`` -1 below the top level), as real aggregators fall back to the
coordinator.
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
    """``parents[l]``: each level-``l`` aggregator's parent at level ``l - 1`` (-1: the server,
    for every top-level aggregator and, in a re-homed round, for the children of a down one);
    ``leaf_of``: each client's leaf aggregator; ``links[l]``: level ``l``'s link."""

    parents: tuple[np.ndarray, ...]
    leaf_of: np.ndarray
    links: tuple[Link, ...]
    # (level, index in the level, first round, last round) down
    failures: tuple[tuple[int, int, int, int], ...] = ()

    def _down(self, round_: int) -> list[np.ndarray]:
        """The aggregators down in ``round_`` themselves, per level (bool)."""
        down = [np.zeros(len(p), dtype=bool) for p in self.parents]
        for level, index, first, last in self.failures:
            if first <= round_ <= last:
                down[level][index] = True
        return down

    def down_at(self, round_: int) -> np.ndarray:
        """Which leaf aggregators cannot reach the server in ``round_``: the leaf or an
        aggregator above it is down (bool ``[leaves]``)."""
        down = self._down(round_)
        for level in range(1, self.depth):
            parent = self.parents[level]
            down[level] |= (parent >= 0) & down[level - 1][np.maximum(parent, 0)]
        return down[-1]

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
        """The tree of ``round_`` as real processes re-home (``hierarchy.rehome``): the clients
        of each leaf that is down move to the next leaf that is up (in leaf order, cyclically),
        as clients go down their address lists, and the children of a down aggregator above
        the leaves send to the server directly, as an aggregator's second address is the
        coordinator's. Itself when nothing is down, or every leaf is (all are cut off)."""
        down = self._down(round_)
        leaves = down[-1]
        if not any(d.any() for d in down) or leaves.all():
            return self
        parents = list(self.parents)
        for level in range(1, self.depth):
            parent = parents[level]
            parents[level] = np.where((parent >= 0) & down[level - 1][np.maximum(parent, 0)], -1, parent)
        target = np.arange(len(leaves))
        for leaf in np.flatnonzero(leaves):
            nxt = (leaf + 1) % len(leaves)
            while leaves[nxt]:
                nxt = (nxt + 1) % len(leaves)
            target[leaf] = nxt
        return replace(self, parents=tuple(parents), leaf_of=target[self.leaf_of], failures=())

    def scaled(self, clients: np.ndarray, per_instance: int | None) -> Tree:
        """The round's tree with LIFL's scaling of aggregators with load: a leaf that serves
        more than ``per_instance`` of the round's ``clients`` runs ``ceil(n / per_instance)``
        instances, each with a link of its own (the level's), taking ``per_instance`` of its
        clients in id order (the first stays the leaf itself) and sending its own partial to
        the leaf's parent. Itself when no leaf is over ``per_instance`` (or it is None)."""
        leaves = len(self.parents[-1])
        leaf = self.leaf_of[clients]
        counts = np.bincount(leaf, minlength=leaves)
        if per_instance is None or counts.max(initial=0) <= per_instance:
            return self
        leaf_of, parent = self.leaf_of.copy(), list(self.parents[-1].tolist())
        for a in np.flatnonzero(counts > per_instance):
            members = np.sort(clients[leaf == a])
            for lo in range(per_instance, len(members), per_instance):
                leaf_of[members[lo:lo + per_instance]] = len(parent)
                parent.append(int(self.parents[-1][a]))
        return replace(self, parents=self.parents[:-1] + (np.array(parent, dtype=np.int64),),
                       leaf_of=leaf_of)

    def home(self, node: int) -> int:
        """The leaf aggregator client ``node`` is assigned to."""
        return self.number(self.depth - 1, int(self.leaf_of[node]))


def _ranges(children: int, parents: int) -> np.ndarray:
    """Parent of each of ``children`` items split into ``parents`` contiguous, near-equal runs."""
    return (np.arange(children) * parents) // children


def build_tree(levels: list[int], links: list[Link], num_nodes: int, assign: str, seed: int,
               failures: list[tuple[int, int, int, int | None]] = ()) -> Tree:
    """The tree for ``num_nodes`` clients (ValueError, one line, for an impossible shape);
    ``failures``: (aggregator, first round, last round, level) down from a round to a round
    (both included); the aggregator is numbered within its level, a level of None is the
    leaves'."""
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
    down = []
    for index, first, last, level in failures:
        level = len(levels) - 1 if level is None else level
        if not 0 <= level < len(levels):
            raise ValueError(f"failures: level {level} is not one of the tree's levels 0..{len(levels) - 1}")
        if not 0 <= index < levels[level] or not 1 <= first <= last:
            raise ValueError(f"failures: aggregator {index} (of {levels[level]} on level {level}) "
                             f"from round {first} to {last} is not an aggregator and a round range")
        down.append((level, index, first, last))
    return Tree(tuple(parents), leaf, tuple(links), tuple(down))


def _queue(arrivals: np.ndarray, sizes: np.ndarray, link: Link) -> float:
    """When the last of the messages arriving at ``arrivals`` has crossed ``link``'s ingress
    (served one after the other in arrival order): eager aggregation adds each on arrival."""
    t = 0.0
    for i in np.argsort(arrivals, kind="stable"):
        t = max(t, float(arrivals[i])) + float(sizes[i]) / link.bandwidth_Bps
    return t


def upward(tree: Tree, clients: np.ndarray, arrival: np.ndarray, up_bytes: np.ndarray,
           partial_bytes: int) -> tuple[float, np.ndarray]:
    """When the server holds every partial sent to it by the delivered ``clients``' aggregators
    (the uploads reach their leaves at ``arrival`` with ``up_bytes`` each), and the messages
    sent per tier (``[depth]``: tier 0 is the server's link, which also carries the partials of
    aggregators re-homed to the server). An aggregator with no delivered child sends nothing."""
    into, times = tree.leaf_of[clients], np.asarray(arrival, dtype=float)
    sizes = np.broadcast_to(np.asarray(up_bytes, dtype=float), len(clients))
    messages = np.zeros(tree.depth, dtype=np.int64)
    at_server: list[float] = []
    for level in range(tree.depth - 1, -1, -1):
        link = tree.links[level]
        aggs = np.unique(into)
        leave = np.array([_queue(times[into == a], sizes[into == a], link) + link.seconds(partial_bytes)
                          for a in aggs])
        parent = tree.parents[level][aggs]
        up = parent >= 0
        messages[level] += int(up.sum())
        messages[0] += int((~up).sum())
        at_server.extend(leave[~up].tolist())
        into, times, sizes = parent[up], leave[up], np.full(int(up.sum()), float(partial_bytes))
    return max(at_server, default=0.0), messages


def downward_s(tree: Tree, clients: np.ndarray, nbytes: int) -> np.ndarray:
    """Extra downlink seconds of each of the round's ``clients``: down the tree from the
    server, each aggregator forwarding the model to its children in the round one after the
    other on its link (the last child waits for the whole fan-out)."""
    delay = np.zeros(len(clients))
    node = tree.leaf_of[clients]                       # each client's ancestor at this level
    below = np.ones(len(clients), dtype=bool)          # ... still below an aggregator's link
    fan = np.bincount(node, minlength=len(tree.parents[-1]))
    for level in range(tree.depth - 1, -1, -1):
        link = tree.links[level]
        delay[below] += link.latency_s + fan[node[below]] * nbytes / link.bandwidth_Bps
        if not level:
            break
        parent = tree.parents[level][np.unique(node[below])]
        fan = np.bincount(parent[parent >= 0], minlength=len(tree.parents[level - 1]))
        up = tree.parents[level][node]
        below &= up >= 0                               # re-homed to the server: served from there
        node = np.where(below, up, 0)
    return delay


def tree_mean(tree: Tree, clients: np.ndarray, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The weighted mean of ``rows`` summed up the tree: each leaf sums its clients' weighted
    rows (in client order), each parent its children's partial sums, the server the partials
    sent to it (the top level's, in order, then those of aggregators re-homed to it, lowest
    level first) and divides by the total weight. Equal to the flat mean up to float rounding."""
    w = weights.to(rows.dtype)
    parts = {}
    leaf = tree.leaf_of[clients]
    for a in np.unique(leaf):
        pick = torch.from_numpy(np.flatnonzero(leaf == a))
        parts[int(a)] = (w[pick] @ rows[pick], w[pick].sum())
    at_server: list[tuple[torch.Tensor, torch.Tensor]] = []
    for level in range(tree.depth - 1, 0, -1):
        up: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for a in sorted(parts):
            p = int(tree.parents[level][a])
            s, t = parts[a]
            if p < 0:
                at_server.append((s, t))
            elif p in up:
                up[p] = (up[p][0] + s, up[p][1] + t)
            else:
                up[p] = (s, t)
        parts = up
    sums = [parts[a] for a in sorted(parts)] + at_server
    total = sum(t for _, t in sums)
    acc = None
    for s, _ in sums:
        acc = s if acc is None else acc + s
    return acc / total
