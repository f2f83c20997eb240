import csv
import json

import numpy as np
import pytest
import torch

from gossamer import config
from gossamer.algorithms.dl.modest import probe, rank, sample
from gossamer.cli import main
from gossamer.metrics.runstore import load_checkpoint, save_checkpoint
from gossamer.sim.drivers import driver_for
from gossamer.sim.drivers.modest import ModestDriver
from gossamer.sim.experiment import build_experiment
from tests.conftest import small_config

FIXED = {"sample_time_s": {"dist": "constant", "value": 0.001},
         "latency_s": {"dist": "constant", "value": 0.05},
         "bandwidth_up_Bps": {"dist": "constant", "value": 1e6},
         "bandwidth_down_Bps": {"dist": "constant", "value": 1e7}}


def _config(nodes=8, availability=None, **params) -> dict:
    cfg = small_config("modest", topology={"name": "ring"}, partition={"name": "iid", "num_nodes": nodes})
    cfg["algorithm"]["params"] = {"sample_size": 4, "aggregators": 2, **params}
    cfg["system"] = dict(FIXED)
    if availability:
        cfg["system"]["availability"] = {"model": "markov", **availability}
    return cfg


def _driver(cfg) -> ModestDriver:
    exp = build_experiment(config.validate(cfg))
    driver = driver_for(exp.algorithm.pattern)(exp)
    assert isinstance(driver, ModestDriver)
    return driver


def _record_trainers(driver) -> list:
    """Wrap the batched trainer to record the node ids of every call."""
    calls, train = [], driver.exp.trainer.train

    def spy(rows, nodes, keys, **kw):
        calls.append(np.asarray(nodes).copy())
        return train(rows, nodes, keys, **kw)

    driver.exp.trainer.train = spy
    return calls


def test_every_round_trains_exactly_the_responsive_sampled_trainers():
    d = _driver(_config(nodes=16, availability={"mean_on_s": 20.0, "mean_off_s": 20.0},
                        timeout_s=2.0, announce_churn=False))
    calls = _record_trainers(d)
    seed, s = d.exp.cfg.seed, d.algorithm.sample_size
    for r in range(1, 9):
        alive = d.exp.availability.at(d.sim_time).copy()        # what the round will see at its start
        pool = np.flatnonzero(d.view & d.has_data)
        if r == 1:
            first = sample(pool, seed, 1, s)
            expected = first[alive[first]]
        else:
            ranked = rank(pool, seed, r)
            expected = probe(ranked, alive[ranked], s).chosen
        d.run_round()
        assert np.array_equal(calls[-1], expected) and alive[calls[-1]].all()
        assert d.evaluate()["participants"] == len(expected) == (s if r > 1 else len(expected))
    assert len(calls) == 8                                      # one batched call per round


def test_bytes_count_every_model_message():
    d = _driver(_config(sample_size=8))       # every node trains, so aggregators also train next round
    nbytes = d.exp.message_bytes
    d.run_round()                             # round 1: only the uploads, 8 trainers x 2 aggregators
    assert d.bytes_up == d.bytes_down == (8 * 2 - 2) * nbytes          # an aggregator keeps its own
    d.run_round()                             # then 2 x 8 downloads as well
    assert d.bytes_up == (8 * 2 - 2) * nbytes * 3
    d = _driver(_config(nodes=16, sample_size=4, aggregators=2))
    d.run_round()
    before = d.bytes_up
    for _ in range(4):
        d.run_round()
        per_round = (d.bytes_up - before) // nbytes
        before = d.bytes_up
        assert 2 * 2 * 4 - 4 <= per_round <= 2 * 2 * 4                # ~ 2 a s model messages


def test_first_round_time_is_slowest_trainer_to_the_aggregator():
    d = _driver(_config(sample_size=8, aggregators=1))
    d.run_round()
    exp = d.exp
    agg = rank(np.arange(8), exp.cfg.seed, 2)[0]
    nbytes = exp.message_bytes
    compute = 0.001 * exp.trainer.sizes                      # one epoch per trainer
    send = 2 * 0.05 + 0.05 + nbytes / 1e6 + nbytes / 1e7     # ping round trip, then one copy
    expected = np.where(np.arange(8) == agg, compute, compute + send).max()
    assert d.sim_time == pytest.approx(expected)
    assert d.agg_ids.tolist() == [agg] and d.num_aggregators == 1


def test_unresponsive_nodes_cost_timeouts_and_training_goes_on():
    d = _driver(_config(nodes=16, availability={"mean_on_s": 20.0, "mean_off_s": 20.0},
                        timeout_s=2.0, announce_churn=False))
    rows, start = [d.evaluate()], []
    for _ in range(10):
        start.append(d.sim_time)
        d.run_round()
        rows.append(d.evaluate())
    timed_out = [(row, t) for row, t in zip(rows[1:], start, strict=True) if row["timeouts"] > 0]
    assert len(timed_out) >= 3
    for row, t in timed_out:                                 # each timeout wave is on the critical path
        assert row["sim_time_s"] - t >= 2.0
    assert all(row["participants"] == 4 for row in rows[2:])
    assert rows[-1]["test_accuracy"] > rows[0]["test_accuracy"] + 0.2
    assert d.summary()["timeouts_total"] == sum(row["timeouts"] for row in rows)
    # with announced leaves the registry drops them, and the same churn costs far fewer timeouts
    announced = _driver(_config(nodes=16, availability={"mean_on_s": 20.0, "mean_off_s": 20.0},
                                timeout_s=2.0, announce_churn=True))
    for _ in range(10):
        announced.run_round()
    assert announced.total_timeouts < d.total_timeouts / 4
    assert announced.evaluate()["view_size"] < 16


def test_no_responsive_node_waits_for_the_next_switch_and_retries():
    d = _driver(_config(availability={"mean_on_s": 5.0, "mean_off_s": 1.0, "initial_on_fraction": 0.0},
                        timeout_s=0.5))
    d.run_round()                                           # everybody is offline at t = 0
    row = d.evaluate()
    assert row["participants"] == 0 and row["bytes_up"] == 0 and d.stalled_rounds == 1
    assert d.sim_time >= 0.5 and d.exp.availability.at(d.sim_time).any()
    while d.participants == 0:
        d.run_round()
    assert d.num_aggregators == 2 and d.bytes_up > 0 and d.round <= 4


def test_crashed_nodes_never_train():
    seed = 0
    victims = rank(np.arange(16), seed, 2)[:3]
    cfg = _config(nodes=16, sample_size=6, timeout_s=1.0)
    cfg["faults"] = {"events": [{"at_s": 0.0, "action": "remove", "nodes": victims.tolist()}]}
    d = _driver(cfg)
    crashed = np.isin(np.arange(16), victims)
    calls = _record_trainers(d)
    for _ in range(4):
        d.run_round()
    assert not any(crashed[ids].any() for ids in calls)
    assert all(len(ids) == 6 for ids in calls)
    assert d.total_timeouts > 0 and not np.isin(d.agg_ids, np.flatnonzero(crashed)).any()


def test_lost_uploads_and_stragglers_apply_to_modest():
    cfg = _config(nodes=16, sample_size=6, timeout_s=1.0)
    clean = _driver(cfg)
    cfg["faults"] = {"message_loss": {"prob": 0.3}, "stragglers": {"fraction": 0.5, "factor": 10.0}}
    faulty = _driver(cfg)
    for _ in range(4):
        clean.run_round()
        faulty.run_round()
    assert faulty.sim_time > clean.sim_time
    assert faulty.exp.faults.enabled and torch.isfinite(faulty.aggregates).all()


def test_state_dict_round_trip_resumes_identically(tmp_path):
    cfg = _config(nodes=16, availability={"mean_on_s": 20.0, "mean_off_s": 20.0}, timeout_s=2.0,
                  success_fraction=0.5)
    full = _driver(cfg)
    rows = []
    for _ in range(6):
        full.run_round()
        rows.append(full.evaluate())
    first = _driver(cfg)
    for _ in range(3):
        first.run_round()
    save_checkpoint(tmp_path / "ckpt.pt", {"driver": first.state_dict()})
    resumed = _driver(cfg)
    resumed.load_state_dict(load_checkpoint(tmp_path / "ckpt.pt")["driver"])
    again = []
    for _ in range(3):
        resumed.run_round()
        again.append(resumed.evaluate())
    assert again == rows[3:]


def test_runner_resume_matches_uninterrupted_run(write_config, tmp_path):
    cfg = _config(nodes=16, availability={"mean_on_s": 20.0, "mean_off_s": 20.0}, timeout_s=2.0)
    path = write_config(cfg)
    full, split = tmp_path / "full", tmp_path / "split"
    assert main(["run", str(path), "--out", str(full), "--quiet"]) == 0
    assert main(["run", str(path), "--out", str(split), "--quiet", "--set", "stop.rounds=3"]) == 0
    assert main(["run", "--resume", str(split), "--quiet", "--set", "stop.rounds=6"]) == 0
    assert (full / "metrics.csv").read_bytes() == (split / "metrics.csv").read_bytes()
    with open(full / "metrics.csv") as f:
        header = next(csv.reader(f))
    assert {"participants", "aggregators", "timeouts", "view_size"} <= set(header)
    summary = json.loads((full / "summary.json").read_text())
    assert summary["rounds"] == 6 and summary["quorum"] == 4


def test_learns_on_digits():
    d = _driver(_config(nodes=8, sample_size=4, aggregators=2, success_fraction=0.75))
    chance = d.evaluate()["test_accuracy"]
    for _ in range(10):
        d.run_round()
    row = d.evaluate()
    assert row["test_accuracy"] > 0.6 > chance + 0.3
    assert row["participants"] == 4 and row["aggregators"] == 2
