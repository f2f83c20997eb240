"""Fault schedule: exact event times, selection rules, churn statistics and traces,
partitions, message faults, stragglers, resume, and one-line config errors."""

import numpy as np
import pytest
import torch

from gossamer import config
from gossamer.config import ConfigError
from gossamer.sim.faults import Faults
from gossamer.topology import make_topology
from tests.conftest import small_config

N = 8
ALL = np.ones(N, dtype=bool)


def make(faults: dict, n: int = N, *, algorithm: str = "dpsgd", degrees=None, has_data=None,
         stop: dict | None = None) -> Faults:
    raw = small_config(algorithm, faults=faults, partition={"name": "iid", "num_nodes": n})
    if stop is not None:
        raw["stop"] = stop
    cfg = config.validate(raw)
    if degrees is None and algorithm != "fedavg":
        degrees = make_topology("ring", n, 0).degrees()
    return Faults.from_config(cfg, n, degrees=degrees,
                              has_data=np.ones(n, dtype=bool) if has_data is None else has_data)


def const(value: float) -> dict:
    return {"dist": "constant", "value": value}


def test_disabled_faults_are_inert():
    f = make({})
    assert not f.enabled and not f.rejoin_fresh
    assert f.alive(0.0).all() and f.alive(1e9).all() and f.next_change() == np.inf
    assert not f.lost(1, np.arange(N), 0).any() and (f.extra_delay(1, 0, np.arange(N)) == 0).all()
    assert (f.slowdown(3, np.arange(N)) == 1).all() and f.connected(0.0, 0, np.arange(N)).all()
    assert f.server_reachable(5.0).all() and f.applied_events() == []
    assert make({"rejoin": "fresh"}).rejoin_fresh


def test_events_apply_at_exactly_their_time_and_restore():
    f = make({"events": [{"at_s": 5, "action": "remove", "nodes": [1, 2]},
                         {"at_s": 9, "action": "restore", "nodes": [2]},
                         {"at_s": 12, "action": "restore"}]})
    assert f.enabled and f.next_change() == 5.0
    assert f.alive(4.999).all()
    mask = f.alive(5.0)
    assert mask.tolist() == [True, False, False] + [True] * 5
    mask[:] = False                                           # a copy: the schedule is untouched
    assert f.alive(5.0).sum() == 6 and f.next_change() == 9.0
    assert f.alive(9.0).tolist() == [True, False] + [True] * 6 and f.rejoined().tolist() == [2]
    assert f.alive(11.0).sum() == 7 and f.rejoined().size == 0
    assert f.alive(12.0).all() and f.rejoined().tolist() == [1] and f.next_change() == np.inf
    assert [(e["t"], e["kind"], e["nodes"]) for e in f.applied_events()] == [
        (5.0, "remove", [1, 2]), (9.0, "restore", [2]), (12.0, "restore", [1])]
    with pytest.raises(ValueError, match="non-decreasing"):
        f.alive(11.0)


def test_highest_degree_picks_top_degrees_ties_by_id():
    degrees = np.array([1, 5, 3, 5, 2, 3, 1, 4])
    f = make({"events": [{"at_s": 1, "action": "remove", "count": 4, "select": "highest_degree"}]},
             degrees=degrees)
    assert np.flatnonzero(~f.alive(1.0)).tolist() == [1, 2, 3, 7]     # 5, 5, 4, then 3 (id 2 < 5)
    star = make_topology("star", N, 0)
    f = make({"events": [{"at_s": 0, "action": "remove", "fraction": 0.1, "select": "highest_degree"}]},
             degrees=star.degrees())
    assert np.flatnonzero(~f.alive(0.0)).tolist() == [int(np.argmax(star.degrees()))]


@pytest.mark.parametrize("seed_event", range(5))
def test_data_holders_and_relays_are_selected_apart(seed_event):
    has_data = np.zeros(N, dtype=bool)
    has_data[[0, 3, 4, 6]] = True
    events = [{"at_s": 1 + seed_event, "action": "remove", "fraction": 0.5, "select": "data_holders"},
              {"at_s": 2 + seed_event, "action": "remove", "count": 3, "select": "relay_only"}]
    f = make({"events": events}, has_data=has_data)
    first = np.flatnonzero(~f.alive(1.0 + seed_event))
    assert len(first) == 2 and has_data[first].all()
    second = np.setdiff1d(np.flatnonzero(~f.alive(2.0 + seed_event)), first)
    assert len(second) == 3 and not has_data[second].any()


def test_removal_chooses_among_alive_nodes_and_random_is_deterministic():
    events = [{"at_s": 1, "action": "remove", "nodes": [0, 1, 2, 3]},
              {"at_s": 2, "action": "remove", "fraction": 0.5}]
    f, g = make({"events": events}), make({"events": events})
    a, b = f.alive(3.0), g.alive(3.0)
    assert (a == b).all() and a.sum() == 2 and not a[:4].any()
    assert f.applied_events()[1]["nodes"] == g.applied_events()[1]["nodes"]


def test_crashes_are_permanent_and_at_their_times():
    f = make({"crash": {"fraction": 0.5, "at_s": const(10.0)}})
    assert f.alive(9.99).all() and f.next_change() == 10.0
    dead = ~f.alive(10.0)
    assert dead.sum() == 4 and (~f.alive(1e6) == dead).all() and f.next_change() == np.inf
    n = 200
    f = make({"crash": {"fraction": 0.25, "at_s": {"dist": "uniform", "low": 0, "high": 100}}}, n=n)
    seen, times = f.alive(0.0), np.full(n, np.inf)
    for t in np.arange(0.0, 101.0, 0.5):
        mask = f.alive(t)
        assert not (mask & ~seen).any() and f.rejoined().size == 0   # never back
        times[seen & ~mask] = t
        seen = mask
    assert np.isfinite(times).sum() == 50 and times[np.isfinite(times)].max() <= 100


@pytest.mark.parametrize("on,off,expected", [
    ({"dist": "exponential", "mean": 10}, {"dist": "exponential", "mean": 5}, 10 / 15),
    ({"dist": "uniform", "low": 4, "high": 6}, {"dist": "lognormal", "median": 2, "sigma": 0.5},
     5 / (5 + 2 * np.exp(0.125))),
    ({"dist": "tiers", "values": [2, 8], "probs": [0.5, 0.5]}, const(5), 5 / 10),
])
def test_churn_matches_configured_means(on, off, expected):
    n = 2000
    f = make({"churn": {"on_s": on, "off_s": off}}, n=n)
    assert f.alive(0.0).all()
    online, comebacks, span = [], 0, (200.0, 600.0)
    for t in np.arange(0.0, span[1], 0.25):
        mask = f.alive(t)
        if t > span[0]:
            online.append(mask.mean())
            comebacks += f.rejoined().size
    cycle = 1 / expected * _mean(on)                            # mean on + mean off
    assert np.mean(online) == pytest.approx(expected, abs=0.02)
    assert comebacks == pytest.approx(n * (span[1] - span[0]) / cycle, rel=0.06)


def _mean(spec: dict) -> float:
    if spec["dist"] == "uniform":
        return (spec["low"] + spec["high"]) / 2
    if spec["dist"] == "tiers":
        return float(np.dot(spec["values"], spec["probs"]))
    return spec["mean"]


def test_churn_fraction_and_start_offline():
    f = make({"churn": {"fraction": 0.25, "start_online": False, "on_s": const(3), "off_s": const(1)}})
    first = f.alive(0.0)
    assert (~first).sum() == 2 and f.next_change() == 1.0
    assert f.alive(1.0).all() and f.rejoined().tolist() == np.flatnonzero(~first).tolist()
    assert (f.alive(4.0) == first).all() and (f.alive(5.0)).all()


def test_trace_churn_matches_the_file(tmp_path):
    trace = tmp_path / "trace.csv"
    trace.write_text("node,leave_s,rejoin_s\n1,2.0,5\n1,7,8\n3,4,\n0,1,1.5\n")
    f = make({"churn": {"trace": str(trace)}})
    expect = {0.0: [], 1.0: [0], 1.5: [], 2.0: [1], 4.0: [1, 3], 4.999: [1, 3], 5.0: [3],
              7.0: [1, 3], 8.0: [3], 1e9: [3]}
    rejoined = {1.5: [0], 5.0: [1], 8.0: [1]}
    for t, down in expect.items():
        assert np.flatnonzero(~f.alive(t)).tolist() == down, t
        assert f.rejoined().tolist() == rejoined.get(t, []), t
    assert f.next_change() == np.inf


@pytest.mark.parametrize("rows,line,text", [
    ("node,leave,rejoin\n", 1, "expected the header"),
    ("node,leave_s,rejoin_s\n0,1,2\nx,1,2\n", 3, "not an integer"),
    ("node,leave_s,rejoin_s\n0,abc,2\n", 2, "finite numbers"),
    ("node,leave_s,rejoin_s\n0,-1,2\n", 2, ">= 0"),
    ("node,leave_s,rejoin_s\n0,5,2\n", 2, "before leave_s"),
    ("node,leave_s,rejoin_s\n8,1,2\n", 2, "outside 0..7"),
    ("node,leave_s,rejoin_s\n0,1,5\n1,1,2\n0,4,6\n", 4, "offline twice"),
    ("node,leave_s,rejoin_s\n0,1,\n0,4,6\n", 3, "offline twice"),
    ("node,leave_s,rejoin_s\n0,1\n", 2, "expected 3 columns"),
])
def test_bad_trace_rows_name_file_and_line(tmp_path, rows, line, text):
    trace = tmp_path / "bad.csv"
    trace.write_text(rows)
    with pytest.raises(ConfigError) as exc:
        make({"churn": {"trace": str(trace)}})
    message = str(exc.value)
    assert message.startswith(f"faults.churn.trace: {trace}:{line}: ") and text in message
    assert "\n" not in message


def test_partitions_cut_exactly_cross_group_pairs_until_heal():
    f = make({"partitions": [{"at_s": 2, "heal_s": 6, "groups": 3}]}, algorithm="fedavg")
    src, dst = np.divmod(np.arange(N * N), N)
    assert f.connected(1.999, src, dst).all() and f.connected(6.0, src, dst).all()
    assert f.server_reachable(1.0).all() and f.server_reachable(6.0).all()
    f.alive(2.0)
    (event,) = f.applied_events()
    groups = event["nodes"]
    assert event["kind"] == "partition" and sorted(map(len, groups)) == [2, 3, 3]
    group = np.empty(N, dtype=np.int64)
    for g, members in enumerate(groups):
        group[members] = g
    for t in (2.0, 4.0, 5.999):
        assert (f.connected(t, src, dst) == (group[src] == group[dst])).all()
        assert (f.server_reachable(t) == (group == 0)).all()
    assert f.connected(3.0, 0, 0).shape == ()


def test_partition_by_fractions_and_explicit_lists():
    f = make({"partitions": [{"at_s": 0, "fractions": [0.25, 0.75]},
                             {"at_s": 1, "heal_s": 2, "nodes": [[0, 1, 2, 3], [4, 5, 6, 7]]}]})
    f.alive(1.0)
    first, second = f.applied_events()
    assert [len(g) for g in first["nodes"]] == [2, 6]
    assert second["nodes"] == [[0, 1, 2, 3], [4, 5, 6, 7]] and second["heal_s"] == 2.0
    reach = np.zeros(N, dtype=bool)
    reach[first["nodes"][0]] = True
    assert (f.server_reachable(1.5) == (reach & (np.arange(N) < 4))).all()
    assert (f.server_reachable(2.5) == reach).all()
    assert not f.connected(1.5, 0, 4) and f.connected(2.5, 4, 5) == (reach[4] == reach[5])


def test_message_loss_and_delay_spikes_frequency_and_keying():
    f = make({"message_loss": {"prob": 0.2}, "delay_spikes": {"prob": 0.1, "delay_s": 3.0}})
    src, dst = np.divmod(np.arange(100_000), 100)
    lost = f.lost(7, src, dst)
    assert lost.shape == src.shape and lost.mean() == pytest.approx(0.2, abs=0.01)
    assert f.lost(7, 1, 2) == f.lost(7, np.array([0, 1]), 2)[1]            # pure in (key, src, dst)
    assert (f.lost(7, src, dst) == lost).all()
    keys = [f.lost(k, np.arange(N), (np.arange(N) + 1) % N) for k in range(200)]
    assert np.mean(keys) == pytest.approx(0.2, abs=0.03) and len({k.tobytes() for k in keys}) > 50
    delay = f.extra_delay(7, src, dst)
    assert f.extra_delay(7, 3, 5) == f.extra_delay(7, np.array([3]), np.array([4, 5]))[1]
    assert set(np.unique(delay)) == {0.0, 3.0} and (delay > 0).mean() == pytest.approx(0.1, abs=0.01)
    assert not ((delay > 0) == lost).all()                                 # independent streams


def test_stragglers_fixed_and_per_round():
    nodes = np.arange(N)
    f = make({"stragglers": {"fraction": 0.25, "factor": 4, "mode": "fixed"}})
    rounds = [f.slowdown(r, nodes) for r in range(1, 6)]
    assert all((r == rounds[0]).all() for r in rounds) and sorted(set(rounds[0])) == [1.0, 4.0]
    assert (rounds[0] == 4).sum() == 2
    f = make({"stragglers": {"fraction": 0.25, "factor": 2.5, "mode": "per_round"}})
    rounds = [f.slowdown(r, nodes) for r in range(1, 21)]
    assert all((r == 2.5).sum() == 2 for r in rounds)
    assert len({r.tobytes() for r in rounds}) > 5
    assert (f.slowdown(3, np.array([5, 1])) == rounds[2][[5, 1]]).all()


FULL = {"crash": {"fraction": 0.25, "at_s": {"dist": "exponential", "mean": 50}},
        "churn": {"fraction": 0.75, "on_s": {"dist": "exponential", "mean": 6},
                  "off_s": {"dist": "lognormal", "median": 2, "sigma": 0.7}},
        "events": [{"at_s": 20, "action": "remove", "fraction": 0.5},
                   {"at_s": 40, "action": "restore", "count": 1}, {"at_s": 60, "action": "restore"}],
        "partitions": [{"at_s": 30, "heal_s": 50, "groups": 2}]}


def _trajectory(f: Faults, times) -> list:
    return [(f.alive(t).tobytes(), f.rejoined().tolist(), f.next_change()) for t in times]


def test_state_dict_round_trip_continues_identically():
    times = np.arange(0.0, 100.0, 0.7)
    f = make(FULL)
    first = _trajectory(f, times[:60])
    state = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v   # as a checkpoint stores it
             for k, v in f.state_dict().items()}
    g = make(FULL)
    g.load_state_dict(state)
    assert _trajectory(g, times[60:]) == _trajectory(f, times[60:])
    assert g.applied_events() == f.applied_events()
    whole = make(FULL)
    assert _trajectory(whole, times) == first + _trajectory(make_resumed(state), times[60:])


def make_resumed(state: dict) -> Faults:
    f = make(FULL)
    f.load_state_dict(state)
    return f


def test_alive_does_not_depend_on_query_pattern_and_fast_forwards():
    coarse, fine = make(FULL), make(FULL)
    for t in np.arange(0.0, 100.0, 0.05):
        mask = fine.alive(t)
        if round(t * 20) % 100 == 0:
            assert (coarse.alive(t) == mask).all()
    f = make({"events": [{"at_s": 1, "action": "remove", "fraction": 1.0},
                         {"at_s": 10, "action": "restore"}]})
    assert not f.alive(1.0).any() and f.next_change() == 10.0
    assert f.alive(f.next_change()).all()


def _semantic(faults: dict, **kw) -> str:
    with pytest.raises(ConfigError) as exc:
        make(faults, **kw)
    return str(exc.value)


SCHEMA_ERRORS = [
    ({"crash": {"fraction": 1.5, "at_s": const(1)}}, "faults.crash.fraction"),
    ({"crash": {"fraction": 0.5}}, "faults.crash.at_s: required field is missing"),
    ({"churn": {"on_s": const(1)}}, "faults.churn: set trace, or on_s and off_s"),
    ({"churn": {"trace": "t.csv", "fraction": 0.5}}, "faults.churn: a trace replaces fraction"),
    ({"churn": {"on_s": const(0), "off_s": const(1)}}, "faults.churn: on_s durations must be > 0"),
    ({"events": [{"at_s": 1, "action": "remove"}]}, "faults.events.0: set exactly one of"),
    ({"events": [{"at_s": 1, "action": "remove", "count": 1, "nodes": [1]}]}, "faults.events.0: set exactly"),
    ({"events": [{"at_s": 1, "action": "remove", "fraction": 1.2}]}, "faults.events.0.fraction"),
    ({"events": [{"at_s": -1, "action": "remove", "count": 1}]}, "faults.events.0.at_s"),
    ({"events": [{"at_s": 1, "action": "explode", "count": 1}]}, "faults.events.0.action"),
    ({"events": [{"at_s": 1, "action": "remove", "count": 1, "select": "best"}]}, "faults.events.0.select"),
    ({"partitions": [{"at_s": 5, "heal_s": 5, "groups": 2}]}, "faults.partitions.0: heal_s (5.0) must be after"),
    ({"partitions": [{"at_s": 5, "groups": 2, "fractions": [1.0]}]}, "faults.partitions.0: set exactly"),
    ({"partitions": [{"at_s": 5, "fractions": [0.5, 0.6]}]}, "faults.partitions.0: fractions must"),
    ({"message_loss": {"prob": 1.5}}, "faults.message_loss.prob"),
    ({"delay_spikes": {"prob": 0.5, "delay_s": -1}}, "faults.delay_spikes.delay_s"),
    ({"stragglers": {"fraction": 0.5, "factor": 0.5}}, "faults.stragglers.factor"),
    ({"stragglers": {"fraction": 0.5, "factor": 2, "mode": "sometimes"}}, "faults.stragglers.mode"),
    ({"rejoin": "reboot"}, "faults.rejoin"),
    ({"typo": {}}, "faults.typo: unknown field"),
]


@pytest.mark.parametrize("faults,expected", SCHEMA_ERRORS)
def test_schema_errors_are_one_line_naming_the_field(faults, expected):
    with pytest.raises(ConfigError) as exc:
        config.validate(small_config("dpsgd", faults=faults))
    assert str(exc.value).startswith(expected) and "\n" not in str(exc.value)


SEMANTIC_ERRORS = [
    ({"events": [{"at_s": 50, "action": "remove", "count": 1}]}, {"max_sim_time_s": 10},
     "faults.events.0.at_s: 50.0 is after stop.max_sim_time_s (10.0)"),
    ({"partitions": [{"at_s": 50, "groups": 2}]}, {"max_sim_time_s": 10}, "faults.partitions.0.at_s: 50.0 is after"),
    ({"partitions": [{"at_s": 1, "groups": 9}]}, None, "faults.partitions.0.groups: 9 groups for 8 nodes"),
    ({"partitions": [{"at_s": 1, "nodes": [[0, 1, 2], [3, 4, 5, 6]]}]}, None,
     "faults.partitions.0.nodes: node 7 is in no group"),
    ({"partitions": [{"at_s": 1, "nodes": [[0, 1, 2, 3], [3, 4, 5, 6, 7]]}]}, None,
     "faults.partitions.0.nodes: node 3 is in more than one group"),
    ({"partitions": [{"at_s": 1, "nodes": [[0, 1, 2, 3], [4, 5, 6, 7, 8]]}]}, None,
     "faults.partitions.0.nodes: node 8 is outside 0..7"),
    ({"events": [{"at_s": 1, "action": "remove", "nodes": [2, 11]}]}, None,
     "faults.events.0.nodes: node 11 is outside 0..7"),
    ({"events": [{"at_s": 1, "action": "remove", "count": 9}]}, None, "faults.events.0.count: 9 is more than"),
    ({"crash": {"fraction": 0.5, "at_s": {"dist": "per_node", "values": [1, 2]}}}, None,
     "faults.crash.at_s: per_node needs 8 values"),
    ({"churn": {"trace": "/no/such/trace.csv"}}, None, "faults.churn.trace: cannot read /no/such/trace.csv"),
]


@pytest.mark.parametrize("faults,stop,expected", SEMANTIC_ERRORS)
def test_build_errors_are_one_line_naming_the_field(faults, stop, expected):
    message = _semantic(faults, stop=None if stop is None else {"rounds": 5, **stop})
    assert message.startswith(expected) and "\n" not in message


def test_highest_degree_needs_a_topology():
    faults = {"events": [{"at_s": 1, "action": "remove", "count": 2, "select": "highest_degree"}]}
    message = _semantic(faults, algorithm="fedavg")
    assert message == "faults.events.0.select: highest_degree needs a topology (decentralized algorithms)"
