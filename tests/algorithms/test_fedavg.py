import numpy as np
import pytest
import torch

from gossamer.algorithms import FedAvg


def test_weighted_average_of_two_clients_by_hand():
    algo = FedAvg()
    state = algo.init_state(torch.tensor([1.0, 2.0, 3.0]))
    trained = torch.tensor([[2.0, 2.0, 2.0], [5.0, -1.0, 0.0]])
    sent = algo.client_message(trained, state.params)
    new = algo.aggregate(state, sent, np.array([30, 10]))
    # (30 * [2,2,2] + 10 * [5,-1,0]) / 40
    assert torch.allclose(new.params, torch.tensor([2.75, 1.25, 1.5]))
    assert new.round == 1


def test_uniform_weighting_and_server_lr():
    algo = FedAvg(weighting="uniform", server_lr=0.5)
    state = algo.init_state(torch.zeros(2))
    new = algo.aggregate(state, torch.tensor([[2.0, 0.0], [0.0, 4.0]]), np.array([1, 99]))
    assert torch.allclose(new.params, torch.tensor([0.5, 1.0]))     # half-way to the mean model


def test_selection_fraction_is_deterministic_under_a_seed():
    algo = FedAvg(client_fraction=0.3, min_clients=2)
    cands = np.arange(10)
    a = algo.select(cands, np.random.default_rng(1))
    b = algo.select(cands, np.random.default_rng(1))
    assert len(a) == 3 and np.array_equal(a, b) and len(set(a)) == 3
    assert len(algo.select(np.arange(4), np.random.default_rng(1))) == 2     # min_clients


def test_bad_params_rejected():
    with pytest.raises(ValueError, match="client_fraction"):
        FedAvg.from_params({"client_fraction": 1.5})
    with pytest.raises(ValueError):
        FedAvg.from_params({"no_such_field": 1})


def test_robust_aggregator_slot_resists_an_outlier():
    algo = FedAvg.from_params({"aggregator": "median"})
    state = algo.init_state(torch.zeros(2))
    models = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [1e6, -1e6]])
    new = algo.aggregate(state, models, np.array([1, 1, 1, 1]))
    assert torch.allclose(new.params, torch.tensor([2.5, 1.5]))
    mean = FedAvg().aggregate(state, models, np.array([1, 1, 1, 1]))
    assert mean.params.abs().max() > 1e5


def test_unknown_aggregator_is_a_config_error():
    with pytest.raises(ValueError, match="unknown aggregator 'avg'"):
        FedAvg.from_params({"aggregator": "avg"})


def test_bristle_at_the_server_keeps_the_models_closest_to_the_global_model():
    algo = FedAvg(aggregator="bristle", aggregator_params={"f": 1}, weighting="uniform")
    state = algo.init_state(torch.zeros(3))
    models = torch.tensor([[100.0, 100.0, 100.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    new = algo.aggregate(state, models, np.ones(4))
    assert torch.allclose(new.params, torch.full((3,), 1 / 3))     # the far model (row 0) is dropped


def test_only_plain_mean_aggregation_declares_mean_of_models():
    """``mean_of_models`` lets an executor hand ``aggregate_mean`` the uploads' mean: true only
    where ``aggregate`` needs nothing else (not for a robust rule, client momentum, SCAFFOLD,
    FedAMD, or a user subclass that changes what is uploaded)."""
    from dataclasses import dataclass

    from gossamer.algorithms import ALGORITHMS

    assert all(ALGORITHMS.get(n).from_params({}).mean_of_models
               for n in ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad"))
    assert not any(ALGORITHMS.get(n).from_params({}).mean_of_models for n in ("scaffold", "fedamd"))
    assert not FedAvg(aggregator="median").mean_of_models
    assert not FedAvg(momentum_beta=0.9).mean_of_models

    @dataclass(frozen=True)
    class Doubled(FedAvg):
        def client_message(self, trained, start):
            return 2 * trained - start

    assert not Doubled().mean_of_models


@pytest.mark.parametrize("server_optimizer", ["sgd", "adam"])
def test_aggregate_from_the_mean_equals_aggregate_from_rows(server_optimizer):
    algo = FedAvg(server_optimizer=server_optimizer, server_lr=0.5)
    state = algo.init_state(torch.tensor([1.0, -2.0, 0.5]))
    rows = torch.tensor([[2.0, 0.0, 1.0], [-1.0, 3.0, 0.0], [0.5, 0.5, 0.5]])
    sizes = np.array([5, 1, 2])
    a = algo.aggregate(state, rows, sizes)
    b = algo.aggregate_mean(state, algo.mean_weights(sizes) @ rows)
    assert torch.allclose(a.params, b.params) and a.round == b.round == 1
    assert a.extra.keys() == b.extra.keys()
    assert all(torch.allclose(a.extra[k], b.extra[k]) for k in a.extra)
