"""Asynchronous gossip learning: a node's clocks, whom it exchanges with, what it does with a model.

A node's exchange clock ticks after gaps ``algorithm.clock_gap(seed, node, k)``; at its
``k``-th tick it picks the neighbour :func:`pick_peer` draws from ``(seed, node, k)`` and,
by ``mode`` (:func:`exchange`), pushes its model, pulls the neighbour's, or both. A received
model is merged (``algorithm.merge_models``) and, with one clock per node, trained on at
once (:func:`trains_on_arrival`); with dual clocks (DADAO) training has its own clock, whose
ticks that find the node busy or offline are skipped (:func:`tick_trains`). A run lasts
:func:`end_round` periods; rows are recorded at :func:`eval_rounds`.

Both executors draw the same clocks and peers. The simulator handles many nodes' events per
window in time order (vectorized draws: :func:`pick_peers`); a peer runs :class:`Clock`, a
state machine over its own exchange clock and evaluation times: the executor passes the
time in, the clock answers exchange with this peer, record this round's row, or wait.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gossamer import rng


def pick_peer(seed: int, node: int, k: int, neighbours: Sequence[int]) -> int:
    """The neighbour ``node`` exchanges with at its ``k``-th tick (-1: it has none)."""
    if not len(neighbours):
        return -1
    u = rng.uniform_scalar(seed, rng.STREAM_GOSSIP, node, k, 1)
    return int(neighbours[int(u * len(neighbours))])


def pick_peers(seed: int, nodes: np.ndarray, ks: np.ndarray, indptr: np.ndarray,
               indices: np.ndarray) -> np.ndarray:
    """:func:`pick_peer` for many ticks at once over CSR neighbour lists (the same draws)."""
    indptr, indices = np.asarray(indptr), np.asarray(indices)
    lo, hi = indptr[nodes], indptr[nodes + 1]
    u = rng.uniform(seed, rng.STREAM_GOSSIP, nodes, ks, 1)
    pick = np.minimum(lo + (u * (hi - lo)).astype(np.int64), max(len(indices) - 1, 0))
    return np.where(hi > lo, indices[pick] if len(indices) else -1, -1)


def exchange(mode: str) -> tuple[bool, bool]:
    """(push the own model, pull the neighbour's) at a tick of the exchange clock."""
    return mode in ("push", "push_pull"), mode in ("pull", "push_pull")


def trains_on_arrival(algorithm: Any) -> bool:
    """One clock: a received model is merged, then trained on. Dual clocks: merged only."""
    return algorithm.clocks != "dual"


def tick_trains(online: bool, busy: bool) -> bool:
    """Dual clocks: a computation tick starts a local update only on an idle node that is up."""
    return online and not busy


def end_round(algorithm: Any, stop: Any) -> int:
    """The last period the run reaches: ``stop.rounds``, or fewer by ``stop.max_sim_time_s``."""
    if stop.max_sim_time_s is None:
        return stop.rounds
    return min(stop.rounds, math.ceil(stop.max_sim_time_s / algorithm.period_s))


def eval_rounds(every: int, last: int) -> list[int]:
    """Rounds (periods) whose row is recorded: every ``every``-th and the last."""
    rounds = list(range(every, last + 1, every))
    return rounds if rounds and rounds[-1] == last else rounds + [last]


@dataclass(frozen=True)
class Exchange:
    k: int          # the tick
    peer: int       # -1: no neighbour


@dataclass(frozen=True)
class Record:
    round: int


@dataclass(frozen=True)
class Wait:
    seconds: float


@dataclass
class Clock:
    """One node's exchange clock and evaluation times since its start (seconds)."""

    algorithm: Any
    seed: int
    node: int
    neighbours: Sequence[int]
    evals: list[int]
    k: int = 0
    wake: float = field(init=False)
    i: int = 0

    def __post_init__(self) -> None:
        self.wake = self.algorithm.clock_gap(self.seed, self.node, 0)

    def next(self, now: float) -> Exchange | Record | Wait | None:
        """What is due at ``now``: the next exchange, a row, a wait, or None (the run is over).
        An exchange due before a row comes first."""
        if self.i >= len(self.evals):
            return None
        due = self.evals[self.i] * self.algorithm.period_s
        if self.wake <= now and self.wake < due:
            action = Exchange(self.k, pick_peer(self.seed, self.node, self.k, self.neighbours))
            self.k += 1
            self.wake += self.algorithm.clock_gap(self.seed, self.node, self.k)
            return action
        if due <= now:
            self.i += 1
            return Record(self.evals[self.i - 1])
        return Wait(min(self.wake, due) - now)
