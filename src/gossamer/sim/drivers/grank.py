"""G-Rank (:mod:`gossamer.algorithms.dl.grank`) on the simulated clock, every node at once.

One round is ``period_s`` simulated seconds. The nodes online at its start (availability:
churn) each issue ``queries_per_round`` queries drawn from their user group's tastes, rank the
results from their own click log, explore with a swap, and click by the position-biased click
model (``data/clicks.py``); the clicks join their logs. Then each online node pushes a sample of
its log to a neighbour it finds similar; a message to a node that is offline is lost (its bytes
are still sent). Similarities are recomputed from the logs at the end of the round.

Every evaluation measures every node's NDCG@k over its group's query distribution (the
expected NDCG: every query's ranking without the exploration swap, weighted by how often the
group asks it): the mean and minimum in ``metrics.csv``, each node's in ``nodes.csv``.
Draws (queries, swaps, clicks, peers, samples) are counter-based on ``(seed, node, round)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from gossamer import rng, wire
from gossamer.algorithms.dl.grank import (
    RECORD_BYTES,
    click_scores,
    explore,
    pick_peers,
    rank,
    sample_log,
    similarity,
)
from gossamer.data.clicks import ndcg_at_k
from gossamer.sim.drivers.base import Driver, _to_numpy
from gossamer.sim.experiment import Experiment

_EVAL_ROWS = 1 << 22          # click counts gathered per evaluation block (bounds its memory)
_STATE = ("counts", "sim", "origin", "query", "item", "held", "first_nodes", "last_nodes")


class GRankDriver(Driver):
    columns = Driver.columns + ["ndcg", "ndcg_min", "online", "clicks", "log_records", "messages"]
    node_metric = "ndcg"

    def __init__(self, exp: Experiment) -> None:
        super().__init__(exp)
        self.algorithm, self.world, n = exp.algorithm, exp.clicks, exp.num_nodes
        q, i = self.world.num_queries, self.world.num_items
        self.counts = np.zeros((n, n, q, i), dtype=np.int32)    # [viewer, origin, query, item]
        self.sim = np.zeros((n, n))
        self.origin = np.zeros(0, dtype=np.int64)                # the records, in creation order
        self.query = np.zeros(0, dtype=np.int64)
        self.item = np.zeros(0, dtype=np.int64)
        self.held = np.zeros((n, 0), dtype=bool)                 # [N, R]: who holds which record
        topo = exp.topology
        self.adjacency = np.zeros((n, n), dtype=bool)
        self.adjacency[np.repeat(np.arange(n), np.diff(topo.indptr)), topo.indices] = True
        self.adjacency[np.arange(n), np.arange(n)] = False
        self.messages = 0
        self.last_online = n
        self.first_nodes: np.ndarray | None = None               # each node's NDCG at the start
        self.last_nodes: np.ndarray | None = None

    # --- one round -------------------------------------------------------------------------
    def _rankings(self, nodes: np.ndarray, queries: np.ndarray) -> np.ndarray:
        """``[B, I]``: the ranking node ``nodes[b]`` gives query ``queries[b]`` from its log."""
        scores = click_scores(self.counts[nodes, :, queries, :], self.sim[nodes], self.algorithm.offset)
        popularity = self.counts.sum(axis=(1, 2))[nodes]
        return rank(scores, self.world.item_tags[:, queries].T, popularity)

    def _append(self, nodes: np.ndarray, queries: np.ndarray, items: np.ndarray) -> None:
        """New click records: each held by the node that clicked."""
        k = len(nodes)
        self.origin = np.concatenate([self.origin, nodes])
        self.query = np.concatenate([self.query, queries])
        self.item = np.concatenate([self.item, items])
        held = np.zeros((len(self.held), k), dtype=bool)
        held[nodes, np.arange(k)] = True
        self.held = np.concatenate([self.held, held], axis=1)
        np.add.at(self.counts, (nodes, nodes, queries, items), 1)

    def _search(self, up: np.ndarray, r: int) -> None:
        algo, world, seed = self.algorithm, self.world, self.exp.cfg.seed
        reps = algo.queries_per_round
        nodes, rep = np.repeat(up, reps), np.tile(np.arange(reps), len(up))
        queries = world.sample_queries(seed, nodes, r, rep)
        shown = self._rankings(nodes, queries)[:, :min(algo.display, world.num_items)]
        d = shown.shape[1]
        u = rng.uniform(seed, rng.STREAM_CLICKS, nodes[:, None], r, rep[:, None], np.arange(1, 4 + d))
        shown = explore(shown, u[:, :3], algo.swap_prob)
        b, pos = np.nonzero(u[:, 3:] < world.click_probability(nodes, queries, shown))
        self._append(nodes[b], queries[b], shown[b, pos])

    def _gossip(self, up: np.ndarray, online: np.ndarray, r: int) -> None:
        algo, seed, n = self.algorithm, self.exp.cfg.seed, len(online)
        key = algo.queries_per_round                              # a repeat index no query uses
        peers = pick_peers(self.adjacency[up], self.sim[up], rng.uniform(seed, rng.STREAM_CLICKS, up, r, key, 0))
        senders, peers = up[peers >= 0], peers[peers >= 0]
        records = len(self.origin)
        u = rng.uniform(seed, rng.STREAM_CLICKS, senders[:, None], r, key, 1 + np.arange(records))
        sample = sample_log(self.held[senders], u, algo.sample_rate)
        nbytes = wire.HEADER_BYTES + RECORD_BYTES * sample.sum(axis=1)
        delivered = online[peers]
        self.messages += len(senders)
        self.bytes_up += int(nbytes.sum())
        self.bytes_down += int(nbytes[delivered].sum())
        incoming = np.zeros((n, records), dtype=bool)
        np.logical_or.at(incoming, peers[delivered], sample[delivered])
        new = incoming & ~self.held
        self.held |= new
        v, rec = np.nonzero(new)
        np.add.at(self.counts, (v, self.origin[rec], self.query[rec], self.item[rec]), 1)

    def run_round(self) -> None:
        r = self.round + 1
        online = self.exp.online(self.sim_time)
        up = np.flatnonzero(online)
        self.last_online = len(up)
        with self.timer("train_s"):
            self._search(up, r)
        if self.algorithm.gossip and len(up):
            with self.timer("communicate_s"):
                self._gossip(up, online, r)
        with self.timer("train_s"):
            self.sim = similarity(self.counts, self.algorithm.top_queries)
        self.node_steps += len(up) * self.algorithm.queries_per_round
        self.sim_time += self.algorithm.period_s
        self.round = r

    # --- measurement ------------------------------------------------------------------------
    def node_ndcg(self) -> np.ndarray:
        """``[N]``: each node's NDCG@k, expected over its group's queries (no exploration)."""
        world, n, q = self.world, self.exp.num_nodes, self.world.num_queries
        nodes, queries = np.repeat(np.arange(n), q), np.tile(np.arange(q), n)
        per_query = np.empty(n * q)
        step = max(1, _EVAL_ROWS // max(1, n * world.num_items))      # rows of [N, I] scores at once
        for lo in range(0, n * q, step):
            rows = slice(lo, lo + step)
            rel = world.relevance[world.group_of[nodes[rows]], queries[rows]]
            per_query[rows] = ndcg_at_k(rel, self._rankings(nodes[rows], queries[rows]), self.algorithm.ndcg_k)
        return (per_query.reshape(n, q) * world.query_probs[world.group_of]).sum(axis=1)

    def evaluate(self) -> dict[str, Any]:
        with self.timer("eval_s"):
            per_node = self.node_ndcg()
        if self.first_nodes is None:
            self.first_nodes = per_node
        self.last_nodes = per_node
        self.node_accuracy = (np.arange(len(per_node)), per_node)
        row = self.base_row()
        row.update(ndcg=float(per_node.mean()), ndcg_min=float(per_node.min()), online=self.last_online,
                   clicks=len(self.origin), log_records=float(self.held.sum(axis=1).mean()),
                   messages=self.messages)
        return row

    def summary(self) -> dict[str, Any]:
        if self.first_nodes is None or self.last_nodes is None:
            return {}
        return {"first_ndcg": float(self.first_nodes.mean()), "final_ndcg": float(self.last_nodes.mean()),
                "final_ndcg_min": float(self.last_nodes.min()),
                "nodes_ndcg_rose": float((self.last_nodes > self.first_nodes).mean()),
                "click_records": len(self.origin), "messages": self.messages}

    def global_params(self) -> None:
        """No model: G-Rank's state is the click logs (in the checkpoint)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["grank"] = {k: None if getattr(self, k) is None else torch.from_numpy(np.ascontiguousarray(
            getattr(self, k))) for k in _STATE}
        state["grank_counters"] = {"messages": self.messages, "last_online": self.last_online}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for k, v in _to_numpy(state["grank"]).items():
            setattr(self, k, None if v is None else v.copy())
        self.messages = int(state["grank_counters"]["messages"])
        self.last_online = int(state["grank_counters"]["last_online"])
