"""The fault record: every crash, churn switch and event transition, with its time and round;
in summary.json (counts) and faults.csv (rows); equal after a resume."""

import csv
import json

import numpy as np
import pytest

from gossamer.cli import main
from gossamer.sim import faults as faults_mod
from tests.conftest import small_config
from tests.sim.test_faults import const, make


def _uniform(low, high):
    return {"dist": "uniform", "low": low, "high": high}


def _rows(path):
    with path.open() as f:
        return list(csv.DictReader(f))


def test_crashes_of_80_percent_are_recorded_with_their_times():
    n = 50
    f = make({"crash": {"fraction": 0.8, "at_s": _uniform(0, 50)}}, n=n)
    seen, first_dead = f.alive(0.0), np.full(n, np.inf)
    queries = np.arange(0.0, 60.0, 0.5)
    for i, t in enumerate(queries):
        f.round = i
        mask = f.alive(t)
        first_dead[seen & ~mask] = i
        seen = mask
    r = f.transitions()
    assert len(r["t"]) == 40 and (r["kind"] == faults_mod.KINDS.index("crash")).all() and not r["up"].any()
    assert sorted(r["node"].tolist()) == np.flatnonzero(~seen).tolist()
    assert (np.diff(r["t"]) >= 0).all()
    for t, node, rnd in zip(r["t"], r["node"], r["round"], strict=True):
        assert rnd == first_dead[node]                               # the query that saw it
        assert queries[rnd - 1] < t <= queries[rnd]                  # at its own time, in between
    counts = f.transition_counts()
    assert counts["crash"] == 40 and counts["down_now"] == 40 and counts["complete"]
    assert counts["churn_down"] == counts["churn_up"] == counts["remove"] == 0


def test_churn_records_downs_and_comebacks_of_the_schedule():
    f = make({"churn": {"fraction": 0.5, "on_s": const(3), "off_s": const(1)}})
    rejoined = []
    for t in np.arange(0.0, 20.0, 0.5):
        f.alive(t)
        rejoined += f.rejoined().tolist()
    r = f.transitions()
    members = np.unique(r["node"])
    assert len(members) == 4                                         # fraction 0.5 of 8
    churn = faults_mod.KINDS.index("churn")
    assert (r["kind"] == churn).all()
    for node in members:
        mine = r["node"] == node
        assert r["t"][mine].tolist() == [3.0, 4.0, 7.0, 8.0, 11.0, 12.0, 15.0, 16.0, 19.0]
        assert r["up"][mine].tolist() == [False, True] * 4 + [False]
    assert sorted(rejoined) == sorted(r["node"][r["up"]].tolist())   # comebacks = rejoined()
    counts = f.transition_counts()
    assert (counts["churn_down"], counts["churn_up"], counts["down_now"]) == (20, 16, 4)


def test_the_record_agrees_with_alive_under_churn_crashes_and_events():
    n = 40
    f = make({"churn": {"on_s": {"dist": "exponential", "mean": 4}, "off_s": {"dist": "exponential", "mean": 2}},
              "crash": {"fraction": 0.25, "at_s": _uniform(0, 30)},
              "events": [{"at_s": 10.0, "action": "remove", "count": 5},
                         {"at_s": 20.0, "action": "restore"}]}, n=n)
    times = np.arange(0.0, 40.0, 0.25)
    masks = [f.alive(t) for t in times]
    r = f.transitions()
    kinds = np.array(faults_mod.KINDS)[r["kind"]]
    crash = dict(zip(r["node"][kinds == "crash"].tolist(), r["t"][kinds == "crash"].tolist(), strict=True))
    removed = set(r["node"][kinds == "remove"].tolist())
    assert len(crash) == 10 and len(removed) == 5 and set(r["node"][kinds == "restore"]) <= removed
    # no churn switch is recorded for a node after its crash, or while removed
    for node, t in zip(r["node"][kinds == "churn"], r["t"][kinds == "churn"], strict=True):
        assert t < crash.get(int(node), np.inf)
        assert not (node in removed and 10.0 <= t < 20.0)
    # replaying the record gives alive() at every query
    state = np.ones(n, dtype=bool)
    churn_on, gone = np.ones(n, dtype=bool), np.zeros(n, dtype=bool)
    order = 0
    for t, mask in zip(times, masks, strict=True):
        while order < len(r["t"]) and r["t"][order] <= t:
            node, kind, up = int(r["node"][order]), kinds[order], bool(r["up"][order])
            if kind == "churn":
                churn_on[node] = up
            elif kind == "crash":
                gone[node] = True
            elif kind == "remove":
                state[node] = False
            else:
                state[node] = True
            order += 1
        # churn of a removed node is not recorded: a restored node's churn state is alive()'s
        expected = churn_on & ~gone & state
        differs = np.flatnonzero(expected != mask)
        assert all(node in removed for node in differs), (t, differs)


def test_record_is_bounded_and_counts_stay_exact(monkeypatch):
    monkeypatch.setattr(faults_mod, "MAX_RECORDED", 7)
    f = make({"churn": {"on_s": const(1), "off_s": const(1)}})
    f.alive(5.5)
    counts = f.transition_counts()
    assert len(f.transitions()["t"]) == counts["recorded"] == 7 and not counts["complete"]
    assert counts["churn_down"] + counts["churn_up"] == 8 * 5


def test_record_survives_a_state_dict_round_trip():
    import torch

    cfg = {"churn": {"on_s": {"dist": "exponential", "mean": 3}, "off_s": const(1)},
           "crash": {"fraction": 0.5, "at_s": _uniform(0, 20)}}
    whole, first = make(cfg), make(cfg)
    for i, t in enumerate(np.arange(0.0, 30.0, 0.5)):
        whole.round = i
        whole.alive(t)
        if t < 12:
            first.round = i
            first.alive(t)
    state = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in first.state_dict().items()}
    resumed = make(cfg)
    resumed.load_state_dict(state)
    for i, t in enumerate(np.arange(0.0, 30.0, 0.5)):
        if t >= 12:
            resumed.round = i
            resumed.alive(t)
    a, b = whole.transitions(), resumed.transitions()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert whole.transition_counts() == resumed.transition_counts()
    assert whole.transitions_csv() == resumed.transitions_csv()


def _run(tmp_path, raw, name, *args):
    import yaml

    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = tmp_path / name
    assert main(["run", str(path), "--out", str(out), "--quiet", *args]) == 0
    return out


def test_a_run_writes_counts_and_faults_csv(tmp_path):
    raw = small_config("fedavg", faults={"crash": {"fraction": 0.8, "at_s": _uniform(0, 1)}},
                       eval={"every": 1})
    raw["partition"]["num_nodes"] = 10
    out = _run(tmp_path, raw, "crash")
    summary = json.loads((out / "summary.json").read_text())
    record = summary["fault_transitions"]
    assert record["crash"] == 8 and record["file"] == "faults.csv" and record["complete"]
    assert summary["faults_applied"] == []                          # events and partitions only
    rows = _rows(out / "faults.csv")
    assert len(rows) == 8 and {r["kind"] for r in rows} == {"crash"} and {r["state"] for r in rows} == {"down"}
    # synchronous FL asks at each round's start: a crash shows in the first round starting after it
    start = {int(m["round"]) + 1: float(m["sim_time_s"]) for m in _rows(out / "metrics.csv")}
    for r in rows:
        t, rnd = float(r["t_s"]), int(r["round"])
        assert 0 <= t <= 1 and t <= start[rnd] and (rnd == 1 or start[rnd - 1] < t)


def test_no_record_without_node_faults(tmp_path):
    raw = small_config("fedavg", faults={"message_loss": {"prob": 0.1}})
    raw["stop"] = {"rounds": 2}
    out = _run(tmp_path, raw, "loss")
    assert "fault_transitions" not in json.loads((out / "summary.json").read_text())
    assert not (out / "faults.csv").exists()


@pytest.mark.parametrize("algorithm", ["fedavg", "dpsgd", "gossip"])
def test_resumed_run_records_what_an_uninterrupted_one_does(tmp_path, algorithm):
    faults = {"churn": {"fraction": 0.5, "on_s": {"dist": "exponential", "mean": 2},
                        "off_s": {"dist": "exponential", "mean": 1}},
              "crash": {"fraction": 0.25, "at_s": _uniform(0, 3)}}
    raw = small_config(algorithm, faults=faults)
    raw["system"] = {"sample_time_s": const(0.01)}
    full = _run(tmp_path, raw, "full")
    part = _run(tmp_path, dict(raw, stop={"rounds": 4}), "part")
    assert main(["run", "--resume", str(part), "--set", "stop.rounds=6", "--quiet"]) == 0
    assert (part / "metrics.csv").read_bytes() == (full / "metrics.csv").read_bytes()
    assert (part / "faults.csv").read_bytes() == (full / "faults.csv").read_bytes()
    a, b = (json.loads((d / "summary.json").read_text())["fault_transitions"] for d in (full, part))
    assert a == b and a["churn_down"] > 0 and a["churn_up"] > 0
