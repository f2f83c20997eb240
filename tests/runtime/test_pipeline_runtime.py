"""The upload pipeline on real processes: compressed uploads with feedback and DP-FedAvg run
the same stages as the simulator (protocols/upload.py), so `gossamer launch` equals
`gossamer run` round by round."""

import csv
import json

import pytest

from gossamer.cli import main
from tests.conftest import small_config


def _rows(run_dir):
    with (run_dir / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def _cfg(**sections):
    cfg = small_config("fedavg", stop={"rounds": 3})
    cfg["partition"]["num_nodes"] = 4
    cfg["runtime"] = {"round_timeout_s": 30, "join_timeout_s": 60, "poll_interval_s": 0.1,
                      "threads_per_process": 2}      # the simulator's threads: exact parity
    cfg.update(sections)
    return cfg


CASES = {
    "topk_ef": {"compression": {"uplink": {"name": "topk", "params": {"density": 0.05}},
                                "feedback": "ef"}},
    "randk_ef21_scaffold": {"algorithm": {"name": "scaffold", "params": {}},
                            "compression": {"uplink": {"name": "randk", "params": {"density": 0.1}},
                                            "feedback": "ef21"}},
    "dp_client_noise": {"privacy": {"dp": {"level": "client", "clip_norm": 0.5,
                                           "noise_multiplier": 0.8, "noise": "clients"}}},
    "dp_server_noise": {"privacy": {"dp": {"level": "client", "clip_norm": 0.5,
                                           "noise_multiplier": 0.8, "noise": "server"}}},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_launch_runs_the_simulators_upload_pipeline(write_config, tmp_path, case):
    path = write_config(_cfg(**CASES[case]))
    assert main(["launch", str(path), "--out", str(tmp_path / "real")]) == 0
    assert main(["run", str(path), "--out", str(tmp_path / "sim"), "--quiet"]) == 0
    real, sim = _rows(tmp_path / "real"), _rows(tmp_path / "sim")
    assert [r["test_accuracy"] for r in real] == [r["test_accuracy"] for r in sim]
    assert [r["test_loss"] for r in real] == [r["test_loss"] for r in sim]
    if "privacy" in CASES[case]:
        assert [r["epsilon"] for r in real] == [r["epsilon"] for r in sim]
    summary = json.loads((tmp_path / "real" / "summary.json").read_text())
    numel = summary["num_params"]
    if "compression" in CASES[case]:        # what really crossed the wire is the encoded update
        vectors = 2 if "scaffold" in case else 1
        assert summary["bytes_up_total"] < 3 * 4 * vectors * numel * 4 * 0.7
