"""End-to-end: the CLI, the run directory, determinism, and resume after kill -9."""

import csv
import json
import subprocess

import pytest
import torch

from gossamer import wire
from gossamer.cli import main
from tests.conftest import gossamer_cmd, interruptible, small_config, subprocess_env


def _run(write_config, tmp_path, cfg, name):
    out = tmp_path / name
    assert main(["run", str(write_config(cfg, f"{name}.yaml")), "--out", str(out), "--quiet"]) == 0
    return out


def _rows(run_dir):
    with (run_dir / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("algorithm", ["fedavg", "dpsgd", "gossip"])
def test_run_directory_contents(write_config, tmp_path, algorithm):
    out = _run(write_config, tmp_path, small_config(algorithm), "run")
    for name in ("config.yaml", "metrics.csv", "summary.json", "environment.json", "model.pt",
                 "checkpoints/checkpoint.pt"):
        assert (out / name).exists(), name
    rows = _rows(out)
    assert [int(r["round"]) for r in rows] == list(range(7))
    for col in ("round", "sim_time_s", "bytes_up", "bytes_down", "test_accuracy", "test_loss"):
        assert col in rows[0]
    if algorithm != "fedavg":
        for col in ("acc_min", "acc_max", "acc_median", "avg_model_accuracy", "consensus_distance"):
            assert rows[-1][col] != ""
    assert [float(r["sim_time_s"]) for r in rows] == sorted(float(r["sim_time_s"]) for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    for key in ("final_test_accuracy", "bytes_sent_total", "sim_time_s", "wall_time_s", "loop_time_s"):
        assert summary[key] is not None
    assert summary["final_test_accuracy"] == pytest.approx(float(rows[-1]["test_accuracy"]))
    assert float(rows[-1]["test_accuracy"]) > float(rows[0]["test_accuracy"])
    if algorithm != "fedavg":
        assert 0 < summary["spectral_gap"] <= 1


def test_fedavg_bytes_equal_encoded_message_sizes(write_config, tmp_path):
    cfg = small_config("fedavg")
    cfg["algorithm"]["params"] = {"client_fraction": 0.5}
    out = _run(write_config, tmp_path, cfg, "bytes")
    state = torch.load(out / "model.pt", weights_only=True)
    flat = torch.cat([v.reshape(-1) for v in state.values()])
    msg = len(wire.encode(flat))
    rows = _rows(out)
    assert int(rows[-1]["bytes_up"]) == 6 * 4 * msg == int(rows[-1]["bytes_down"])


@pytest.mark.parametrize("algorithm", ["fedavg", "dpsgd", "gossip"])
def test_same_config_and_seed_give_identical_metrics(write_config, tmp_path, algorithm):
    a = _run(write_config, tmp_path, small_config(algorithm), "a")
    b = _run(write_config, tmp_path, small_config(algorithm), "b")
    assert (a / "metrics.csv").read_bytes() == (b / "metrics.csv").read_bytes()
    other = small_config(algorithm)
    other["seed"] = 1
    c = _run(write_config, tmp_path, other, "c")
    assert (a / "metrics.csv").read_bytes() != (c / "metrics.csv").read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["fedavg", "dpsgd", "gossip"])
def test_resume_after_kill_matches_uninterrupted_run(write_config, tmp_path, algorithm):
    """Only the killed run needs a process of its own (SIGKILL mid-run); the uninterrupted
    reference and the resume run in this one (each process start costs seconds)."""
    cfg = small_config(algorithm)
    path = write_config(cfg)
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert main(["run", str(path), "--out", str(full), "--quiet"]) == 0
    proc = subprocess.run(gossamer_cmd("run", str(path), "--out", str(killed), "--quiet"),
                          env=subprocess_env(GOSSAMER_TEST_KILL_AT_ROUND="3"))
    assert proc.returncode == -9                       # really killed, mid-run
    assert [r["round"] for r in _rows(killed)] == ["0", "1", "2", "3"]
    assert main(["run", "--resume", str(killed), "--quiet"]) == 0
    assert (full / "metrics.csv").read_bytes() == (killed / "metrics.csv").read_bytes()


def test_refuses_to_overwrite_and_checks_resume_config(write_config, tmp_path, capsys):
    cfg_path = write_config(small_config("fedavg"))
    out = tmp_path / "r"
    assert main(["run", str(cfg_path), "--out", str(out), "--quiet"]) == 0
    assert main(["run", str(cfg_path), "--out", str(out), "--quiet"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["run", "--resume", str(out), "--set", "local.lr=1"]) == 2
    assert "only stop.*" in capsys.readouterr().err
    assert main(["run", "--resume", str(tmp_path / "nothing")]) == 2
    # extending a finished run continues from its last checkpoint
    assert main(["run", "--resume", str(out), "--set", "stop.rounds=8", "--quiet"]) == 0
    assert [int(r["round"]) for r in _rows(out)] == list(range(9))


def test_plot_writes_figures(write_config, tmp_path):
    a = _run(write_config, tmp_path, small_config("fedavg"), "a")
    b = _run(write_config, tmp_path, small_config("dpsgd"), "b")
    figs = tmp_path / "figs"
    assert main(["plot", str(a), str(b), "--out", str(figs)]) == 0
    for name in ("accuracy_vs_round.png", "accuracy_vs_time.png", "accuracy_vs_bytes.png"):
        assert (figs / name).stat().st_size > 1000
    assert main(["plot", str(tmp_path / "missing")]) == 2


def test_stop_rules_target_accuracy_and_simulated_time(write_config, tmp_path):
    cfg = small_config("fedavg", stop={"rounds": 50, "target_accuracy": 0.6})
    out = _run(write_config, tmp_path, cfg, "target")
    summary = json.loads((out / "summary.json").read_text())
    rows = _rows(out)
    first = next(r for r in rows if float(r["test_accuracy"]) >= 0.6)
    assert summary["stopped_by"] == "target_accuracy" and summary["rounds"] < 50
    assert summary["time_to_target_s"] == pytest.approx(float(first["sim_time_s"]))
    assert int(rows[-1]["round"]) == int(first["round"]) == summary["rounds_to_target"]
    cfg = small_config("dpsgd", stop={"rounds": 50, "max_sim_time_s": 1.0})
    out = _run(write_config, tmp_path, cfg, "budget")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_by"] == "max_sim_time_s" and summary["sim_time_s"] >= 1.0
    assert float(_rows(out)[-2]["sim_time_s"]) < 1.0


def test_time_to_several_targets_without_stopping(write_config, tmp_path):
    cfg = small_config("fedavg", stop={"rounds": 8, "target_accuracy": 0.5, "stop_at_target": False})
    cfg["eval"] = {"targets": [0.85, 0.5, 0.99]}
    out = _run(write_config, tmp_path, cfg, "targets")
    summary = json.loads((out / "summary.json").read_text())
    rows = _rows(out)
    assert summary["stopped_by"] == "rounds" and summary["rounds"] == 8
    for goal in (0.5, 0.85):
        first = next((r for r in rows if float(r["test_accuracy"]) >= goal), None)
        got = summary["time_to_targets"][str(goal)]
        if first is None:
            assert got is None
        else:
            assert got["time_s"] == pytest.approx(float(first["sim_time_s"]))
            assert got["round"] == int(first["round"])
            assert got["bytes"] == int(first["bytes_up"]) + int(first["bytes_down"])
    assert summary["time_to_targets"]["0.99"] is None
    assert summary["time_to_target_s"] == summary["time_to_targets"]["0.5"]["time_s"]


@pytest.mark.parametrize("section, expected", [
    ({"faults": {"events": [{"at_s": 50, "action": "remove", "fraction": 1.5}]}}, "faults.events.0.fraction"),
    ({"faults": {"events": [{"at_s": 50, "action": "remove", "nodes": [42]}]}}, "faults.events.0.nodes"),
    ({"faults": {"partitions": [{"at_s": 50, "groups": 2}]}, "stop": {"rounds": 3, "max_sim_time_s": 10}},
     "faults.partitions.0.at_s"),
    ({"adversary": {"attack": "alie", "fraction": -0.1}}, "adversary.fraction"),
])
def test_bad_fault_and_adversary_configs_exit_2_with_one_line(write_config, capsys, section, expected):
    cfg = small_config("dpsgd")
    cfg.update(section)
    assert main(["validate", str(write_config(cfg))]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err


@pytest.mark.slow
def test_compare_runs_configs_and_writes_table_and_figure(write_config, tmp_path, capsys):
    a = write_config(small_config("fedavg", stop={"rounds": 3}), "sync.yaml")
    cfg = small_config("fedbuff", stop={"rounds": 6})
    cfg["algorithm"]["params"] = {"buffer_size": 2, "concurrency": 4}
    b = write_config(cfg, "buffered.yaml")
    out = tmp_path / "cmp"
    assert main(["compare", str(a), str(b), "--out", str(out), "--targets", "0.3,0.99"]) == 0
    table = (out / "comparison.md").read_text()
    assert "| sync | fedavg |" in table and "| buffered | fedbuff |" in table
    assert "not reached" in table                            # 99% is out of reach in a few rounds
    rows = json.loads((out / "comparison.json").read_text())
    sync = _rows(out / "sync")
    first = next(r for r in sync if float(r["test_accuracy"]) >= 0.3)
    assert rows[0]["time_to_0.3"] == pytest.approx(float(first["sim_time_s"]))
    assert (out / "accuracy_vs_time.png").stat().st_size > 1000
    mtime = (out / "sync" / "summary.json").stat().st_mtime
    assert main(["compare", str(a), "--out", str(out)]) == 0        # finished runs are reused
    assert (out / "sync" / "summary.json").stat().st_mtime == mtime
    capsys.readouterr()
    assert main(["compare", str(a), "--out", str(out), "--targets", "1.5"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


@pytest.mark.slow
def test_sweep_interrupted_with_ctrl_c_then_rerun_finishes_only_what_is_missing(write_config, tmp_path, capsys):
    """A real sweep process gets SIGINT (its runs too, as from a terminal) after its first
    finished run; the same command again runs exactly the runs without summary.json."""
    import os
    import signal
    import time

    config = write_config(small_config(stop={"rounds": 3}))
    out = tmp_path / "sweep"
    argv = ["sweep", str(config), "--grid", "local.lr=0.05,0.1", "--seeds", "2", "--out", str(out),
            "--targets", "0.2"]
    proc = subprocess.Popen(gossamer_cmd(*argv), env=subprocess_env(), start_new_session=True,
                            preexec_fn=interruptible, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    while not list(out.glob("*/seed=*/summary.json")) and proc.poll() is None:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "resume with the same command" in err, err
    finished = {p: p.stat().st_mtime_ns for p in out.glob("*/seed=*/summary.json")}
    assert 1 <= len(finished) < 4
    assert main(argv) == 0
    assert f"4 runs: {len(finished)} finished, {4 - len(finished)} to run" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in finished} == finished           # not run again
    assert len(list(out.glob("*/seed=*/summary.json"))) == 4
    table = (out / "sweep.md").read_text()
    assert "| 0.05 | 2 |" in table and "| 0.1 | 2 |" in table and " ± " in table


def test_validate_prints_memory_and_time_estimates(write_config, capsys):
    cfg = small_config("dpsgd")
    assert main(["validate", str(write_config(cfg))]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("ok: dpsgd")
    assert out[1].startswith("memory estimate: ") and "built: libraries, data, graph" in out[1]
    assert out[2].startswith("time estimate: ~") and "for 6 rounds" in out[2]


def test_validate_with_ranks_estimates_each_rank_and_refuses_what_the_machine_cannot_hold(
        write_config, capsys, monkeypatch):
    """``--ranks K``: every rank builds the run, what the executor allocates is split or shared;
    too many ranks for this machine's memory, or a run the sharded simulator refuses, is one
    line naming the field."""
    from gossamer import checks
    from gossamer.estimate import Estimate

    path = str(write_config(small_config("dpsgd")))
    assert main(["validate", path, "--ranks", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[3].startswith("with 3 ranks on this machine: about ") and " a rank " in out[3]
    assert out[4].startswith("time with 3 ranks: at best ~")
    est = Estimate(parts=[("built: libraries, data, graph", 300e6), ("sync_dl models", 600e6)])
    monkeypatch.setattr(checks, "available_memory_bytes", lambda: 2 * 10**9)
    assert est.ranks(2)[1] is None                              # 2 x 300 + 600 MB fit in 2 GB
    lines, refusal = est.ranks(6)                               # 6 x 300 + 600 MB do not
    assert "about 400 MB a rank" in lines[0] and refusal.startswith("--ranks: 6 ranks would hold about 2.4 GB")
    # on GPUs each rank's share goes to its own GPU: the host holds the builds only
    est.device, est.device_free = "a test GPU", 250 * 10**6
    lines, refusal = est.ranks(2)                               # 300 MB a GPU: more than 250 free
    assert lines[1].startswith("on GPUs: about 300 MB on each rank's GPU")
    assert refusal.startswith("--ranks: each of 2 ranks would allocate about 300 MB on its GPU")
    assert est.ranks(3)[1] is None and est.ranks(6)[1] is None  # 200 and 100 MB a GPU; 6 x 300 MB host
    zeroth = write_config({**small_config("fedavg"), "algorithm": {"name": "zo_fedavg"}})
    assert main(["validate", str(zeroth), "--ranks", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "algorithm.name" in err[0] and "drop --ranks" in err[0]


def test_estimate_counts_the_population_copies_and_a_state_budget():
    from gossamer import config
    from gossamer.estimate import estimate
    from gossamer.sim.experiment import build_experiment

    def parts(exp):
        est = estimate(exp, time_it=False)
        assert est.round_s is None
        return {what.split(" (")[0]: size for what, size in est.parts}

    exp = build_experiment(config.validate(small_config("dpsgd")))
    assert parts(exp)["sync_dl models"] == 2 * 8 * 4 * exp.spec.numel
    # the same buffers the builder's memory check counts: compression's too
    cfg = small_config("fedavg", compression={"uplink": {"name": "topk", "params": {"density": 0.1}},
                                              "feedback": "dgc", "downlink": {"name": "quantize", "params": {"bits": 8}}})
    exp = build_experiment(config.validate(cfg))
    got = parts(exp)
    for what in ("error-feedback residuals", "DGC momentum", "downlink compression memory"):
        assert got[what] == 8 * 4 * exp.spec.numel
    lazy = small_config("scaffold", data={"dataset": "synthetic", "params": {"dim": 10}},
                        partition={"name": "natural", "num_nodes": 10**6},
                        population={"lazy": True, "state_budget_mb": 1})
    assert parts(build_experiment(config.validate(lazy)))["client state"] == 2**20


def test_validate_refuses_a_run_the_machine_cannot_hold_naming_the_field(write_config, capsys, monkeypatch):
    from gossamer import checks

    monkeypatch.setattr(checks, "available_memory_bytes", lambda: 10**4)      # 10 kB left
    assert main(["validate", str(write_config(small_config("fedavg")))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gossamer: config error: algorithm.params: the run will "
                                               "allocate about"), err
