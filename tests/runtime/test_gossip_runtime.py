"""Asynchronous gossip learning on real peer processes."""

import csv
import json
import math

import pytest

from gossamer import rng
from gossamer.cli import main
from tests.conftest import small_config


def _rows(out):
    with (out / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("mode", ["push", "pull"])
def test_gossip_peers_learn(write_config, tmp_path, mode):
    cfg = small_config("gossip", stop={"rounds": 6})
    cfg["partition"]["num_nodes"] = 4
    cfg["algorithm"]["params"] = {"mode": mode, "period_s": 0.25}
    cfg["eval"] = {"every": 3}
    path = write_config(cfg)
    out = tmp_path / "run"
    assert main(["launch", str(path), "--out", str(out)]) == 0
    rows = _rows(out)
    assert [r["round"] for r in rows] == ["0", "3", "6"]
    assert float(rows[-1]["test_accuracy"]) > float(rows[0]["test_accuracy"]) + 0.1
    assert int(rows[-1]["bytes_up"]) > 0 and rows[-1]["avg_model_accuracy"] != ""
    assert json.loads((out / "summary.json").read_text())["executor"] == "runtime"


def _ticks(stream: int, node: int, period: float, end_s: float) -> int:
    """Ticks of a node's Poisson clock before ``end_s``: the simulator's draws, summed the way
    the peer sums them."""
    def gap(k):
        return -math.log1p(-rng.uniform_scalar(0, stream, node, k, 0)) * period

    count, k, t = 0, 0, gap(0)
    while t < end_s:
        count, k = count + 1, k + 1
        t += gap(k)
    return count


def test_dual_clock_gossip_peers_learn_at_their_clock_rates(write_config, tmp_path):
    """DADAO's two clocks on the wall clock: exchanges (merge on arrival, no training) every
    0.25 s and local updates every 0.1 s on average, for 2 s on 4 peers."""
    period, compute_period, rounds = 0.25, 0.1, 8
    cfg = small_config("gossip", stop={"rounds": rounds})
    cfg["partition"]["num_nodes"] = 4
    cfg["algorithm"]["params"] = {"mode": "push", "period_s": period, "clocks": "dual",
                                  "compute_period_s": compute_period}
    cfg["eval"] = {"every": 4}
    path = write_config(cfg)
    out = tmp_path / "run"
    assert main(["launch", str(path), "--out", str(out)]) == 0
    rows = _rows(out)
    assert [r["round"] for r in rows] == ["0", "4", "8"]
    assert float(rows[-1]["test_accuracy"]) > float(rows[0]["test_accuracy"]) + 0.1
    end_s = rounds * period
    stats = [json.loads((out / "peers" / f"gossip-{i}.json").read_text()) for i in range(4)]
    for i, s in enumerate(stats):
        # every clock tick before the end is handled, however late the loaded machine runs it
        assert s["exchanges"] == _ticks(rng.STREAM_GOSSIP, i, period, end_s)
        assert s["compute_ticks"] == _ticks(rng.STREAM_GOSSIP_COMPUTE, i, compute_period, end_s)
        # a tick runs an update unless the previous one still runs (no timing bound: loose)
        assert s["updates"] + s["compute_skipped"] == s["compute_ticks"]
        assert s["updates"] >= s["compute_ticks"] // 4
    # near the configured rates: 4 x 2 s / 0.25 s = 32 exchanges, 4 x 2 s / 0.1 s = 80 ticks
    assert 16 <= sum(s["exchanges"] for s in stats) <= 64
    assert 40 <= sum(s["compute_ticks"] for s in stats) <= 160
    # each successful push is merged once by its receiver (a few may arrive after it stopped)
    delivered = sum(s["exchanges"] - s["exchanges_failed"] for s in stats)
    assert delivered // 2 <= sum(s["merges"] for s in stats) <= delivered
