"""The synchronous FL round as a specification: scripted arrivals in, decisions out."""

import numpy as np

from gossamer.algorithms import ALGORITHMS
from gossamer.protocols.sync_fl import SyncRound


def _algo(**params):
    return ALGORITHMS.get("fedavg").from_params(params)


def test_every_selected_upload_counts_and_the_round_waits_for_the_slowest():
    rnd = SyncRound(_algo(), seed=0, number=1, candidates=np.arange(4))
    assert rnd.selected.tolist() == [0, 1, 2, 3] and rnd.expected == 4 and rnd.wanted is None
    assert [rnd.arrive(c, t) for c, t in [(2, 1.0), (0, 3.0), (3, 2.0), (1, 9.0)]] == [True] * 4
    assert not rnd.closed and rnd.end(9.0) == 9.0


def test_over_selection_closes_at_the_wanted_uploads_and_refuses_the_rest():
    rnd = SyncRound(_algo(client_fraction=0.5, over_selection=1.0), seed=0, number=1,
                    candidates=np.arange(8))
    assert len(rnd.selected) == 8 and rnd.wanted == 4 and rnd.expected == 4
    taken = [rnd.arrive(c, t) for c, t in [(5, 1.0), (1, 1.5), (7, 2.0), (0, 2.5), (3, 3.0)]]
    assert taken == [True, True, True, True, False]
    assert rnd.closed and rnd.end(10.0) == 2.5 and rnd.accepted == [5, 1, 7, 0]


def test_a_deadline_drops_later_uploads_and_ends_the_round_at_the_deadline():
    rnd = SyncRound(_algo(deadline_s=2.0), seed=0, number=3, candidates=np.arange(3))
    assert [rnd.arrive(c, t) for c, t in [(0, 0.5), (1, 2.0), (2, 2.5)]] == [True, True, False]
    assert rnd.end(2.5) == 2.0


def test_both_executors_select_the_same_clients_from_the_round_number():
    algo = _algo(client_fraction=0.25)
    a = SyncRound(algo, seed=7, number=5, candidates=np.arange(40))
    b = SyncRound(algo, seed=7, number=5, candidates=np.arange(40))
    c = SyncRound(algo, seed=7, number=6, candidates=np.arange(40))
    assert a.selected.tolist() == b.selected.tolist() != c.selected.tolist()


def test_the_simulators_replay_keeps_lost_uploads_of_clients_that_trained_before_the_end():
    """Arrivals computed from the schedule: clients 0..4 at these times; client 2's upload is
    lost in flight. Over-selection wants 3: the round ends at the third delivered arrival
    (t = 3); client 2 trained and was lost before that, so it finishes the round (counted as a
    lost message), client 4 (t = 5) is dropped untrained."""
    rnd = SyncRound(_algo(client_fraction=0.6, over_selection=1.0), seed=0, number=1,
                    candidates=np.arange(5))
    assert rnd.wanted == 3
    arrival = np.array([1.0, 3.0, 2.0, 2.0, 5.0])
    delivered = np.array([True, True, False, True, True])
    keep, end = rnd.replay(arrival, delivered)
    assert keep.tolist() == [True, True, True, True, False] and end == 3.0
