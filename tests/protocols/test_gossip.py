"""Gossip as a specification: a node's clock fires, it picks a peer, exchanges, records rows."""

import math

import numpy as np
import pytest

from gossamer.algorithms.dl.gossip import GossipLearning
from gossamer.config import StopConfig
from gossamer.protocols import gossip as protocol
from gossamer.protocols.gossip import Clock, Exchange, Record, Wait


def _run(clock, until=math.inf):
    """Feed the clock the times it asks to wait for; the actions with the time they came at."""
    now, out = 0.0, []
    while (action := clock.next(now)) is not None and now <= until:
        if isinstance(action, Wait):
            now += action.seconds
        else:
            out.append((now, action))
    return out


def test_a_periodic_clock_exchanges_once_a_period_and_records_each_evaluated_round_after_it():
    algo = GossipLearning(period_s=1.0, poisson=False)
    phase = algo.clock_gap(0, 3, 0)                              # random phase in [0, 1)
    actions = _run(Clock(algo, 0, 3, [2, 5, 7], protocol.eval_rounds(2, 5)))
    kinds = [(type(a).__name__, getattr(a, "round", getattr(a, "k", None))) for _, a in actions]
    assert kinds == [("Exchange", 0), ("Exchange", 1), ("Record", 2), ("Exchange", 2),
                     ("Exchange", 3), ("Record", 4), ("Exchange", 4), ("Record", 5)]
    assert [t for t, a in actions if isinstance(a, Exchange)] == pytest.approx([phase + k for k in range(5)])
    assert [t for t, a in actions if isinstance(a, Record)] == [2.0, 4.0, 5.0]


def test_every_exchange_goes_to_the_peer_the_shared_draw_picks():
    algo = GossipLearning(period_s=0.5)
    actions = [a for _, a in _run(Clock(algo, 7, 1, [0, 2, 4], [4]))]
    exchanges = [a for a in actions if isinstance(a, Exchange)]
    assert exchanges and [a.k for a in exchanges] == list(range(len(exchanges)))
    assert [a.peer for a in exchanges] == [protocol.pick_peer(7, 1, a.k, [0, 2, 4]) for a in exchanges]
    assert {a.peer for a in exchanges} == {0, 2, 4}
    lonely = [a for _, a in _run(Clock(algo, 7, 1, [], [2])) if isinstance(a, Exchange)]
    assert lonely and all(a.peer == -1 for a in lonely)          # ticks, but nobody to talk to


def test_the_vectorized_peer_draws_equal_one_draw_at_a_time():
    indptr, indices = np.array([0, 2, 2, 5]), np.array([1, 2, 0, 1, 2])
    nodes, ks = np.array([0, 1, 2, 2, 0]), np.array([0, 3, 1, 9, 4])
    expected = [protocol.pick_peer(3, int(n), int(k), indices[indptr[n]:indptr[n + 1]])
                for n, k in zip(nodes, ks, strict=True)]
    assert protocol.pick_peers(3, nodes, ks, indptr, indices).tolist() == expected
    assert expected[1] == -1                                     # node 1 has no neighbour


def test_what_a_tick_and_an_arrival_do():
    assert [protocol.exchange(m) for m in ("push", "pull", "push_pull")] == [
        (True, False), (False, True), (True, True)]
    assert protocol.trains_on_arrival(GossipLearning()) and not protocol.trains_on_arrival(
        GossipLearning(clocks="dual"))
    assert protocol.tick_trains(online=True, busy=False)
    assert not protocol.tick_trains(online=True, busy=True) and not protocol.tick_trains(online=False, busy=False)


def test_the_run_ends_at_its_last_round_or_earlier_by_simulated_time():
    algo = GossipLearning(period_s=2.0)
    assert protocol.end_round(algo, StopConfig(rounds=10)) == 10
    assert protocol.end_round(algo, StopConfig(rounds=10, max_sim_time_s=7.0)) == 4
    assert protocol.eval_rounds(3, 7) == [3, 6, 7] and protocol.eval_rounds(5, 3) == [3]
