"""The random-walk driver: batched tokens, simulated time and bytes, faults, resume, a tiny run."""

import csv
import json

import numpy as np
import pytest
import torch

from gossamer import config
from gossamer.cli import main
from gossamer.config import ConfigError
from gossamer.sim.drivers import driver_for
from gossamer.sim.drivers.random_walk import RandomWalkDriver
from gossamer.sim.experiment import build_experiment
from tests.conftest import run_split, small_config

FIXED = {"sample_time_s": {"dist": "constant", "value": 0.001},
         "latency_s": {"dist": "constant", "value": 0.05},
         "bandwidth_up_Bps": {"dist": "constant", "value": 1e6},
         "bandwidth_down_Bps": {"dist": "constant", "value": 1e7}}
BA = {"name": "barabasi_albert", "params": {"m": 2}}


def _cfg(name="random_walk", topology=None, nodes=8, **params) -> dict:
    cfg = small_config(name, topology=topology or {"name": "ring"},
                       partition={"name": "iid", "num_nodes": nodes})
    cfg["algorithm"]["params"] = params
    cfg["system"] = dict(FIXED)
    return cfg


def _driver(cfg) -> RandomWalkDriver:
    exp = build_experiment(config.validate(cfg))
    driver = driver_for(exp.algorithm.pattern)(exp)
    assert isinstance(driver, RandomWalkDriver)
    return driver


def test_tiny_run_learns_and_counts_visits_bytes_and_time(tmp_path, write_config):
    out = tmp_path / "run"
    path = write_config(_cfg(num_tokens=2))
    assert main(["run", str(path), "--out", str(out), "--quiet"]) == 0
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    summary = json.loads((out / "summary.json").read_text())
    assert [int(r["round"]) for r in rows] == list(range(7))
    assert float(rows[-1]["test_accuracy"]) > float(rows[0]["test_accuracy"]) + 0.3
    assert float(rows[-1]["acc_min"]) <= float(rows[-1]["test_accuracy"]) <= float(rows[-1]["acc_max"])
    assert rows[-1]["avg_model_accuracy"] and 0 <= float(rows[-1]["visit_tv"]) <= 1
    # A simple walk on a ring never stays: every token moves every round.
    assert int(rows[-1]["visits"]) == 12 and sum(summary["visits_per_node"]) == 12
    assert summary["bytes_sent_total"] == 12 * summary["message_bytes"] == summary["hop_bytes"] * 12
    # A round: the slower token's hop, 1 epoch on its shard (compute) + latency + model over
    # the sender's up and the receiver's down link.
    sizes = build_experiment(config.validate(_cfg())).trainer.sizes
    transfer = 0.05 + summary["hop_bytes"] / 1e6 + summary["hop_bytes"] / 1e7
    rounds = np.diff([float(r["sim_time_s"]) for r in rows])
    assert all(min(abs(t - (n * 0.001 + transfer)) for n in set(sizes)) < 1e-9 for t in rounds)


def test_srrw_message_carries_the_visit_counts_and_covers_the_graph_better():
    walks = {}
    for name, params in [("random_walk", {}), ("srrw", {"alpha": 5.0})]:
        d = _driver(_cfg(name, topology=BA, nodes=16, num_tokens=4, **params))
        for _ in range(24):
            d.run_round()
        walks[name] = d
    srrw, plain = walks["srrw"], walks["random_walk"]
    assert srrw.hop_bytes == srrw.exp.message_bytes + 28 + 4 * 16 and plain.hop_bytes == plain.exp.message_bytes
    assert srrw.evaluate()["visit_tv_token"] < plain.evaluate()["visit_tv_token"]


def test_tokens_batched_equal_tokens_one_at_a_time():
    # SRRW over the simple chain on an irregular graph: reweighted visits, unequal shards.
    cfg = _cfg("srrw", topology=BA, nodes=10, num_tokens=3, base="simple", alpha=2.0)
    cfg["partition"] = {"name": "dirichlet", "num_nodes": 10, "params": {"alpha": 0.5}}
    together, alone = _driver(cfg), _driver(cfg)
    assert together.weights is not None              # visits are importance-weighted
    online = np.ones(10, dtype=bool)
    for r in range(1, 6):
        together.run_round()
        for k in range(3):
            alone.hop(np.array([k]), online, r)
        alone.round = r
        assert np.array_equal(together.position, alone.position)
        assert np.array_equal(together.visits, alone.visits)
        assert torch.allclose(together.params, alone.params, atol=1e-6)
    assert together.bytes_up == alone.bytes_up and together.node_steps == alone.node_steps


def test_tokens_never_train_at_offline_nodes_and_skip_on():
    cfg = _cfg(topology=BA, nodes=12, num_tokens=4)
    cfg["system"]["availability"] = {"model": "markov", "mean_on_s": 1.0, "mean_off_s": 1.0}
    d = _driver(cfg)
    for _ in range(40):
        before, start = d.visits.copy(), d.position.copy()
        d.run_round()
        up = d.last_online[start]                  # tokens whose node was up at the round start
        expected = np.zeros_like(before)
        expected[np.flatnonzero(up), start[up]] = 1
        assert np.array_equal(d.visits - before, expected)
        assert (d.position[~up] != start[~up]).sum() + d.waiting >= (~up).sum()
    row = d.evaluate()
    assert row["token_skips"] > 0 and row["visits"] < 40 * 4
    assert d.bytes_up == d.bytes_down               # no message loss configured


def test_lost_transfers_keep_the_token_and_count_bytes_sent():
    cfg = _cfg(num_tokens=3)
    cfg["faults"] = {"message_loss": {"prob": 0.5}}
    d = _driver(cfg)
    for _ in range(10):
        d.run_round()
    assert d.lost > 0 and d.bytes_up - d.bytes_down == d.lost * d.hop_bytes
    assert int(d.visits.sum()) == 30                 # a token whose transfer was lost trains again


def test_model_attacks_are_refused_with_one_line():
    cfg = _cfg()
    cfg["adversary"] = {"fraction": 0.25, "attack": "sign_flip"}
    with pytest.raises(ConfigError, match="adversary.attack"):
        _driver(cfg)


def test_runner_resume_matches_uninterrupted_run(tmp_path):
    cfg = _cfg("srrw", topology=BA, nodes=10, num_tokens=3, alpha=3.0)
    cfg["system"]["availability"] = {"model": "markov", "mean_on_s": 2.0, "mean_off_s": 1.0}
    cfg["faults"] = {"message_loss": {"prob": 0.2}, "stragglers": {"fraction": 0.3, "factor": 3.0}}
    run_split(cfg, tmp_path, split=4, total=8).run()
    assert (tmp_path / "a/metrics.csv").read_bytes() == (tmp_path / "b/metrics.csv").read_bytes()
    a, b = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("a", "b"))
    assert a["visits_per_node"] == b["visits_per_node"] and a["bytes_sent_total"] == b["bytes_sent_total"]
