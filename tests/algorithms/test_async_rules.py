"""The asynchronous rules added with the async FL protocol: the General Theory's asynchronous
FedAvg (full add, task-time weights), FAVANO and FedAST, as pure functions and from configs."""

import numpy as np
import pytest
import torch

from gossamer import config
from gossamer.algorithms import ALGORITHMS
from gossamer.algorithms.fl.async_fl import AsyncServerState
from gossamer.algorithms.fl.favano import FAVANO
from gossamer.algorithms.fl.fedast import FedAST
from gossamer.algorithms.fl.general_theory import AsyncFedAvg
from gossamer.sim.drivers import driver_for
from gossamer.sim.experiment import build_experiment
from tests.conftest import small_config

SIZES = np.array([10, 30, 60])


def test_full_add_applies_each_update_unscaled():
    algo = AsyncFedAvg(server_lr=0.5)
    state = algo.init_state(torch.zeros(2))
    out = algo.aggregate(state, torch.tensor([[2.0, 4.0]]), np.array([7]), np.array([1]), SIZES)
    assert torch.equal(out.params, torch.tensor([1.0, 2.0])) and out.version == 1


def test_task_time_weights_make_each_client_count_by_importance_per_unit_of_time():
    """Clients arriving every tau_i seconds, each update weighted (sum_j 1/tau_j) tau_i p_i: over
    a window of T seconds client i moves the model by T (sum_j 1/tau_j) p_i, in proportion to its
    importance and not to how often it arrives (a full add would give T / tau_i)."""
    algo, tau = AsyncFedAvg(aggregation="task_time"), np.array([1.0, 2.0, 4.0])
    state = algo.init_state(torch.zeros(3))
    for c in range(3):                                   # every client measured once
        state = algo.aggregate(state, torch.zeros(1, 3), np.array([0]), np.array([c]), SIZES, task_s=tau[[c]])
    moved = torch.zeros(3)
    for t in range(1, 9):                                # 8 seconds of arrivals, one-hot updates
        for c in np.flatnonzero(t % tau == 0):
            before = state.params.clone()
            state = algo.aggregate(state, torch.eye(3)[[c]], np.array([0]), np.array([c]), SIZES, task_s=tau[[c]])
            moved += state.params - before
    expected = SIZES / SIZES.sum() * 8 * (1 / tau).sum()
    assert torch.allclose(moved, torch.tensor(expected, dtype=torch.float32))


def test_task_time_needs_the_task_times():
    algo = AsyncFedAvg(aggregation="task_time")
    with pytest.raises(ValueError, match="task_s"):
        algo.aggregate(algo.init_state(torch.zeros(2)), torch.zeros(1, 2), np.array([0]), np.array([0]), SIZES)


def test_favano_averages_the_pulled_progress_and_an_empty_period_keeps_the_model():
    algo = FAVANO(weighting="samples", server_lr=2.0)
    state = AsyncServerState(torch.ones(2), 3)
    out = algo.aggregate(state, torch.tensor([[1.0, 0.0], [0.0, 1.0]]), np.array([0, 0]), np.array([0, 2]), SIZES)
    assert torch.allclose(out.params, torch.tensor([1 + 2 * 10 / 70, 1 + 2 * 60 / 70])) and out.version == 4
    empty = algo.aggregate(state, torch.zeros(0, 2), np.array([]), np.array([]), SIZES)
    assert torch.equal(empty.params, state.params) and empty.version == 4


def test_fedast_updates_only_the_model_whose_buffer_is_full():
    algo = FedAST(buffer_sizes=(2, 1), server_lrs=(1.0, 0.5))
    state = algo.init_state(torch.zeros(2))
    state = algo.aggregate(state, torch.tensor([[4.0, 0.0]]), np.array([0]), np.array([0]), SIZES, model=1)
    assert torch.equal(state.models[1], torch.tensor([2.0, 0.0])) and torch.equal(state.params, torch.zeros(2))
    assert state.versions.tolist() == [0, 1] and state.version == 1
    with pytest.raises(ValueError, match="exactly 2"):
        algo.aggregate(state, torch.zeros(1, 2), np.array([0]), np.array([0]), SIZES, model=0)
    assert algo.pick_models(3, [1, 1]) == [0, 0, 0] and FedAST(active=(1, 3)).pick_models(2, [1]) == [1, 0]


@pytest.mark.parametrize("name,params,field", [
    ("fedast", {"buffer_sizes": [2, 3], "server_lrs": [1.0]}, "server_lrs must have one entry per model"),
    ("favano", {"pull_fraction": 0}, "pull_fraction must be in"),
    ("async_fedavg", {"aggregation": "bias"}, "aggregation")])
def test_bad_parameters_are_one_config_error(name, params, field):
    cfg = small_config(name)
    cfg["algorithm"]["params"] = params
    with pytest.raises(config.ConfigError, match=field) as err:
        build_experiment(config.validate(cfg))
    assert "\n" not in str(err.value) and "algorithm.params" in str(err.value)


@pytest.mark.parametrize("name,params", [("async_fedavg", {"aggregation": "task_time", "server_lr": 0.3}),
                                         ("favano", {"delta_t_s": 0.2, "pull_fraction": 0.5, "max_local_steps": 4}),
                                         ("fedast", {"buffer_sizes": [2, 2], "concurrency": 4})])
def test_registered_rules_run_from_a_config_and_learn(name, params):
    cfg = small_config(name)
    cfg["algorithm"]["params"] = params
    cfg["system"] = {"sample_time_s": {"dist": "uniform", "low": 0.0005, "high": 0.005}}
    exp = build_experiment(config.validate(cfg))
    assert type(exp.algorithm) is ALGORITHMS.get(name)
    d = driver_for(exp.algorithm.pattern)(exp)
    first = d.evaluate()["test_loss"]
    for _ in range(15):
        d.run_round()
    assert d.state.version == 15 and d.evaluate()["test_loss"] < first


def test_favano_tasks_deliver_at_their_pull_with_the_steps_that_fit():
    cfg = small_config("favano")
    cfg["algorithm"]["params"] = {"delta_t_s": 0.5, "max_local_steps": 50}
    cfg["system"] = {"sample_time_s": {"dist": "per_node", "values": [0.0005 * (i + 1) for i in range(8)]}}
    d = driver_for("async_fl")(build_experiment(config.validate(cfg)))
    d._dispatch(0.0)
    steps = {x.plan.client: x.steps for x in d.tasks}
    assert all(x.end_s == 0.5 for x in d.tasks)              # every client pulled at the next period end
    assert steps[0] > steps[7] >= 1 and max(steps.values()) <= 50
