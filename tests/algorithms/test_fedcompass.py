"""FedCompass: the scheduler's assignment rules, the speed estimate, the group aggregation."""

import math

import numpy as np
import pytest
import torch

from gossamer import config
from gossamer.algorithms import ALGORITHMS
from gossamer.algorithms.fl.fedcompass import ArrivalGroup, CompassSchedule, FedCompass
from tests.conftest import small_config


def _sched(speeds: list[float], groups: dict | None = None) -> CompassSchedule:
    s = CompassSchedule.empty(len(speeds))
    s.speed[:] = speeds
    for g, group in (groups or {}).items():
        s.groups[g] = group
        s.group[group.members + group.arrived] = g
    s.next_group = max(s.groups, default=-1) + 1
    return s


def test_step_bounds_follow_the_authors_definitions():
    algo = FedCompass(max_local_steps=50)
    assert algo.min_local_steps == 10 and algo.steps_bound == 60          # floor(0.2 Q), floor(1.2 Q)
    assert FedCompass(max_local_steps=3).min_local_steps == 1             # at least one step
    assert FedCompass(max_local_steps=50, q_ratio=0.33).min_local_steps == 16


def test_first_assignment_creates_a_group_with_q_max():
    algo, sched = FedCompass(max_local_steps=50, latest_time_factor=1.5), _sched([0.1, 0.2])
    assert algo.assign(sched, 0, 2.0) == 50
    g = sched.groups[0]
    assert (g.created_s, g.members) == (2.0, [0]) and sched.group[0] == 0 and sched.next_group == 1
    assert g.expected_s == pytest.approx(2.0 + 50 * 0.1) and g.latest_s == pytest.approx(2.0 + 50 * 0.1 * 1.5)


def test_join_takes_the_group_giving_the_most_steps_within_the_bounds():
    algo = FedCompass(max_local_steps=50)                 # Q_min 10, bound 60
    sched = _sched([0.1, 0.1, 0.1, 0.01],
                   {0: ArrivalGroup(0.0, 1.5, 2.0, [0]),   # (1.5 - 1.0) / 0.01 = 50 steps
                    1: ArrivalGroup(0.0, 1.55, 2.0, [1]),  # 55 steps: the most within the bound
                    2: ArrivalGroup(0.0, 1.7, 2.0, [2]),   # 70 > 60: not eligible
                    3: ArrivalGroup(0.0, 1.05, 2.0, [])})  # 5 < 10: not eligible
    assert algo.assign(sched, 3, 1.0) == 55
    assert sched.group[3] == 1 and sched.groups[1].members == [1, 3] and sched.next_group == 4
    closed = _sched([0.1, 0.01], {0: ArrivalGroup(0.0, 1.5, 2.0, [0], open=False)})   # nobody joins it
    assert algo.assign(closed, 1, 1.0) == 50 and closed.group[1] == 1


def test_create_aims_one_q_max_after_a_groups_latest_arrival():
    algo = FedCompass(max_local_steps=50, latest_time_factor=1.5)
    sched = _sched([0.02, 0.05, 0.1, 1.0], {0: ArrivalGroup(0.0, 1.0, 1.2, [0], [1])})   # fastest: 0.02 s/step
    # client 2 at t = 1.1: joining gives floor(-0.1 / 0.1) < Q_min; est = 1.2 + 0.02 * 50 = 2.2
    assert algo.assign(sched, 2, 1.1) == math.floor((2.2 - 1.1) / 0.1)
    g = sched.groups[1]
    assert g.expected_s == pytest.approx(1.1 + 11 * 0.1) and g.latest_s == pytest.approx(1.1 + 11 * 0.1 * 1.5)
    # a slow client: est gives 1 step < Q_min: raised to Q_min (and it cannot join either group)
    assert algo.assign(sched, 3, 1.15) == algo.min_local_steps
    # no group whose latest arrival lies ahead: Q_max
    late = _sched([0.02, 0.1], {0: ArrivalGroup(0.0, 0.5, 0.8, [0])})
    assert algo.assign(late, 1, 0.9) == 50


def test_create_ignores_estimates_above_q_max():
    algo = FedCompass(max_local_steps=10)
    sched = _sched([0.5, 0.001], {0: ArrivalGroup(0.0, 5.0, 7.5, [0])})
    # join: floor(4 / 0.001) = 4000 > 12; create: floor((7.5 + 5 - 1) / 0.001) > 10 -> none: Q_max
    assert algo.assign(sched, 1, 1.0) == 10


def test_speed_estimate_update_equals_the_formula():
    algo = FedCompass(max_local_steps=5, speed_momentum=0.9)
    assert algo.update_speed(math.nan, 0.3) == 0.3                        # first measurement
    assert algo.update_speed(0.3, 0.5) == pytest.approx(0.1 * 0.3 + 0.9 * 0.5)
    assert FedCompass(max_local_steps=5, speed_momentum=0.25).update_speed(1.0, 2.0) == pytest.approx(1.25)


def test_group_aggregation_equals_the_closed_form():
    algo = FedCompass(max_local_steps=5, alpha=0.8, staleness_fn="polynomial", a=0.5)
    state = algo.init_state(torch.tensor([1.0, -1.0]))
    start = torch.tensor([[1.0, -1.0], [0.0, 0.0], [2.0, 2.0]])
    trained = torch.tensor([[2.0, -1.0], [0.0, 3.0], [1.0, 2.0]])
    deltas = algo.client_message(trained, start)
    assert torch.equal(deltas, trained - start)
    sizes = np.array([10, 20, 30, 40])
    new = algo.aggregate(state, deltas, np.array([0, 3, 8]), np.array([0, 1, 3]), sizes)
    p = sizes[[0, 1, 3]] / 100
    w = 0.8 * p * np.array([1.0, 0.5, 1 / 3])                            # s = (staleness + 1)^-0.5
    # x - sum_i w_i (start_i - local_i)
    expected = torch.tensor([1.0, -1.0]) - sum(float(wi) * (s - t) for wi, s, t in zip(w, start, trained, strict=True))
    assert torch.allclose(new.params, expected) and new.version == 1
    uniform = FedCompass(max_local_steps=5, alpha=1.0, staleness_fn="constant", weighting="uniform")
    one = uniform.aggregate(state, deltas[:1], np.array([0]), np.array([0]), sizes)   # a single update
    assert torch.allclose(one.params, torch.tensor([1.25, -1.0]))


def test_schedule_state_round_trip():
    algo, sched = FedCompass(max_local_steps=20), _sched([0.1, 0.2, 0.05, np.nan])
    algo.assign(sched, 0, 0.0)
    algo.assign(sched, 1, 0.5)
    algo.assign(sched, 2, 0.5)
    sched.groups[0].members.remove(0)
    sched.groups[0].arrived.append(0)
    sched.groups[1].open = False
    back = CompassSchedule.from_state_dict(sched.state_dict())
    assert back.groups == sched.groups and back.next_group == sched.next_group
    assert np.array_equal(back.group, sched.group) and np.array_equal(back.speed, sched.speed, equal_nan=True)


def test_leave_and_release():
    algo, sched = FedCompass(max_local_steps=20), _sched([0.1, 0.1, 0.1])
    for c in range(3):
        algo.assign(sched, c, 0.0)                        # one group: 0 creates, 1 and 2 join
    assert sched.groups[0].members == [0, 1, 2]
    sched.groups[0].members.remove(0)
    sched.groups[0].arrived.append(0)
    assert sched.leave(1) == 0 and sched.group[1] == -1
    assert sched.release(0) == [0] and sched.group[0] == -1 and not sched.groups[0].open
    assert sched.leave(2) == 0 and 0 not in sched.groups   # nobody left: the group goes


def test_registered_with_required_q_max():
    cls = ALGORITHMS.get("fedcompass")
    assert cls.pattern == "async_fl" and cls.trigger == "group"
    algo = cls.from_params({"max_local_steps": 50})
    assert algo.concurrency is None and algo.latest_time_factor == 1.5 and algo.alpha == 0.9
    assert algo.staleness_fn == "polynomial" and algo.a == 0.5 and algo.speed_momentum == 0.9


@pytest.mark.parametrize("params,match", [
    ({}, "max_local_steps"), ({"max_local_steps": 0}, "max_local_steps"),
    ({"max_local_steps": 5, "q_ratio": 0}, "q_ratio"),
    ({"max_local_steps": 5, "max_steps_bound_factor": 0.5}, "max_steps_bound_factor"),
    ({"max_local_steps": 5, "latest_time_factor": 0.9}, "latest_time_factor"),
    ({"max_local_steps": 5, "speed_momentum": 0}, "speed_momentum"),
    ({"max_local_steps": 5, "alpha": 1.5}, "alpha"), ({"max_local_steps": 5, "concurrency": 0}, "concurrency"),
    ({"max_local_steps": 5, "lambda_": 2}, "lambda_")])
def test_bad_params_are_one_line_config_errors(params, match):
    cfg = small_config("fedcompass")
    cfg["algorithm"]["params"] = params
    with pytest.raises(config.ConfigError, match=match) as err:
        config.validate(cfg)
    assert "\n" not in str(err.value)
