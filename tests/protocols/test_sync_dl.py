"""Synchronous DL rounds as a specification: who hears whom, how a node merges, when it merges all."""

import numpy as np
import pytest
import torch

from gossamer import config
from gossamer.algorithms.dl.dpsgd import DPSGD, global_average
from gossamer.config import ConfigError
from gossamer.protocols import sync_dl as protocol
from gossamer.topology import Topology, metropolis_hastings
from tests.conftest import small_config

RING = Topology(5, np.array([[0, 1], [1, 2], [2, 3], [3, 4], [0, 4]]))


def _graph():
    return protocol.static_graph(RING, metropolis_hastings(RING))


def test_on_a_ring_each_node_sends_to_and_hears_from_its_two_neighbours():
    graph = _graph()
    view = protocol.peer_view(graph, 0)
    assert sorted(view.receivers) == [1, 4] and view.senders == [1, 4]
    assert view.weights == pytest.approx({0: 1 / 3, 1: 1 / 3, 4: 1 / 3})


def test_a_node_that_hears_everyone_merges_with_its_row_of_w():
    ids, weights = protocol.held_weights(protocol.peer_view(_graph(), 2), 2, got={1, 3})
    assert ids == [1, 3] and weights.tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3])


def test_a_silent_senders_weight_folds_onto_the_receivers_own():
    ids, weights = protocol.held_weights(protocol.peer_view(_graph(), 2), 2, got={3, 9})   # 9: not a sender
    assert ids == [3] and weights.tolist() == pytest.approx([2 / 3, 1 / 3])


def test_the_row_form_of_a_peer_equals_the_matrix_form_of_the_simulator():
    """Node 4 is down and the message 1 -> 2 was lost: every node that is up merges with
    the same weights whether it folds its row alone or the simulator folds the matrix."""
    graph = _graph()
    online = np.array([True, True, True, True, False])
    delivered = online[graph.src] & online[graph.dst] & ~((graph.src == 1) & (graph.dst == 2))
    w = protocol.round_mixing(graph, online, delivered).toarray()
    for node in np.flatnonzero(online):
        heard = {int(s) for s, d, ok in zip(graph.src, graph.dst, delivered, strict=True) if d == node and ok}
        ids, weights = protocol.held_weights(protocol.peer_view(graph, node), node, heard)
        row = np.zeros(5)
        row[[node] + ids] = weights.numpy()
        assert row == pytest.approx(w[node])
    assert w[4].tolist() == [0, 0, 0, 0, 1]                    # the offline node keeps its model
    assert protocol.round_mixing(graph, np.ones(5, bool), np.ones(len(graph.src), bool)) is None


def test_a_peer_two_rounds_behind_catches_up_with_the_furthest_neighbour():
    def everyone(k):                                            # a static graph
        return {1, 2, 3}

    def after(r, latest):
        return protocol.next_round(r, latest, 100, protocol.gave_up(latest, r, everyone))

    assert after(5, {}) == 6                                    # nobody heard yet
    assert after(5, {1: 6, 2: 5}) == 6                          # one ahead: in step
    assert after(5, {1: 17, 2: 9}) == 17                        # behind: the furthest's round
    assert after(5, {1: 170}) == 100                            # never past the last round
    assert protocol.gave_up({1: 7, 2: 6}, 5, everyone) == {1}   # 1 gave up on round 5; 2 will send


def test_a_peer_ahead_that_never_waited_for_this_node_is_not_a_sign_of_falling_behind():
    """On a dynamic graph a peer may be rounds ahead in a healthy run: it gave up on this node
    only if it finished a round, past this node's, in which this node sends to it."""
    sends_to = {6: {2}, 7: {1}, 8: {3}}.get                   # this node's receivers per round

    def receivers(k):
        return sends_to(k, set())

    latest = {1: 7, 2: 9, 3: 8}                 # 1 finished 6; 2 finished 6..8; 3 finished 7
    assert protocol.gave_up(latest, 5, receivers) == {2}        # 2 went through round 6 without us
    assert protocol.gave_up(latest, 6, receivers) == set()      # round 6's message is sent
    assert protocol.next_round(5, latest, 100, {2}) == 9        # catch up with the one that gave up
    assert protocol.next_round(6, latest, 100, set()) == 7      # healthy: the next round
    assert protocol.round_receivers(_graph(), None, 0, 3) == {1, 4}   # static: every round


def test_the_final_merge_comes_after_the_last_round_only_and_is_the_exact_mean_in_id_order():
    merge = DPSGD(final_merge=True)
    assert [protocol.final_merge_due(merge, r, 3) for r in (1, 2, 3)] == [False, False, True]
    assert not protocol.final_merge_due(DPSGD(), 3, 3)
    models = {2: torch.tensor([3.0, 1.0]), 0: torch.tensor([1.0, 5.0]), 1: torch.tensor([2.0, 0.0])}
    population = torch.stack([models[j] for j in range(3)])
    global_average(population)
    assert protocol.merge_all(models).equal(population[:1])


@pytest.mark.parametrize("change, field", [
    ({"stop": {"rounds": 3, "max_sim_time_s": 10.0}}, "stop.max_sim_time_s"),
    ({"stop": {"rounds": 3, "target_accuracy": 0.5}}, "stop.stop_at_target"),
    ({"faults": {"partitions": [{"at_s": 0, "heal_s": 1, "groups": 2}]}}, "faults.partitions"),
])
def test_the_final_merge_is_refused_where_the_run_end_or_one_exact_average_may_not_come(change, field):
    cfg = config.validate({**small_config("dpsgd"), **change})
    with pytest.raises(ConfigError) as err:
        protocol.check_final_merge(DPSGD(final_merge=True), cfg, gathered=False)
    assert err.value.field == field
    with pytest.raises(ConfigError, match="plain average"):
        protocol.check_final_merge(DPSGD(final_merge=True, aggregator="median"),
                                   config.validate(small_config("dpsgd")), gathered=True)


def test_a_dynamic_topology_gives_every_peer_the_same_round_graph():
    from gossamer.topology.dynamic import one_peer_exponential

    dynamic = one_peer_exponential(8, seed=0)
    graph = protocol.round_graph(_graph(), dynamic, "metropolis_hastings", 3)
    links = dynamic.links(3)
    assert np.array_equal(graph.src, links.src) and np.array_equal(graph.dst, links.dst)
    static = _graph()
    assert protocol.round_graph(static, None, "metropolis_hastings", 3) is static
