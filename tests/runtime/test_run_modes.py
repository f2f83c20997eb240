"""Run directories know which command wrote them; every --resume refuses the wrong one, and
``gossamer launch --resume`` continues an interrupted deployment to the simulator's numbers."""

import csv
import json
import os
import signal

import pytest

from gossamer.cli import main
from gossamer.metrics.rundir import mode_of
from tests.conftest import small_config


def _rows(run_dir):
    with (run_dir / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def _one_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.fixture
def sim_run(write_config, tmp_path):
    path = write_config(small_config("fedavg", stop={"rounds": 2}))
    out = tmp_path / "sim"
    assert main(["run", str(path), "--out", str(out), "--quiet"]) == 0
    assert json.loads((out / "run.json").read_text()) == {"mode": "simulator"}
    return out


def test_runtime_commands_refuse_to_resume_a_simulator_run(sim_run, capsys):
    before = (sim_run / "metrics.csv").read_bytes()
    capsys.readouterr()
    assert main(["server", "--resume", str(sim_run)]) == 2
    line = _one_line(capsys)
    assert "written by `gossamer run`" in line and f"gossamer run --resume {sim_run}" in line
    assert main(["launch", "--resume", str(sim_run)]) == 2
    assert "written by `gossamer run`, not `gossamer launch`" in _one_line(capsys)
    assert (sim_run / "metrics.csv").read_bytes() == before        # nothing was touched


def test_the_simulator_refuses_to_resume_a_deployment(tmp_path, capsys):
    for mode, files in [("launch", ["launch.yaml"]), ("server", ["checkpoints/server.pt"])]:
        run = tmp_path / mode                           # a directory from before run.json, too
        for name in files + ["config.yaml", "metrics.csv"]:
            (run / name).parent.mkdir(parents=True, exist_ok=True)
            (run / name).write_text("round\n0\n")
        assert mode_of(run) == mode
        assert main(["run", "--resume", str(run)]) == 2
        line = _one_line(capsys)
        assert f"written by `gossamer {mode}`, not `gossamer run`" in line
        assert (run / "metrics.csv").read_text() == "round\n0\n"


def test_launch_resume_continues_an_interrupted_deployment(write_config, tmp_path):
    cfg = small_config("fedavg", stop={"rounds": 3})
    cfg["partition"]["num_nodes"] = 3
    cfg["runtime"] = {"round_timeout_s": 30, "join_timeout_s": 60, "poll_interval_s": 0.05,
                      "threads_per_process": 2}
    path = write_config(cfg)
    reference = tmp_path / "reference"
    assert main(["run", str(path), "--out", str(reference), "--quiet"]) == 0
    out = tmp_path / "real"
    os.environ["GOSSAMER_TEST_KILL_SERVER_AT_ROUND"] = "2"      # the server dies after round 2
    try:
        assert main(["launch", str(path), "--out", str(out)]) == -signal.SIGKILL
    finally:
        del os.environ["GOSSAMER_TEST_KILL_SERVER_AT_ROUND"]
    assert mode_of(out) == "launch" and (out / "secrets" / "node-secret").exists()
    assert [r["round"] for r in _rows(out)] == ["0", "1", "2"]
    assert main(["launch", "--resume", str(out)]) == 0
    rows = _rows(out)
    assert [r["round"] for r in rows] == ["0", "1", "2", "3"]
    assert [r["test_accuracy"] for r in rows] == [r["test_accuracy"] for r in _rows(reference)]


@pytest.mark.parametrize("stop, row, want", [
    ({"target_accuracy": 0.5}, {"test_accuracy": 0.6, "sim_time_s": 1.0}, "target_accuracy"),
    ({"target_accuracy": 0.5, "stop_at_target": False}, {"test_accuracy": 0.6, "sim_time_s": 1.0}, None),
    ({"target_accuracy": 0.5, "stop_at_target": False, "max_sim_time_s": 1.0},
     {"test_accuracy": 0.6, "sim_time_s": 1.0}, "max_sim_time_s"),
    ({"target_accuracy": 0.7}, {"test_accuracy": 0.6, "sim_time_s": 1.0}, None),
])
def test_coordinators_stop_by_the_same_rules_as_the_simulator(stop, row, want):
    """Every runtime coordinator (synchronous, asynchronous, islands) asks ``_stopped``; with
    ``stop_at_target: false`` a reached target does not end the run."""
    from types import SimpleNamespace

    from gossamer import config
    from gossamer.runtime.coordinator import BaseCoordinator

    cfg = config.validate(small_config("fedavg", stop={"rounds": 5, **stop}))
    assert BaseCoordinator._stopped(SimpleNamespace(cfg=cfg), row) == want
