"""The asynchronous FL driver: simulated clock, triggers, Papaya controls, accounting, resume."""

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from gossamer import config
from gossamer.metrics.runstore import load_checkpoint, save_checkpoint
from gossamer.protocols.accounting import FLAccounting
from gossamer.sim.drivers import driver_for
from gossamer.sim.drivers.async_fl import AsyncFLDriver
from gossamer.sim.drivers.base import _to_numpy, _to_tensor
from gossamer.sim.experiment import build_experiment
from tests.conftest import run_split, small_config

VARIED = {"sample_time_s": {"dist": "uniform", "low": 0.0005, "high": 0.005}}
DOCS = Path(__file__).resolve().parents[2] / "docs" / "async_fl.md"


def _cfg(name: str, nodes: int = 8, system: dict | None = None, **params) -> dict:
    cfg = small_config(name, partition={"name": "iid", "num_nodes": nodes})
    cfg["algorithm"]["params"] = params
    cfg["system"] = dict(system or VARIED)
    return cfg


def _driver(cfg: dict) -> AsyncFLDriver:
    exp = build_experiment(config.validate(cfg))
    driver = driver_for(exp.algorithm.pattern)(exp)
    assert isinstance(driver, AsyncFLDriver)
    return driver


def _applied(entry) -> SimpleNamespace:
    """An applied protocol entry as the tests read it."""
    task = entry.task
    return SimpleNamespace(client=task.client, key=task.key, assigned=task.steps, start_version=task.version,
                           dispatch_s=task.start_s, end_s=entry.end_s, message=entry.message)


def _spy_updates(d: AsyncFLDriver) -> list[dict]:
    """Record every server update: model before/after, the applied tasks, their staleness."""
    seen, apply = [], d.protocol._apply

    def spy(entries):
        before = d.state.params.clone()
        step = apply(entries)
        seen.append({"before": before, "after": d.state.params.clone(), "t": d.sim_time,
                     "tasks": [_applied(e) for e in entries], "staleness": [e.staleness for e in entries]})
        return step

    d.protocol._apply = spy
    return seen


# --- the simulated clock ------------------------------------------------------------------------
def test_two_clients_arrive_when_their_profiles_say():
    system = {"sample_time_s": {"dist": "per_node", "values": [0.001, 0.01]},
              "latency_s": {"dist": "constant", "value": 0.1},
              "bandwidth_up_Bps": {"dist": "constant", "value": 1e5},
              "bandwidth_down_Bps": {"dist": "constant", "value": 1e6}}
    d = _driver(_cfg("fedasync", nodes=2, system=system, concurrency=2, staleness_fn="constant"))
    n, size = d.exp.trainer.sizes, d.exp.message_bytes
    task_s = [0.1 + size / 1e6 + st * n[i] + 0.1 + size / 1e5 for i, st in enumerate([0.001, 0.01])]
    arrivals = sorted([(k * task_s[0], 0) for k in range(1, 30)] + [(k * task_s[1], 1) for k in range(1, 3)])
    first_slow = next(i for i, (_, c) in enumerate(arrivals) if c == 1)
    for r, (t, client) in enumerate(arrivals[:first_slow + 2], start=1):
        d.run_round()
        assert d.sim_time == pytest.approx(t, rel=1e-12) and d.state.version == r
        if r == first_slow + 1:                 # the slow client's first update, r - 1 versions stale
            assert d.protocol.last_staleness == first_slow and client == 1
        else:
            assert client == 0
    # two initial downloads, then one per arrival but the last (re-served when the next round starts)
    assert d.bytes_down == (2 + first_slow + 1) * size and len(d.tasks) == 1
    assert d.bytes_up == (first_slow + 2) * size


def test_fedfix_updates_at_period_ends_with_what_arrived_in_the_window():
    dt = 0.3
    d = _driver(_cfg("fedfix", delta_t_s=dt, concurrency=8))
    seen = _spy_updates(d)
    for r in range(1, 9):
        d.run_round()
        assert d.sim_time == r * dt and d.state.version == r
    assert sum(len(u["tasks"]) for u in seen) > 8
    for r, u in enumerate(seen, start=1):
        for task, s in zip(u["tasks"], u["staleness"], strict=True):
            assert (r - 1) * dt < task.end_s <= r * dt + 1e-12
            periods = task.dispatch_s / dt               # models go out only at period ends
            assert periods == pytest.approx(round(periods))
            assert s == r - 1 - round(periods)           # staleness = periods spanned - 1
    assert any(task.plan.version < d.state.version for task in d.tasks)   # slow ones continue
    # every client is re-served at the next period end: idle = boundary - arrival
    waited = sum(r * dt - task.end_s for r, u in enumerate(seen[:-1], start=1) for task in u["tasks"])
    assert d.acct.client_idle_s.sum() == pytest.approx(waited)


def test_server_idle_time_when_every_task_finishes_early_in_the_period():
    system = {"sample_time_s": {"dist": "per_node", "values": [0.0001, 0.0002]},
              "latency_s": {"dist": "constant", "value": 0.05},
              "bandwidth_up_Bps": {"dist": "constant", "value": 1e6},
              "bandwidth_down_Bps": {"dist": "constant", "value": 1e6}}
    d = _driver(_cfg("fedfix", nodes=2, system=system, delta_t_s=2.0))
    slowest = max(0.1 + 2 * d.exp.message_bytes / 1e6 + st * n
                  for st, n in zip([0.0001, 0.0002], d.exp.trainer.sizes, strict=True))
    for _ in range(4):
        d.run_round()
    assert d.acct.server_idle_s == pytest.approx(4 * (2.0 - slowest))
    assert d.state.version == 4 and d.acct.participation.tolist() == [4, 4]


# --- triggers and Papaya controls ---------------------------------------------------------------
def test_fedbuff_consumes_exactly_buffer_size_arrivals_per_update():
    d = _driver(_cfg("fedbuff", buffer_size=3, concurrency=5, server_lr=0.7))
    seen = _spy_updates(d)
    for r in range(1, 7):
        before = d.protocol.accepted
        d.run_round()
        assert d.protocol.accepted - before == 3 and d.state.version == r
    for u in seen:
        assert len(u["tasks"]) == 3
        w = 1 / np.sqrt(1 + np.array(u["staleness"], dtype=np.float64))
        step = sum(float(wi) * task.message for wi, task in zip(w, u["tasks"], strict=True)) / 3
        assert torch.allclose(u["after"], u["before"] + 0.7 * step, atol=1e-6)
    assert max(s for u in seen for s in u["staleness"]) > 0


def test_uploads_are_deltas_from_the_model_each_client_started_from():
    d = _driver(_cfg("fedbuff", buffer_size=2, concurrency=4))
    calls, train = [], d.exp.trainer.train

    def spy(rows, nodes, keys, **kw):
        result = train(rows, nodes, keys, **kw)
        calls.append((rows.clone(), list(zip(nodes.tolist(), np.asarray(keys).tolist(), strict=True)),
                      result.params.clone()))
        return result

    d.exp.trainer.train = spy
    seen = _spy_updates(d)
    for _ in range(4):
        d.run_round()
    trained = {k: (row, out) for rows, keys, outs in calls for k, row, out in zip(keys, rows, outs, strict=True)}
    for u in seen:
        for task in u["tasks"]:
            row, out = trained[(task.client, task.key)]     # data order: (client, its task count)
            assert torch.allclose(task.message, out - row)
    assert len(calls) < len(trained)               # tasks are trained in batches


def test_max_staleness_discards_and_counts():
    d = _driver(_cfg("fedasync", concurrency=6, max_staleness=1))
    for _ in range(12):
        d.run_round()
    a = d.acct
    assert a.discarded > 0 and set(a.staleness) <= {0, 1}
    assert sum(a.staleness.values()) == d.protocol.accepted == 12
    assert a.participation.sum() == d.protocol.accepted + a.discarded
    assert d.summary()["discarded_stale"] == a.discarded


@pytest.mark.parametrize("name", ["fedasync", "fedbuff", "fedfix", "fedcompass", "afa_cd"])
def test_concurrency_is_never_exceeded(name):
    params = {"fedbuff": {"buffer_size": 2}, "fedfix": {"delta_t_s": 0.2}, "fedcompass": {"max_local_steps": 8},
              "afa_cd": {"buffer_size": 2}}.get(name, {})
    cfg = _cfg(name, concurrency=3, **params)
    cfg["system"]["availability"] = {"model": "markov", "mean_on_s": 2.0, "mean_off_s": 1.0}
    d = _driver(cfg)
    start = d._start

    def checked(plans, t):
        start(plans, t)
        clients = [task.plan.client for task in d.tasks]
        assert len(clients) <= 3 and len(set(clients)) == len(clients)

    d._start = checked
    for _ in range(15):
        d.run_round()
    assert d.max_in_flight == 3


@pytest.mark.parametrize("name,params", [("fedasync", {"concurrency": 5}), ("fedcompass", {"max_local_steps": 9}),
                                         ("afa_cd", {"buffer_size": 2, "max_local_steps": 7})])
def test_batched_training_equals_training_each_task_alone(name, params):
    """Tasks of different lengths (FedCompass, AFA) train in one call as they would alone."""
    cfg = _cfg(name, **params)
    batched, single = _driver(cfg), _driver(cfg)
    train_one = single._train_pending

    def alone(first):
        others, single.tasks = single.tasks, []
        try:
            train_one(first)
        finally:
            single.tasks = others

    single._train_pending = alone
    sizes, train = [], batched.exp.trainer.train

    def spy(rows, nodes, keys, **kw):
        if kw.get("steps") is not None:
            sizes.append(len(set(kw["steps"].tolist())))
        return train(rows, nodes, keys, **kw)

    batched.exp.trainer.train = spy
    for _ in range(10):
        batched.run_round()
        single.run_round()
    assert batched.sim_time == single.sim_time
    if name != "fedasync":
        assert max(sizes) > 1                     # one call held tasks of different lengths
    assert torch.allclose(batched.state.params, single.state.params, atol=1e-5)


# --- FedCompass: groups of arrival on the simulated clock ---------------------------------------
TIERS = {"sample_time_s": {"dist": "per_node", "values": np.linspace(0.001, 0.01, 8).tolist()},
         "latency_s": {"dist": "constant", "value": 0.0},
         "bandwidth_up_Bps": {"dist": "constant", "value": 1e15},
         "bandwidth_down_Bps": {"dist": "constant", "value": 1e15}}


def _spy_compass(d: AsyncFLDriver) -> tuple[list[dict], list[tuple[int, float]], list[tuple]]:
    """Record every group aggregation, every speed measurement and every dispatch."""
    closed, measured, started = [], [], []
    p = d.protocol
    close, arrival, start = p._close_group, p.compass_arrival, d._start

    def spy_close(g):
        group = p.schedule.groups[g]
        info = {"g": g, "t": d.sim_time, "created": group.created_s, "expected": group.expected_s,
                "latest": group.latest_s, "arrived": list(group.arrived),
                "in_group": [_applied(e) for e in p.group_buffer.get(g, [])],
                "general": [(_applied(e), e.staleness) for e in p.buffer]}
        closed.append(info)
        return close(g)

    def spy_arrival(task, entry, t):
        measured.append((task.client, (t - task.start_s) / task.steps))
        return arrival(task, entry, t)

    def spy_start(plans, t):
        nodes = np.array([x.client for x in plans])
        started.append((nodes, t, np.array([x.steps for x in plans]),
                        p.schedule.speed[nodes].copy(), p.schedule.group[nodes].copy()))
        start(plans, t)

    p._close_group, p.compass_arrival, d._start = spy_close, spy_arrival, spy_start
    return closed, measured, started


def test_fedcompass_groups_arrivals_and_gives_faster_clients_more_steps():
    d = _driver(_cfg("fedcompass", system=TIERS, max_local_steps=20))
    closed, measured, started = _spy_compass(d)
    updates = _spy_updates(d)
    for r in range(1, 41):
        d.run_round()
        assert d.state.version == r                      # one round = one server update
    per_step = np.array(TIERS["sample_time_s"]["values"]) * d.batch_size
    assert np.allclose(d.protocol.schedule.speed, per_step)      # exact profile: the estimate is the truth
    # at the start every client trains Q_max steps in no group, and its first arrival is alone
    nodes, t0, steps, _, group = started[0]
    assert t0 == 0.0 and len(nodes) == 8 and (steps == 20).all() and (group == -1).all()
    singles = [u for u in updates if len(u["tasks"]) == 1 and u["tasks"][0].start_version == 0
               and u["tasks"][0].assigned == 20 and u["tasks"][0].dispatch_s == 0.0]
    assert sorted(u["tasks"][0].client for u in singles) == list(range(8))
    # groups: arrivals aggregated together lie in [created, latest) and within (latest - expected)
    grouped = [c for c in closed if len(c["in_group"]) > 1]
    assert len(grouped) >= 3
    for c in closed:
        ends = [task.end_s for task in c["in_group"]]
        assert all(c["created"] <= e < c["latest"] for e in ends)
        assert max(ends) - min(ends) <= c["latest"] - c["expected"] + 1e-12
        assert sorted(task.client for task in c["in_group"]) == sorted(c["arrived"])
        assert c["t"] == pytest.approx(max(ends)) or c["t"] == pytest.approx(c["latest"])
    # in a group, clients sent off together get more steps the faster they are
    pairs = 0
    for nodes, _, steps, speed, group in started[1:]:
        for i in range(len(nodes)):
            for j in range(len(nodes)):
                if group[i] == group[j] >= 0 and speed[i] < speed[j]:
                    assert steps[i] >= steps[j]
                    pairs += steps[i] > steps[j]
    assert pairs > 0
    assert d.client_steps[0] > d.client_steps[-1]       # the fastest trains more than the slowest


def test_fedcompass_group_membership_and_idle_time():
    d = _driver(_cfg("fedcompass", system=TIERS, max_local_steps=20))
    closed, _, started = _spy_compass(d)
    members: dict[int, list[int]] = {}
    assign = d.algorithm.assign

    def spy_assign(sched, client, t):
        steps = assign(sched, client, t)
        members.setdefault(int(sched.group[client]), []).append(client)
        return steps

    object.__setattr__(d.algorithm, "assign", spy_assign)      # a frozen dataclass
    _rows(d, 30)
    for c in closed:                                  # a group aggregates the clients assigned to it
        assert set(c["arrived"]) <= set(members[c["g"]])
    # waiting in a group is idle time: always available, so every client waits from its arrival
    # until its group aggregates and is served again at once (at the next round's dispatch point)
    d._dispatch(d.sim_time)
    waited = sum(c["t"] - task.end_s for c in closed for task in c["in_group"])
    assert d.acct.client_idle_s.sum() == pytest.approx(waited) and waited > 0


def test_fedcompass_speed_estimate_follows_the_momentum_formula():
    system = {**VARIED, "latency_s": {"dist": "constant", "value": 0.05}}   # per-step times vary with steps
    d = _driver(_cfg("fedcompass", system=system, max_local_steps=15, speed_momentum=0.7))
    _, measured, _ = _spy_compass(d)
    _rows(d, 25)
    speed = np.full(8, np.nan)
    for c, value in measured:
        speed[c] = value if np.isnan(speed[c]) else 0.3 * speed[c] + 0.7 * value
    assert np.allclose(d.protocol.schedule.speed, speed, equal_nan=True) and not np.isnan(speed).any()


def test_fedcompass_late_arrivals_go_to_the_general_buffer():
    cfg = _cfg("fedcompass", system=TIERS, max_local_steps=20, latest_time_factor=1.0)
    cfg["faults"] = {"stragglers": {"fraction": 0.3, "factor": 3.0, "mode": "per_round"}}
    d = _driver(cfg)
    closed, _, _ = _spy_compass(d)
    _rows(d, 40)
    late = [entry for c in closed for entry in c["general"]]
    assert late                                       # stragglers miss their group's latest arrival
    for c in closed:
        for task, _ in c["general"]:
            assert task.end_s <= c["t"]


# --- Anarchic FL: clients choose when and how long ------------------------------------------------
def test_afa_local_steps_follow_the_clients_own_draws():
    cfg = _cfg("afa_cd", buffer_size=3, min_local_steps=2, max_local_steps=9, think_time_s=0.3)
    d = _driver(cfg)
    tasks: list = []
    start = d._start

    def spy(plans, t):
        start(plans, t)
        tasks.extend((x.client, x.key, x.steps, t) for x in plans)

    d._start = spy
    _rows(d, 12)
    nodes, counts, steps, _ = map(np.array, zip(*tasks, strict=True))
    assert steps.min() >= 2 and steps.max() <= 9 and len(set(steps.tolist())) > 3
    assert np.array_equal(steps, d.algorithm.task_steps(0, nodes, counts))
    cfg["seed"] = 5
    other = _driver(cfg)
    _rows(other, 3)
    assert not np.array_equal(other.algorithm.task_steps(5, nodes, counts), steps)
    # always online, no cap: a client starts its first task exactly when its think time ends
    first = {c: t for c, k, _, t in tasks if k == 0}
    assert all(first[c] == pytest.approx(d.algorithm.think_time(0, np.array([c]), np.array([0]))[0]) for c in first)


def test_afa_cd_aggregates_exactly_m_updates():
    d = _driver(_cfg("afa_cd", buffer_size=4, server_lr=0.5, max_local_steps=6))
    seen = _spy_updates(d)
    for r in range(1, 8):
        before = d.protocol.accepted
        d.run_round()
        assert d.protocol.accepted - before == 4 and d.state.version == r
    lr = d.exp.cfg.local.lr
    for u in seen:
        assert len(u["tasks"]) == 4
        g = torch.stack([task.message for task in u["tasks"]]).mean(dim=0)
        assert torch.allclose(u["after"], u["before"] - 0.5 * lr * g, atol=1e-6)
    assert max(s for u in seen for s in u["staleness"]) > 0


def test_afa_uploads_are_average_directions():
    d = _driver(_cfg("afa_cd", buffer_size=2, max_local_steps=5))
    calls, train = [], d.exp.trainer.train

    def spy(rows, nodes, keys, **kw):
        result = train(rows, nodes, keys, **kw)
        calls.append((rows.clone(), list(zip(nodes.tolist(), np.asarray(keys).tolist(), strict=True)),
                      result.params.clone(), kw["steps"].copy()))
        return result

    d.exp.trainer.train = spy
    seen = _spy_updates(d)
    _rows(d, 4)
    lr = d.exp.cfg.local.lr
    trained = {k: (row, out, s) for rows, keys, outs, steps in calls
               for k, row, out, s in zip(keys, rows, outs, steps, strict=True)}
    for u in seen:
        for task in u["tasks"]:
            row, out, s = trained[(task.client, task.key)]
            assert s == task.assigned
            assert torch.allclose(task.message, (row - out) / (lr * s), atol=1e-5)


def test_afa_cs_steps_with_every_clients_latest_direction():
    d = _driver(_cfg("afa_cs", buffer_size=3, server_lr=2.0, max_local_steps=6))
    seen = _spy_updates(d)
    latest = torch.zeros(8, d.state.params.numel())
    lr = d.exp.cfg.local.lr
    for _ in range(8):
        d.run_round()
        u = seen[-1]
        assert len(u["tasks"]) == 3
        for task in u["tasks"]:
            latest[task.client] = task.message
        assert torch.allclose(u["after"], u["before"] - 2.0 * lr * latest.mean(dim=0), atol=1e-6)
        assert torch.allclose(d.state.memory, latest)
    assert (latest.abs().sum(dim=1) > 0).sum() > 3


# --- determinism and resume ----------------------------------------------------------------------
def _rows(d: AsyncFLDriver, rounds: int) -> list[dict]:
    out = []
    for _ in range(rounds):
        d.run_round()
        out.append(d.evaluate())
    return out


def test_deterministic_given_the_seed():
    cfg = _cfg("fedbuff", buffer_size=2, concurrency=4)
    a, b = _driver(cfg), _driver(cfg)
    assert _rows(a, 5) == _rows(b, 5) and torch.equal(a.state.params, b.state.params)
    cfg["seed"] = 1
    assert _rows(_driver(cfg), 5) != _rows(_driver(_cfg("fedbuff", buffer_size=2, concurrency=4)), 5)


FAULTS = {"message_loss": {"prob": 0.2}, "stragglers": {"fraction": 0.3, "factor": 4.0, "mode": "per_round"},
          "delay_spikes": {"prob": 0.2, "delay_s": 0.5}}


@pytest.mark.parametrize("name,params", [
    ("fedasync", {"concurrency": 4}), ("fedbuff", {"buffer_size": 3, "concurrency": 5}),
    ("fedfix", {"delta_t_s": 0.4, "concurrency": 6, "max_staleness": 2}),
    ("fedcompass", {"max_local_steps": 12}),
    ("afa_cd", {"buffer_size": 3, "max_local_steps": 8, "think_time_s": 0.2}),
    ("afa_cs", {"buffer_size": 2, "min_local_steps": 2, "max_local_steps": 6, "max_staleness": 3})])
def test_state_dict_round_trip_resumes_identically(tmp_path, name, params):
    cfg = _cfg(name, **params)
    cfg["faults"] = FAULTS
    cfg["system"]["availability"] = {"model": "markov", "mean_on_s": 3.0, "mean_off_s": 1.0}
    full = _rows(_driver(cfg), 8)
    first, split = _driver(cfg), 0
    while split < 6:
        _rows(first, 1)
        split += 1
        mixed = any(t.message is not None for t in first.tasks) and any(t.start is not None for t in first.tasks)
        waiting = bool(first.protocol.group_buffer)      # FedCompass: clients wait in a group with their updates
        if split >= 3 and (mixed or name != "fedasync") and (waiting or name != "fedcompass"):
            break
    if name == "fedasync":        # the checkpoint holds trained and untrained in-flight tasks
        assert mixed
    if name == "fedcompass":
        assert waiting and any(g.open for g in first.protocol.schedule.groups.values())
    if name == "afa_cs":
        assert torch.count_nonzero(first.state.memory) > 0
    save_checkpoint(tmp_path / "ckpt.pt", {"driver": first.state_dict()})
    resumed = _driver(cfg)
    resumed.load_state_dict(load_checkpoint(tmp_path / "ckpt.pt")["driver"])
    assert _rows(resumed, 8 - split) == full[split:]
    assert resumed.acct.summary() == _driver_after(cfg, 8).acct.summary()


def test_resume_with_a_partly_filled_buffer(tmp_path):
    """Rounds without an update (nobody online) can end with accepted updates still buffered."""
    cfg = _cfg("fedbuff", buffer_size=3, concurrency=2)
    cfg["system"]["availability"] = {"model": "markov", "mean_on_s": 0.05, "mean_off_s": 2.0,
                                     "initial_on_fraction": 0.2}
    full = _rows(_driver(cfg), 10)
    first = _driver(cfg)
    _rows(first, 2)
    assert first.protocol.buffer and not first.tasks
    save_checkpoint(tmp_path / "ckpt.pt", {"driver": first.state_dict()})
    resumed = _driver(cfg)
    resumed.load_state_dict(load_checkpoint(tmp_path / "ckpt.pt")["driver"])
    assert _rows(resumed, 8) == full[2:]


def _driver_after(cfg: dict, rounds: int) -> AsyncFLDriver:
    d = _driver(cfg)
    _rows(d, rounds)
    return d


@pytest.mark.parametrize("name,params", [("fedbuff", {"buffer_size": 2, "concurrency": 4}),
                                         ("fedcompass", {"max_local_steps": 10}),
                                         ("afa_cs", {"buffer_size": 2, "think_time_s": 0.2})])
def test_runner_resume_matches_uninterrupted_run(tmp_path, name, params):

    cfg = _cfg(name, **params)
    cfg["system"]["availability"] = {"model": "markov", "mean_on_s": 3.0, "mean_off_s": 1.0}
    cfg["faults"] = {"message_loss": {"prob": 0.1}}
    run_split(cfg, tmp_path, split=3, total=6).run()
    assert (tmp_path / "a/metrics.csv").read_bytes() == (tmp_path / "b/metrics.csv").read_bytes()
    header = (tmp_path / "a/metrics.csv").read_text().splitlines()[0].split(",")
    assert {"updates", "mean_staleness", "in_flight", "accepted", "discarded"} <= set(header)
    summary = json.loads((tmp_path / "a/summary.json").read_text())
    assert summary["server_updates"] == 6 and len(summary["participation"]) == 8
    assert sum(summary["bytes_up_per_client"]) == summary["bytes_sent_total"]
    assert sum(summary["bytes_down_per_client"]) == summary["bytes_received_total"]


# --- faults, adversaries, idle servers --------------------------------------------------------------
@pytest.mark.parametrize("name,attack", [("fedasync", "sign_flip"), ("fedbuff", "alie"), ("fedfix", "gaussian"),
                                         ("fedcompass", "sign_flip"), ("afa_cs", "scaling")])
def test_runs_with_faults_and_attackers(name, attack):
    params = {"fedbuff": {"buffer_size": 3}, "fedfix": {"delta_t_s": 0.3}, "fedcompass": {"max_local_steps": 10},
              "afa_cs": {"buffer_size": 3, "think_time_s": 0.1}}.get(name, {})
    cfg = _cfg(name, nodes=12, concurrency=6, **params)
    cfg["faults"] = {**FAULTS, "message_loss": {"prob": 0.3},
                     "churn": {"fraction": 0.5, "on_s": {"dist": "exponential", "mean": 2.0},
                               "off_s": {"dist": "exponential", "mean": 1.0}},
                     "partitions": [{"at_s": 0.5, "heal_s": 1.5, "groups": 2}]}
    cfg["adversary"] = {"attack": attack, "fraction": 0.25}
    d = _driver(cfg)
    rows = _rows(d, 10)
    assert d.protocol.lost_tasks > 0 and torch.isfinite(d.state.params).all()
    assert d.bytes_up == d.acct.bytes_up.sum() and d.bytes_down == d.acct.bytes_down.sum()
    assert rows == _rows(_driver(cfg), 10)


def test_nobody_left_ends_rounds_without_an_update():
    cfg = _cfg("fedbuff", buffer_size=2)
    cfg["faults"] = {"events": [{"at_s": 0.0, "action": "remove", "fraction": 1.0}]}
    d = _driver(cfg)
    for _ in range(3):
        d.run_round()
    assert d.round == 3 and d.state.version == 0 and d.sim_time == 0.0 and not d.tasks


def test_offline_clients_fast_forward_the_clock():
    cfg = _cfg("fedasync", concurrency=2)
    cfg["system"]["availability"] = {"model": "markov", "mean_on_s": 0.2, "mean_off_s": 5.0,
                                     "initial_on_fraction": 0.0}
    d = _driver(cfg)
    _rows(d, 10)
    assert d.sim_time > 0 and d.acct.server_idle_s > 0
    assert d.state.version <= d.round


def test_immediate_redispatch_means_no_client_idle_time():
    d = _driver(_cfg("fedasync", concurrency=8))
    _rows(d, 20)
    assert d.acct.client_idle_s.sum() == 0.0 and d.acct.server_idle_s == 0.0


# --- accounting ---------------------------------------------------------------------------------
def test_accounting_idle_definition_and_state_round_trip():
    a = FLAccounting(3)
    a.finished(np.array([0, 1]), 1.0)
    a.assigned(np.array([0]), 1.0)                       # re-served at once: 0
    a.unavailable(np.array([False, True, True]), 2.5)    # client 1 leaves after 1.5 s; 2 never waited
    a.assigned(np.array([1]), 4.0)                       # no longer waiting: nothing added
    a.finished(np.array([2]), 3.0)
    a.assigned(np.array([2]), 3.25)
    assert a.client_idle_s.tolist() == [0.0, 1.5, 0.25]
    a.download(np.array([0, 0, 2]), 10)
    a.upload(np.array([2]), 7)
    a.accepted(np.array([0, 2, 2]))
    a.discard()
    a.server_idle(0.5)
    b = FLAccounting(3)
    b.load_state_dict(_to_numpy(_to_tensor(a.state_dict())))
    assert b.summary() == a.summary()
    s = a.summary()
    assert s["bytes_down_per_client"] == [20, 0, 10] and s["staleness_histogram"] == {"0": 1, "2": 2}
    assert s["mean_staleness"] == pytest.approx(4 / 3) and s["discarded_stale"] == 1
    assert s["max_bytes_per_client"] == 20 and s["server_idle_s"] == 0.5


# --- the user docs --------------------------------------------------------------------------------
def _doc_configs() -> list[dict]:
    return [yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", DOCS.read_text(), re.S)]


def test_docs_configs_build_and_run_a_round():
    configs = _doc_configs()
    assert {c["algorithm"]["name"] for c in configs} >= {"fedasync", "fedbuff", "fedfix", "fedcompass",
                                                          "afa_cd", "afa_cs"}
    for raw in configs:
        d = _driver(raw)
        d.run_round()
        assert d.round == 1 and math.isfinite(d.sim_time)


# --- compressed uploads ----------------------------------------------------------------------------
SLOW_UPLINK = {**VARIED, "bandwidth_up_Bps": {"dist": "constant", "value": 2e4}}


def _compressed(feedback: str = "ef", name: str = "topk", params: dict | None = None) -> dict:
    cfg = _cfg("fedbuff", system=SLOW_UPLINK, buffer_size=2, concurrency=4)
    cfg["compression"] = {"uplink": {"name": name, "params": {"density": 0.05} if params is None else params},
                          "feedback": feedback}
    return cfg


def test_compressed_uploads_are_the_decoded_updates_and_cost_their_encoded_bytes():
    from gossamer import wire
    from gossamer.compression import build_compressor, error_feedback
    from gossamer.protocols.upload import upload_keys

    plain, d = _driver(_cfg("fedbuff", system=SLOW_UPLINK, buffer_size=2, concurrency=4)), _driver(_compressed())
    numel = d.exp.spec.numel
    topk = build_compressor("topk", {"density": 0.05})
    assert d.up_bytes == wire.HEADER_BYTES + topk.nominal_bytes(numel) < plain.up_bytes / 5
    seen, batches, compress = _spy_updates(d), [], d._compressed

    def spy(nodes, keys, rows, messages):      # each batch's messages, before compression
        batches.append((nodes.copy(), keys.copy(), messages.clone()))
        return compress(nodes, keys, rows, messages)

    d._compressed = spy
    _rows(d, 4)
    # replay the clients' side batch by batch: FedBuff's message (an update) is sent as the
    # top-k of message + residual
    memory, sent = torch.zeros(d.exp.num_nodes, numel), {}
    for nodes, keys, messages in batches:
        _, decoded, memory[nodes] = error_feedback(topk, messages, memory[nodes], seed=d.exp.cfg.seed,
                                                   keys=upload_keys(nodes, keys))
        sent.update({(c, k): dec for c, k, dec in zip(nodes.tolist(), keys.tolist(), decoded, strict=True)})
    applied = [task for update in seen for task in update["tasks"]]
    assert len(applied) == 8 and len(sent) >= 8
    for task in applied:                       # what the server applied: the decoded message
        assert torch.equal(task.message, sent[(task.client, task.key)])
        assert int((task.message != 0).sum()) <= math.ceil(0.05 * numel)     # as sparse
    assert torch.equal(d.stage_state["memory"], memory)
    # the slow uplink carries 20x fewer bytes: the same updates end sooner
    assert d.acct.summary()["bytes_up_per_client"] != plain.acct.summary()["bytes_up_per_client"]
    _rows(plain, 4)
    assert d.sim_time < plain.sim_time


@pytest.mark.parametrize("feedback", ["ef", "ef21", "dgc"])
def test_compressed_runs_resume_identically_with_their_feedback_rows(tmp_path, feedback):
    cfg = _compressed(feedback, name="sign", params={}) if feedback == "ef21" else _compressed(feedback)
    full = _rows(_driver(cfg), 7)
    first = _driver(cfg)
    _rows(first, 3)
    assert torch.count_nonzero(first.stage_state["memory"]) > 0
    if feedback == "dgc":                    # DGC's momentum rows, kept across a client's tasks
        assert torch.count_nonzero(first.stage_state["momentum"]) > 0
    save_checkpoint(tmp_path / "ckpt.pt", {"driver": first.state_dict()})
    resumed = _driver(cfg)
    resumed.load_state_dict(load_checkpoint(tmp_path / "ckpt.pt")["driver"])
    assert _rows(resumed, 4) == full[3:]


@pytest.mark.parametrize("change, field", [
    ({"compression": {"uplink": {"name": "countsketch", "params": {"rows": 3, "ratio": 0.1, "density": 0.05}},
                      "feedback": "fetchsgd"}}, "compression.feedback"),
    ({"compression": {"uplink": {"name": "topk", "params": {"density": 0.1}}, "feedback": "dgc",
                      "warmup_rounds": 3}}, "compression.warmup_rounds"),     # no rounds to warm up over
    ({"compression": {"uplink": {"name": "threshold", "params": {"tau": 0.01}}}}, "compression.uplink"),
])
def test_what_async_compression_cannot_run_is_refused_naming_the_field(change, field):
    cfg = {**_cfg("fedbuff", buffer_size=2, concurrency=4), **change}
    with pytest.raises(config.ConfigError) as err:
        build_experiment(config.validate(cfg))
    assert err.value.field == field


def test_fedasync_sends_its_model_as_start_plus_the_compressed_update():
    cfg = _compressed("none")
    cfg["algorithm"] = {"name": "fedasync", "params": {"concurrency": 4}}
    d = _driver(cfg)
    batches, compress = [], d._compressed

    def spy(nodes, keys, rows, messages):
        out = compress(nodes, keys, rows, messages)
        batches.append((rows.clone(), messages.clone(), out.clone()))
        return out

    d._compressed = spy
    _rows(d, 3)
    k = math.ceil(0.05 * d.exp.spec.numel)
    for rows, models, sent in batches:
        moved = sent - rows                    # the server's model: start + the top-k of the update
        assert all(int((m != 0).sum()) <= k for m in moved)
        assert torch.allclose(moved.abs().amax(1), (models - rows).abs().amax(1))   # its largest entry kept
