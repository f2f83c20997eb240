"""Anarchic FL (AFA-CD, AFA-CS): uploads, server steps, clients' own choices."""

import numpy as np
import pytest
import torch

from gossamer import config
from gossamer.algorithms import ALGORITHMS
from gossamer.algorithms.fl.anarchic import AFACD, AFACS
from tests.conftest import small_config


def test_upload_is_the_average_local_direction():
    algo = AFACD()
    start = torch.tensor([[1.0, 1.0], [0.0, 2.0]])
    trained = torch.tensor([[0.4, 1.6], [0.0, 0.0]])
    g = algo.client_message(trained, start, np.array([3, 4]), 0.1)
    assert torch.allclose(g, torch.tensor([[2.0, -2.0], [0.0, 5.0]]))   # (start - trained) / (lr K)
    with pytest.raises(ValueError, match="local steps"):
        algo.client_message(trained, start)


def test_afa_cd_step_is_server_lr_times_local_lr_times_the_mean():
    algo = AFACD(buffer_size=2, server_lr=2.0)
    state = algo.init_state(torch.tensor([1.0, 1.0]))
    g = torch.tensor([[1.0, 0.0], [3.0, -2.0]])
    new = algo.aggregate(state, g, np.array([0, 5]), np.array([3, 3]), np.ones(4), lr=0.1)
    # x - 2.0 * 0.1 * mean([1, 0], [3, -2]) = [1, 1] - 0.2 * [2, -1]
    assert torch.allclose(new.params, torch.tensor([0.6, 1.2])) and new.version == 1
    with pytest.raises(ValueError, match="exactly 2"):
        algo.aggregate(state, g[:1], np.array([0]), np.array([0]), np.ones(4), lr=0.1)
    with pytest.raises(ValueError, match="learning rate"):
        algo.aggregate(state, g, np.array([0, 0]), np.array([0, 1]), np.ones(4))
    weighted = AFACD(buffer_size=2, staleness_fn="polynomial", a=1.0)       # optional, not the paper's
    out = weighted.aggregate(state, g, np.array([0, 1]), np.array([0, 1]), np.ones(4), lr=1.0)
    assert torch.allclose(out.params, torch.tensor([1.0, 1.0]) - (g[0] + 0.5 * g[1]) / 2)


def test_afa_cs_steps_with_the_latest_direction_of_every_client():
    algo = AFACS(buffer_size=3, server_lr=1.0)
    sizes = np.array([5, 5, 5, 0, 5])                   # four clients hold data: N = 4
    state = algo.init_state(torch.zeros(2))
    g1 = torch.tensor([[1.0, 0.0], [2.0, 2.0], [4.0, 0.0]])
    s1 = algo.aggregate(state, g1, np.zeros(3, dtype=int), np.array([0, 1, 0]), sizes, lr=0.5)
    # memory: client 0 -> [4, 0] (its latest), client 1 -> [2, 2], others zeros
    assert torch.equal(s1.memory[0], torch.tensor([4.0, 0.0])) and torch.equal(s1.memory[1], g1[1])
    assert torch.count_nonzero(s1.memory[2:]) == 0
    assert torch.allclose(s1.params, -0.5 * torch.tensor([6.0, 2.0]) / 4) and s1.version == 1
    g2 = torch.tensor([[0.0, 8.0], [1.0, 1.0], [0.0, 4.0]])
    s2 = algo.aggregate(s1, g2, np.zeros(3, dtype=int), np.array([2, 1, 4]), sizes, lr=0.5)
    latest = torch.tensor([4.0, 0.0]) + torch.tensor([1.0, 1.0]) + torch.tensor([0.0, 8.0]) + torch.tensor([0.0, 4.0])
    assert torch.allclose(s2.params, s1.params - 0.5 * latest / 4) and s2.version == 2
    assert torch.equal(s1.memory[1], g1[1])                 # the previous state is not modified


def test_local_steps_lie_in_range_and_follow_the_seed():
    algo = AFACD(min_local_steps=3, max_local_steps=7)
    clients, counts = np.repeat(np.arange(20), 50), np.tile(np.arange(50), 20)
    k = algo.task_steps(0, clients, counts)
    assert k.min() == 3 and k.max() == 7 and set(k.tolist()) == {3, 4, 5, 6, 7}
    assert np.array_equal(k, algo.task_steps(0, clients, counts))
    assert not np.array_equal(k, algo.task_steps(1, clients, counts))
    alone = [int(algo.task_steps(0, np.array([c]), np.array([n]))[0]) for c, n in zip(clients[:30], counts[:30], strict=True)]
    assert alone == k[:30].tolist()                          # a client's draw ignores the others
    assert (AFACD(min_local_steps=4, max_local_steps=4).task_steps(0, clients, counts) == 4).all()


def test_think_times_are_exponential_with_the_given_mean():
    assert (AFACD().think_time(0, np.arange(5), np.zeros(5)) == 0).all()
    t = AFACS(think_time_s=2.0).think_time(3, np.arange(4000), np.zeros(4000))
    assert (t >= 0).all() and t.mean() == pytest.approx(2.0, rel=0.1)


@pytest.mark.parametrize("name,cls", [("afa_cd", AFACD), ("afa_cs", AFACS)])
def test_registered_as_self_dispatching_async_fl(name, cls):
    assert ALGORITHMS.get(name) is cls
    algo = cls.from_params({"buffer_size": 4, "max_staleness": 3})
    assert algo.pattern == "async_fl" and algo.self_dispatch and algo.concurrency is None
    assert algo.staleness_fn == "constant" and not algo.accepts(4)


@pytest.mark.parametrize("name,params,match", [
    ("afa_cd", {"buffer_size": 0}, "buffer_size"), ("afa_cs", {"server_lr": 0}, "server_lr"),
    ("afa_cd", {"min_local_steps": 0}, "min_local_steps"),
    ("afa_cs", {"min_local_steps": 5, "max_local_steps": 4}, "max_local_steps"),
    ("afa_cd", {"think_time_s": -1}, "think_time_s"), ("afa_cs", {"max_staleness": -2}, "max_staleness"),
    ("afa_cd", {"local_steps": 3}, "local_steps")])
def test_bad_params_are_one_line_config_errors(name, params, match):
    cfg = small_config(name)
    cfg["algorithm"]["params"] = params
    with pytest.raises(config.ConfigError, match=match) as err:
        config.validate(cfg)
    assert "\n" not in str(err.value)
