"""D-PSGD on real peer processes over gRPC: parity with the simulator, a peer dying mid-run."""

import csv
import json

from gossamer.cli import main
from tests.conftest import small_config


def _cfg():
    cfg = small_config("dpsgd", stop={"rounds": 3})
    cfg["partition"]["num_nodes"] = 4
    cfg["runtime"] = {"round_timeout_s": 4, "join_timeout_s": 60}
    return cfg


def _rows(run_dir):
    with (run_dir / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def test_peers_on_a_ring_match_the_simulator(write_config, tmp_path):
    path = write_config(_cfg())
    assert main(["launch", str(path), "--out", str(tmp_path / "real")]) == 0
    assert main(["run", str(path), "--out", str(tmp_path / "sim"), "--quiet"]) == 0
    real, sim = _rows(tmp_path / "real"), _rows(tmp_path / "sim")
    assert [r["round"] for r in real] == ["0", "1", "2", "3"]
    for key in ("test_accuracy", "acc_min", "acc_max", "avg_model_accuracy"):
        assert [r[key] for r in real[1:]] == [r[key] for r in sim[1:]], key
    summary = json.loads((tmp_path / "real" / "summary.json").read_text())
    assert summary["executor"] == "runtime" and summary["failed_peers"] == []


def test_a_killed_peer_is_skipped_by_its_neighbours(write_config, tmp_path, monkeypatch):
    monkeypatch.setenv("GOSSAMER_TEST_KILL_AT_ROUND", "3:1")      # peer 3 dies after round 1
    path = write_config(_cfg())
    assert main(["launch", str(path), "--out", str(tmp_path / "run")]) == 0
    rows = _rows(tmp_path / "run")
    assert [r["round"] for r in rows] == ["0", "1", "2", "3"]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["failed_peers"] == [3]
    assert float(rows[-1]["test_accuracy"]) > float(rows[1]["test_accuracy"])
    log = (tmp_path / "run" / "logs" / "peer-0.log").read_text()
    assert "no model from [3]" in log
