import math

import numpy as np
import pytest
import torch

from gossamer.algorithms import ALGORITHMS, MoDeST
from gossamer.algorithms.dl.modest import aggregate, probe, quorum_mask, rank, sample


def test_sample_is_the_same_at_every_node_with_the_same_view():
    view = np.arange(50)
    a = sample(view, seed=3, round=7, k=10)
    b = sample(np.random.default_rng(1).permutation(view), seed=3, round=7, k=10)   # another node's order
    assert np.array_equal(a, b) and len(set(a.tolist())) == 10
    assert not np.array_equal(a, sample(view, seed=3, round=8, k=10))              # fresh every round
    assert not np.array_equal(a, sample(view, seed=4, round=7, k=10))
    assert np.array_equal(rank(view, 3, 7)[:10], a)


def test_sample_adapts_to_nodes_that_left_and_joined():
    view = np.arange(40)
    before = sample(view, seed=0, round=5, k=8)
    gone = before[[1, 4]]
    after = sample(np.setdiff1d(view, gone), seed=0, round=5, k=8)
    assert not np.isin(gone, after).any()
    # only the leavers are replaced, by the next nodes of the same ranking
    assert np.array_equal(after, [n for n in rank(view, 0, 5) if n not in gone][:8])
    joined = sample(np.arange(41), seed=0, round=5, k=8)
    assert set(joined) - set(before) <= {40}


def test_probe_replaces_silent_candidates_wave_by_wave():
    found = probe(np.array([5, 2, 7, 1]), np.array([True, False, True, True]), 2)
    assert found.chosen.tolist() == [5, 7] and found.wave.tolist() == [0, 1]
    assert found.skipped.tolist() == [2] and found.waves == 1
    everyone = probe(np.arange(6), np.ones(6, dtype=bool), 3)
    assert everyone.chosen.tolist() == [0, 1, 2] and everyone.waves == 0 and len(everyone.skipped) == 0
    # ranking exhausted: what answered, after waiting out every failed wave
    short = probe(np.array([4, 3, 9]), np.array([False, True, False]), 2)
    assert short.chosen.tolist() == [3] and short.skipped.tolist() == [4, 9] and short.waves == 2
    assert len(probe(np.empty(0, dtype=np.int64), np.empty(0, dtype=bool), 2).chosen) == 0


def test_quorum_mask_takes_the_earliest_arrivals():
    arrival = np.array([[3.0, 1.0, np.inf, 2.0],
                        [np.inf, 5.0, np.inf, np.inf],
                        [1.0, 1.0, 1.0, 0.5]])
    mask = quorum_mask(arrival, 2)
    assert mask.tolist() == [[False, True, False, True],
                             [False, True, False, False],        # fewer than q arrived: all of them
                             [True, False, False, True]]         # ties go to the lower column


def test_aggregate_exact_weighted_averages():
    models = torch.tensor([[1.0, 0.0], [3.0, 2.0], [5.0, 4.0]])
    assert torch.allclose(aggregate(models, torch.tensor([1.0, 3.0, 0.0])), torch.tensor([2.5, 1.5]))
    per_aggregator = aggregate(models, torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]], dtype=torch.float64))
    assert torch.allclose(per_aggregator, torch.tensor([[2.0, 1.0], [4.0, 3.0]]))


def test_quorum_and_weights():
    algo = MoDeST(sample_size=10, aggregators=2, success_fraction=0.7)
    assert algo.quorum() == 7 == math.ceil(0.7 * 10 - 1e-9)        # 0.7 * 10 is 7.000000000000001
    assert algo.quorum(trainers=3) == 3 and MoDeST(sample_size=4).quorum() == 4
    assert MoDeST(success_fraction=0.01).quorum() == 1
    assert algo.model_weights(np.array([3, 5])).tolist() == [1.0, 1.0]
    assert MoDeST(weighting="samples").model_weights(np.array([3, 5])).tolist() == [3.0, 5.0]


@pytest.mark.parametrize("params, message", [
    ({"sample_size": 0}, "sample_size"), ({"aggregators": 0}, "aggregators"),
    ({"success_fraction": 0.0}, "success_fraction"), ({"success_fraction": 1.5}, "success_fraction"),
    ({"timeout_s": 0}, "timeout_s"),
])
def test_invalid_parameters_are_one_line_errors(params, message):
    with pytest.raises(ValueError, match=message):
        ALGORITHMS.get("modest").from_params(params)


def test_registered_as_a_sampled_dl_algorithm():
    algo = ALGORITHMS.get("modest").from_params({"sample_size": 5, "aggregators": 2})
    assert algo.family == "dl" and algo.pattern == "sampled_dl" and algo.aggregators == 2
