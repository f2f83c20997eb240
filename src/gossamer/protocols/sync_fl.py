"""Synchronous FL rounds as a state machine: who is selected, which uploads count, when the
round closes.

Events: the round opens with its candidates; an upload arrives at time ``t`` (seconds since
the round opened: simulated in the simulator, wall-clock on the runtime); the round's wait
ends (every selected client answered or failed, or the executor's timeout). Decisions:

- selection: the algorithm's ``select`` with the round's counter-based draw
  ``rng.generator(seed, STREAM_SELECT, round)`` (both executors select the same clients);
- the expected count (DP-FedAvg's denominator) and, with over-selection, the ``wanted``
  number of uploads after which the round closes (Bonawitz et al.'s over-selection);
- a deadline (``deadline_s``): uploads after it are dropped;
- every other arrival is accepted until the round closes.

Executors: ``sim/drivers/sync_fl.py`` computes every arrival time from the schedule before
training and feeds the delivered uploads in time order (ties by position), so dropped
clients are never trained; ``runtime/fl_server.py`` feeds uploads as they arrive and refuses
the ones the round no longer accepts.
"""

from __future__ import annotations

import numpy as np

from gossamer import rng


class SyncRound:
    """Round ``number`` of ``algorithm`` among ``candidates`` (sorted int64 ids)."""

    def __init__(self, algorithm, seed: int, number: int, candidates: np.ndarray) -> None:
        self.number = number
        self.candidates = len(candidates)
        self.selected = algorithm.select(candidates, rng.generator(seed, rng.STREAM_SELECT, number))
        self.expected = algorithm.expected_clients(len(candidates)) if len(candidates) else 0
        self.deadline = algorithm.deadline_s
        self.wanted = (min(len(self.selected), algorithm.wanted(len(candidates)))
                       if algorithm.over_selection else None)
        self.accepted: list[int] = []
        self.closed_at: float | None = None           # set when the wanted uploads are in

    @property
    def closed(self) -> bool:
        return self.closed_at is not None

    def arrive(self, client: int, t: float) -> bool:
        """An upload of ``client`` at ``t``: True if the round takes it."""
        if self.closed or (self.deadline is not None and t > self.deadline):
            return False
        self.accepted.append(int(client))
        if self.wanted is not None and len(self.accepted) >= self.wanted:
            self.closed_at = t
        return True

    def end(self, last_arrival: float) -> float:
        """When the round ends, given the latest arrival the executor saw (or waited for)."""
        if self.closed:
            return self.closed_at
        return last_arrival if self.deadline is None else min(last_arrival, self.deadline)

    def replay(self, arrival: np.ndarray, delivered: np.ndarray) -> tuple[np.ndarray, float]:
        """The simulator's round: every trained client's arrival time (``arrival``, relative
        to the round's start) and whether its upload arrives; returns which clients finish the
        round (accepted, or lost in flight before the round ended: they trained) and its end."""
        keep = np.zeros(len(arrival), dtype=bool)
        if len(arrival) == 0:
            return keep, 0.0
        order = np.lexsort((np.arange(len(arrival)), arrival))
        if self.deadline is None and self.wanted is None:   # every delivered upload is taken
            keep[:] = delivered
            self.accepted += order[delivered[order]].tolist()
        else:
            for i in order:
                if delivered[i]:
                    keep[i] = self.arrive(i, float(arrival[i]))
        end = self.end(float(arrival.max()))
        keep |= ~delivered & (arrival <= end)
        return keep, end
