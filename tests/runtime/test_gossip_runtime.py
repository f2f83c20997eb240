"""Asynchronous gossip learning on real peer processes."""

import csv
import json

import pytest

from gossamer.cli import main
from tests.conftest import small_config


@pytest.mark.parametrize("mode", ["push", "pull"])
def test_gossip_peers_learn(write_config, tmp_path, mode):
    cfg = small_config("gossip", stop={"rounds": 6})
    cfg["partition"]["num_nodes"] = 4
    cfg["algorithm"]["params"] = {"mode": mode, "period_s": 0.25}
    cfg["eval"] = {"every": 3}
    path = write_config(cfg)
    out = tmp_path / "run"
    assert main(["launch", str(path), "--out", str(out)]) == 0
    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["round"] for r in rows] == ["0", "3", "6"]
    assert float(rows[-1]["test_accuracy"]) > float(rows[0]["test_accuracy"]) + 0.1
    assert int(rows[-1]["bytes_up"]) > 0 and rows[-1]["avg_model_accuracy"] != ""
    assert json.loads((out / "summary.json").read_text())["executor"] == "runtime"


def test_a_gossip_peer_refuses_dual_clocks_which_only_the_simulator_runs(tmp_path):
    from gossamer import config
    from gossamer.runtime.gossip_peer import GossipPeer

    cfg = small_config("gossip")
    cfg["algorithm"]["params"] = {"clocks": "dual"}
    with pytest.raises(ValueError, match="clocks"):
        GossipPeer(config.validate(cfg), 0, tmp_path)
