"""Random walks as a specification: where tokens start, where a token goes, what a visit weighs."""

import numpy as np
import torch

from gossamer.algorithms.dl.random_walk import RandomWalk
from gossamer.protocols import random_walk as protocol
from gossamer.topology import Topology

STAR = Topology(4, np.array([[0, 1], [0, 2], [0, 3]]))         # 0 in the middle


def test_tokens_start_at_distinct_nodes_while_there_are_enough():
    assert sorted(protocol.start_nodes(0, 10, 10).tolist()) == list(range(10))
    assert len(protocol.start_nodes(0, 3, 5)) == 5               # more tokens than nodes
    assert protocol.start_nodes(1, 10, 4).tolist() == protocol.start_nodes(1, 10, 4).tolist()


def test_a_token_that_cannot_reach_its_draw_redraws_with_the_same_uniform_and_stays_when_none_can():
    algo, mu = RandomWalk(walk="simple"), np.full(4, 0.25)
    d = protocol.draw(algo, STAR, 0, np.array([0]), np.array([0]), np.zeros((1, 4)), mu, r=1)
    allowed = d.cand.nodes >= 0
    first = int(protocol.choose(algo, d, allowed)[0])
    assert first in (1, 2, 3)
    allowed &= d.cand.nodes != first                            # down: the peer's push failed
    second = int(protocol.choose(algo, d, allowed)[0])
    assert second in (1, 2, 3) and second != first
    assert protocol.choose(algo, d, np.zeros_like(allowed))[0] == -1


def test_the_draws_of_tokens_together_equal_their_draws_one_by_one():
    algo, mu = RandomWalk(walk="srrw", alpha=2.0), np.full(4, 0.25)
    tokens, nodes = np.array([0, 1, 2]), np.array([0, 1, 0])
    visits = np.array([[3, 0, 1, 0], [0, 2, 0, 0], [0, 0, 0, 5]])
    def next_nodes(pick):
        d = protocol.draw(algo, STAR, 5, tokens[pick], nodes[pick], visits[pick], mu, 4)
        return protocol.choose(algo, d, d.cand.nodes >= 0).tolist()

    together = next_nodes([0, 1, 2])
    alone = [next_nodes([t])[0] for t in range(3)]
    assert together == alone
    assert protocol.visit_keys(4, 3, tokens).tolist() == [9, 10, 11]


def test_a_visit_is_weighted_only_when_the_walks_target_is_not_the_data_distribution():
    algo = RandomWalk(walk="simple")
    assert protocol.visit_weights(algo, np.array([10, 10, 10, 10]), np.full(4, 0.25)) is None
    w = protocol.visit_weights(algo, np.array([10, 10, 10, 10]), algo.target(STAR.degrees()))
    assert w.tolist() == [0.5, 1.5, 1.5, 1.5]                   # the hub is visited 3x as often

    class Trainer:                                               # one step: +1 on every value
        def train(self, rows, nodes, keys, inplace):
            rows += 1.0
            return "result"

    rows, result = protocol.train_visits(Trainer(), torch.zeros(2, 3), np.array([0, 1]), np.array([0, 1]), w)
    assert result == "result" and rows.tolist() == [[0.5] * 3, [1.5] * 3]
