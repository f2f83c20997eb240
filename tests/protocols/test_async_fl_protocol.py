"""The asynchronous FL protocol as a specification: scripted events in, expected actions out.

Each test drives :class:`AsyncFLProtocol` alone (no clock, no network, no training): clients
ask for work at given times, uploads arrive with hand-made messages, timers fire; the tests
read the tasks it starts, the updates it applies and its state.
"""

import math

import numpy as np
import pytest
import torch

from gossamer.algorithms.fl.anarchic import AFACD
from gossamer.algorithms.fl.async_fl import FedAsync, FedBuff, FedFix
from gossamer.algorithms.fl.favano import FAVANO
from gossamer.algorithms.fl.fedast import FedAST
from gossamer.algorithms.fl.fedcompass import FedCompass
from gossamer.algorithms.fl.general_theory import AsyncFedAvg
from gossamer.protocols.async_fl import AsyncFLProtocol

P = 3


def _protocol(algorithm, n: int = 4, sizes=None) -> AsyncFLProtocol:
    sizes = np.full(n, 10) if sizes is None else np.asarray(sizes)
    return AsyncFLProtocol(algorithm, sizes, seed=0, lr=0.1, params=torch.zeros(P))


def _delta(value: float) -> torch.Tensor:
    return torch.full((P,), value)


def _ask(p: AsyncFLProtocol, clients, t: float) -> dict[int, tuple[int, int, int]]:
    """Clients ask at ``t``; the started tasks as ``{client: (key, steps, version)}``."""
    return {x.client: (x.key, x.steps, x.version) for x in p.dispatch(np.asarray(clients), t)}


# --- dispatch ------------------------------------------------------------------------------------
def test_concurrency_caps_the_tasks_and_a_busy_client_gets_no_second_task():
    p = _protocol(FedBuff(buffer_size=2, concurrency=2))
    started = _ask(p, [0, 1, 2, 3], 0.0)
    assert len(started) == 2 and all(v == (0, 0, 0) for v in started.values())
    assert _ask(p, [0, 1, 2, 3], 0.5) == {}                      # both slots taken
    busy = next(iter(started))
    p.arrival(busy, 1.0, _delta(1.0))
    assert _ask(p, [busy], 1.0) == {busy: (1, 0, 0)}             # its key is its own task count


def test_when_more_ask_than_slots_the_choice_is_a_counter_based_draw():
    picks = [sorted(_ask(_protocol(FedBuff(concurrency=2), n=8), range(8), 0.0)) for _ in range(2)]
    assert picks[0] == picks[1] and len(picks[0]) == 2


def test_a_client_without_data_never_starts():
    p = _protocol(FedAsync(concurrency=None), sizes=[10, 0, 10])
    assert sorted(_ask(p, [0, 1, 2], 0.0)) == [0, 2]


def test_anarchic_clients_start_only_after_their_think_time_with_their_own_step_counts():
    algo = AFACD(buffer_size=1, think_time_s=1.0, min_local_steps=2, max_local_steps=9)
    p = _protocol(algo, n=2)
    ready = algo.think_time(0, np.arange(2), np.zeros(2, dtype=np.int64))
    early, late = np.argsort(ready)
    assert _ask(p, [0, 1], float(ready[early]) - 1e-9) == {}
    started = _ask(p, [0, 1], float(ready[early]))
    assert list(started) == [early]
    assert started[early][1] == algo.task_steps(0, np.array([early]), np.array([0]))[0]
    assert p.next_ready(float(ready[early])) == ready[late]


# --- arrivals, staleness, triggers -------------------------------------------------------------------
def test_fedbuff_updates_once_the_buffer_is_full_with_staleness_weights():
    p = _protocol(FedBuff(buffer_size=2, concurrency=None))
    _ask(p, [0, 1, 2], 0.0)
    assert p.arrival(0, 1.0, _delta(2.0)).update is None
    step = p.arrival(1, 2.0, _delta(4.0))
    assert step.update[0].tolist() == [0, 1] and step.update[1].tolist() == [0, 0]
    assert p.state.version == 1 and torch.equal(p.state.params, _delta(3.0))      # (2 + 4) / 2
    _ask(p, [0], 2.0)
    p.arrival(2, 3.0, _delta(3.0))                          # started at version 0: staleness 1
    step = p.arrival(0, 4.0, _delta(1.0))
    assert step.update[1].tolist() == [1, 0]
    expected = 3.0 + (3.0 / math.sqrt(2.0) + 1.0) / 2
    assert torch.allclose(p.state.params, _delta(expected))


def test_dp_fedbuff_clips_each_buffered_update_and_adds_the_servers_noise_to_their_sum():
    """Client-level DP (DP-FedBuff, server noise): each update of a full buffer is clipped to
    C, noise of std z C keyed by the new version goes on their staleness-weighted sum, and a
    client's exposure grows by m^2 for its m updates in the buffer."""
    from gossamer.privacy import BufferLedger
    from gossamer.privacy.dp import TAG_SERVER, gaussian
    from gossamer.protocols.private import BufferDP, ClientDP

    private = BufferDP(ClientDP(clip_norm=1.0, noise_multiplier=0.5, noise="server", seed=7),
                       BufferLedger(0.5, 1e-5, "rdp"))
    p = AsyncFLProtocol(FedBuff(buffer_size=3, concurrency=None), np.full(4, 10), seed=0, lr=0.1,
                        params=torch.zeros(P), private=private)
    _ask(p, [0, 1], 0.0)
    p.arrival(0, 1.0, _delta(2.0))                   # norm 2 sqrt(3): clipped to norm 1
    _ask(p, [0], 1.0)
    p.arrival(0, 2.0, _delta(0.1))                   # inside the ball: as it is
    step = p.arrival(1, 3.0, torch.tensor([0.0, 0.0, -3.0]))
    assert step.update[0].tolist() == [0, 0, 1]
    clipped = _delta(1.0 / math.sqrt(3.0)) + _delta(0.1) + torch.tensor([0.0, 0.0, -1.0])
    noise = gaussian(7, TAG_SERVER, np.array([[1]]), P)[0] * 0.5
    assert torch.allclose(p.state.params, (clipped + noise) / 3, atol=1e-7)
    assert not torch.allclose(p.state.params, clipped / 3, atol=1e-3)      # the noise is there
    assert private.ledger.exposure == {0: 4, 1: 1} and private.ledger.most == 4


def test_a_buffer_ledger_composes_each_clients_squared_contributions():
    """Exposure m^2 at noise z is the privacy of one update at noise z / m (the Gaussian
    mechanism's RDP is a m^2 / (2 z^2)); epsilon grows with exposure, is the most exposed
    client's, and survives a checkpoint."""
    from gossamer.privacy import BufferLedger

    twice = BufferLedger(2.0, 1e-5, "rdp")
    twice.update(np.array([5, 5, 3]))               # client 5 twice in one buffer: exposure 4
    once = BufferLedger(1.0, 1e-5, "rdp")
    once.update(np.array([9]))
    assert twice.epsilon() == pytest.approx(once.epsilon(), rel=1e-12) and twice.epsilon() > 0
    before = twice.epsilon()
    twice.update(np.array([3, 4]))                  # client 3 now at 2, still below client 5
    assert twice.epsilon() == before
    twice.update(np.array([3, 3]))                  # client 3 at 6: the most exposed
    assert twice.most == 6 and twice.epsilon() > before
    again = BufferLedger(2.0, 1e-5, "rdp")
    again.load_state_dict(twice.state_dict())
    assert again.exposure == twice.exposure and again.epsilon() == twice.epsilon()
    assert BufferLedger(2.0, 1e-5, "rdp").epsilon() == 0.0


def test_max_staleness_discards_and_counts_but_frees_the_slot():
    p = _protocol(FedAsync(concurrency=None, max_staleness=0, alpha=0.5, staleness_fn="constant"))
    _ask(p, [0, 1], 0.0)
    assert p.arrival(0, 1.0, _delta(2.0)).update is not None
    assert p.arrival(1, 2.0, _delta(8.0)).update is None       # staleness 1 > 0: dropped
    assert p.acct.discarded == 1 and p.accepted == 1 and 1 not in p.tasks
    assert torch.equal(p.state.params, _delta(1.0))


def test_a_lost_task_frees_the_slot_and_counts():
    p = _protocol(FedBuff(buffer_size=1, concurrency=1))
    _ask(p, [0, 1], 0.0)
    client = next(iter(p.tasks))
    assert p.lost(client, 1.0).update is None and p.lost_tasks == 1
    assert len(_ask(p, [0, 1], 1.0)) == 1


def test_fedfix_hands_out_models_at_period_ends_only_to_clients_idle_there():
    p = _protocol(FedFix(delta_t_s=1.0, concurrency=None, weighting="uniform"), n=3)
    assert sorted(_ask(p, [0, 1, 2], 0.0)) == [0, 1, 2]
    p.arrival(0, 0.4, _delta(1.0))
    assert _ask(p, [0], 0.4) == {} and p.next_timer() == 1.0    # not before the period ends
    step = p.timer(1.0)
    assert step.update[0].tolist() == [0] and p.state.version == 1
    assert torch.allclose(p.state.params, _delta(1.0 / 3))      # d = (0 + 1) * 1/3
    p.arrival(1, 1.5, _delta(3.0))                              # idle after the boundary: waits
    assert _ask(p, [0, 1], 1.5) == {0: (1, 0, 1)}
    assert p.timer(2.0).update[1].tolist() == [1]               # 1 started at version 0
    assert _ask(p, [1], 2.0) == {1: (1, 0, 2)} and p.next_timer() == 3.0


def test_an_empty_period_still_advances_the_version():
    p = _protocol(FedFix(delta_t_s=0.5, concurrency=None))
    _ask(p, [0], 0.0)
    step = p.timer(0.5)
    assert step.update[0].tolist() == [] and p.state.version == 1 and p.last_staleness is None


# --- FedCompass: groups --------------------------------------------------------------------------------
def test_fedcompass_first_task_alone_then_groups_complete_together():
    algo = FedCompass(max_local_steps=10, q_ratio=0.2, latest_time_factor=1.5, alpha=1.0, staleness_fn="constant")
    p = _protocol(algo, n=2)
    assert _ask(p, [0, 1], 0.0) == {0: (0, 10, 0), 1: (0, 10, 0)}        # no estimate: Q_max, no group
    assert p.arrival(0, 1.0, _delta(1.0)).update is not None           # 0.1 s per step; applied alone
    assert _ask(p, [0], 1.0) == {0: (1, 10, 1)}                        # a new group, Q_max steps
    group = int(p.schedule.group[0])
    assert p.schedule.groups[group].expected_s == 2.0 and p.schedule.groups[group].latest_s == 2.5
    assert p.arrival(1, 2.0, _delta(2.0)).update is not None           # 0.2 s per step, alone
    # 0's group is expected now (0 steps < Q_min = 2): a new group, arriving one Q_max of the
    # fastest member (0.1 s/step) after that group's latest time: floor((2.5 + 1.0 - 2.0) / 0.2) = 7
    assert _ask(p, [1], 2.0) == {1: (1, 7, 2)} and int(p.schedule.group[1]) != group
    step = p.arrival(0, 2.0, _delta(3.0))
    assert step.update is not None and step.update[0].tolist() == [0]  # its group complete


def test_fedcompass_late_arrival_goes_to_the_general_buffer_and_asks_again():
    algo = FedCompass(max_local_steps=10, latest_time_factor=1.0, alpha=1.0, staleness_fn="constant")
    p = _protocol(algo, n=2)
    _ask(p, [0, 1], 0.0)
    p.arrival(0, 1.0, _delta(1.0))
    p.arrival(1, 1.0, _delta(1.0))
    _ask(p, [0, 1], 1.0)                                   # both 0.1 s/step: one group, expected 2.0
    assert p.schedule.group[0] == p.schedule.group[1] >= 0
    assert p.next_timer() == 2.0
    assert p.arrival(0, 1.9, _delta(2.0)).update is None     # waits in its group
    step = p.timer(2.0)                                      # latest time: aggregate what arrived
    assert step.update[0].tolist() == [0]
    late = p.arrival(1, 2.5, _delta(5.0))                    # its group is gone: general buffer
    assert late.update is None and late.dispatch and [e.task.client for e in p.buffer] == [1]


def test_fedcompass_lost_member_completes_its_group():
    algo = FedCompass(max_local_steps=10, alpha=1.0, staleness_fn="constant")
    p = _protocol(algo, n=2)
    _ask(p, [0, 1], 0.0)
    p.arrival(0, 1.0, _delta(1.0))
    p.arrival(1, 1.0, _delta(1.0))
    _ask(p, [0, 1], 1.0)
    p.arrival(0, 1.9, _delta(2.0))
    step = p.lost(1, 2.1)
    assert step.update is not None and step.update[0].tolist() == [0]


# --- FAVANO, FedAST, the General Theory's rules -----------------------------------------------------------
def test_favano_tasks_end_at_their_pull_and_the_period_averages_what_was_pulled():
    p = _protocol(FAVANO(delta_t_s=1.0, max_local_steps=5, weighting="uniform"), n=2)
    tasks = p.dispatch(np.array([0, 1]), 0.0)
    assert [x.deadline_s for x in tasks] == [1.0, 1.0] and [x.steps for x in tasks] == [5, 5]
    p.arrival(0, 1.0, _delta(2.0))
    p.arrival(1, 1.0, _delta(4.0))
    assert p.timer(1.0).update[0].tolist() == [0, 1] and torch.equal(p.state.params, _delta(3.0))


def test_favano_pulls_a_fraction_at_counter_based_period_ends():
    algo = FAVANO(delta_t_s=1.0, pull_fraction=0.3)
    deadlines = [x.deadline_s for x in _protocol(algo, n=16).dispatch(np.arange(16), 0.0)]
    again = [x.deadline_s for x in _protocol(algo, n=16).dispatch(np.arange(16), 0.0)]
    assert deadlines == again and all(d == round(d) >= 1.0 for d in deadlines) and len(set(deadlines)) > 1


def test_favano_progress_that_arrives_before_its_pull_waits_for_that_period_end():
    """A real client uploads as soon as it stops; its progress is averaged at its own pull."""
    algo = FAVANO(delta_t_s=1.0, pull_fraction=0.3)
    p = _protocol(algo, n=16)
    tasks = {x.client: x for x in p.dispatch(np.arange(16), 0.0)}
    late = max(tasks.values(), key=lambda x: (x.deadline_s, -x.client))     # pulled at 2.0 or later
    early = min(tasks.values(), key=lambda x: (x.deadline_s, x.client))     # pulled at 1.0
    assert early.deadline_s == 1.0 and late.deadline_s >= 2.0
    p.arrival(late.client, 0.5, _delta(4.0))
    p.arrival(early.client, 0.6, _delta(2.0))
    assert p.timer(1.0).update[0].tolist() == [early.client]             # only the one pulled now
    assert torch.equal(p.state.params, _delta(2.0))
    while p.boundary() < late.deadline_s:
        assert p.timer(p.boundary()).update[0].tolist() == []
    assert p.timer(late.deadline_s).update[0].tolist() == [late.client]


def test_fedast_trains_each_model_with_its_own_buffer_and_versions():
    p = _protocol(FedAST(buffer_sizes=(1, 2), server_lrs=(1.0, 0.5), concurrency=None), n=4)
    tasks = p.dispatch(np.arange(4), 0.0)
    assert [x.model for x in tasks] == [0, 1, 0, 1]
    assert p.arrival(1, 1.0, _delta(2.0)).update is None            # model 1 needs two
    assert p.arrival(0, 1.0, _delta(1.0)).update is not None        # model 0 needs one
    assert torch.equal(p.state.models[0], _delta(1.0)) and torch.equal(p.state.params, _delta(1.0))
    assert p.arrival(3, 2.0, _delta(4.0)).update is not None
    assert torch.equal(p.state.models[1], _delta(0.5 * 3.0)) and p.state.versions.tolist() == [1, 1]
    new = p.dispatch(np.array([0]), 2.0)[0]
    assert new.model == 1 and new.version == 1      # client 2 still trains model 0: model 1 is short


def test_async_fedavg_adds_each_update_in_full_or_weights_it_by_task_time():
    full = _protocol(AsyncFedAvg(), n=2)
    _ask(full, [0, 1], 0.0)
    full.arrival(0, 1.0, _delta(1.0))
    full.arrival(1, 4.0, _delta(1.0))
    assert torch.equal(full.state.params, _delta(2.0))
    tau = _protocol(AsyncFedAvg(aggregation="task_time", weighting="uniform"), n=2)
    _ask(tau, [0, 1], 0.0)
    tau.arrival(0, 1.0, _delta(1.0))           # only tau_0 = 1 known: d = (1/1) * 1 * 1/2
    assert torch.allclose(tau.state.params, _delta(0.5))
    tau.arrival(1, 4.0, _delta(1.0))           # d = (1/1 + 1/4) * 4 * 1/2 = 2.5
    assert torch.allclose(tau.state.params, _delta(3.0))


# --- stop and checkpoints ------------------------------------------------------------------------------
def test_after_stop_arrivals_free_slots_and_change_nothing():
    p = _protocol(FedAsync(concurrency=None))
    _ask(p, [0, 1], 0.0)
    p.stop()
    assert p.arrival(0, 1.0, _delta(1.0)).update is None and p.dispatch(np.array([0]), 1.0) == []
    assert p.state.version == 0 and 0 not in p.tasks


@pytest.mark.parametrize("algorithm", [FedBuff(buffer_size=3, concurrency=None),
                                       FedCompass(max_local_steps=10), FedFix(delta_t_s=1.0),
                                       FedAST(buffer_sizes=(2, 2)),
                                       AsyncFedAvg(aggregation="task_time")])
def test_a_checkpoint_resumes_the_same_decisions(tmp_path, algorithm):
    def script(p, events):
        out = []
        for kind, c, t in events:
            if kind == "ask":
                out.append([(x.client, x.key, x.steps, x.version, x.model) for x in p.dispatch(np.array(c), t)])
            elif kind == "up":
                step = p.arrival(c, t, _delta(float(c + 1)))
                out.append(None if step.update is None else step.update[0].tolist())
            else:                                            # a timer, when one is due
                out.append(p.next_timer() <= t and p.timer(t).update is not None)
        return out, p.state.params.clone()

    first = [("ask", [0, 1, 2, 3], 0.0), ("up", 0, 1.0), ("up", 2, 1.0), ("ask", [0, 2], 1.0)]
    rest = [("up", 1, 1.5), ("up", 3, 1.6), ("tick", None, 2.0), ("ask", [0, 1, 2, 3], 2.0), ("up", 0, 2.5)]
    rest = [e for e in rest if not (e[0] == "up" and e[1] == 0 and isinstance(algorithm, FedFix))]
    whole = _protocol(algorithm)
    script(whole, first)
    p = _protocol(algorithm)
    script(p, first)
    torch.save(p.state_dict(), tmp_path / "p.pt")
    resumed = _protocol(algorithm)
    resumed.load_state_dict(torch.load(tmp_path / "p.pt", weights_only=True))
    (decisions, params), (again, params_again) = script(whole, rest), script(resumed, rest)
    assert decisions == again and torch.equal(params, params_again)
    assert whole.acct.summary() == resumed.acct.summary()
