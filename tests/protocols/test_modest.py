"""MoDeST as a specification: models arrive at a node, time passes, the node trains or aggregates."""

import numpy as np
import pytest
import torch

from gossamer.algorithms.dl.modest import MoDeST, quorum_mask, rank
from gossamer.protocols import modest as protocol
from gossamer.protocols.modest import AGGREGATE, TRAIN, Aggregate, Arrival, Inbox, Train

POOL = np.arange(8)


def _inbox(quorum=2, timeout_s=1.0):
    return Inbox(quorum, timeout_s, lambda r: protocol.trainers(POOL, 0, r))


def _model(sender, t, value=0.0, samples=0):
    return Arrival(sender, torch.full((3,), value), samples, t)


def test_a_trainer_trains_from_the_first_model_and_ignores_later_copies():
    box = _inbox()
    assert box.deliver(2, TRAIN, _model(5, t=0.0, value=1.0))
    assert box.deliver(2, TRAIN, _model(6, t=0.1, value=2.0))
    action = box.next_action(now=0.2, free_since=0.0)
    assert isinstance(action, Train) and action.round == 2 and action.start.sender == 5
    assert not box.deliver(2, TRAIN, _model(7, t=0.3))          # round 2 is done here
    assert box.next_action(now=0.4, free_since=0.3) is None


def test_an_aggregator_averages_once_the_quorum_arrived_in_the_rounds_rank_order():
    box, ranked = _inbox(quorum=2), protocol.trainers(POOL, 0, 3).tolist()
    late, early = ranked[0], ranked[1]                          # arrival order is not rank order
    box.deliver(3, AGGREGATE, _model(early, t=0.0))
    assert box.next_action(now=0.1, free_since=0.0) is None      # one of two
    box.deliver(3, AGGREGATE, _model(late, t=0.2))
    action = box.next_action(now=0.2, free_since=0.0)
    assert isinstance(action, Aggregate) and [a.sender for a in action.arrivals] == [late, early]
    assert not box.deliver(3, AGGREGATE, _model(ranked[2], t=0.3))   # a third, too late


def test_an_aggregator_short_of_its_quorum_averages_what_it_has_after_a_silent_timeout():
    box = _inbox(quorum=3, timeout_s=1.0)
    box.deliver(1, AGGREGATE, _model(4, t=0.0))
    box.deliver(1, AGGREGATE, _model(2, t=0.5))
    assert box.next_action(now=1.4, free_since=0.0) is None      # 0.9 s since the last model
    assert box.wait_s(now=1.4, free_since=0.0, deadline=100.0) == pytest.approx(0.1)
    assert box.wait_s(now=1.4, free_since=0.0, deadline=1.45) == pytest.approx(0.05)
    assert len(box.next_action(now=1.5, free_since=0.0).arrivals) == 2


def test_time_spent_busy_does_not_count_toward_the_timeout():
    box = _inbox(quorum=3, timeout_s=1.0)
    box.deliver(1, AGGREGATE, _model(4, t=0.0))
    assert box.next_action(now=1.5, free_since=1.0) is None      # was training until 1.0
    assert isinstance(box.next_action(now=2.0, free_since=1.0), Aggregate)


def test_the_lowest_round_goes_first_training_before_aggregating_and_overtaken_rounds_are_dropped():
    box = _inbox(quorum=1)
    box.deliver(4, AGGREGATE, _model(1, t=0.0))
    box.deliver(4, TRAIN, _model(2, t=0.0))
    box.deliver(2, TRAIN, _model(3, t=0.0))
    box.deliver(3, TRAIN, _model(3, t=0.0))
    steps = []
    while (action := box.next_action(now=1.0, free_since=0.0)) is not None:
        steps.append((type(action).__name__, action.round))
    assert steps == [("Train", 2), ("Train", 3), ("Train", 4), ("Aggregate", 4)]
    late = _inbox(quorum=2)
    late.deliver(2, AGGREGATE, _model(1, t=0.0))                # round 2 still short of its quorum
    late.deliver(3, AGGREGATE, _model(1, t=0.1))
    late.deliver(3, AGGREGATE, _model(2, t=0.2))
    assert late.next_action(now=0.3, free_since=0.0).round == 3
    assert late.held == {} and not late.deliver(2, AGGREGATE, _model(2, t=0.4))   # round 2 is over


def test_event_by_event_an_aggregator_takes_the_models_the_simulators_quorum_mask_takes():
    arrival = np.array([[0.7, 0.2, np.inf, 0.4, 0.1]])          # trainers in rank order
    ranked = protocol.trainers(POOL, 0, 5)[:5]
    box = Inbox(3, 10.0, lambda r: ranked)
    for col in np.argsort(arrival[0], kind="stable"):
        if np.isfinite(arrival[0, col]):
            box.deliver(5, AGGREGATE, _model(int(ranked[col]), t=float(arrival[0, col])))
            if (action := box.next_action(now=float(arrival[0, col]), free_since=0.0)) is not None:
                break
    taken = [a.sender for a in action.arrivals]
    assert taken == ranked[quorum_mask(arrival, 3)[0]].tolist()


def test_rankings_bootstrap_and_the_weighted_average():
    assert protocol.aggregators(POOL, 0, 4).tolist() == rank(POOL, 0, 5).tolist()
    assert protocol.bootstrap(POOL, 0, 1, 3).tolist() == protocol.trainers(POOL, 0, 1)[:3].tolist()
    models = torch.tensor([[0.0, 0.0], [3.0, 6.0]])
    assert protocol.average(MoDeST(weighting="samples"), models, np.array([2, 1])).tolist() == [1.0, 2.0]
    assert protocol.average(MoDeST(), models, np.array([2, 1])).tolist() == [1.5, 3.0]
