"""``gossamer sweep`` and ``compare --seeds``: grid expansion, run directories, resumability,
mean and 95% CI aggregation."""

import csv
import json
import math
import shutil

import pytest
import yaml

from gossamer.cli import main
from gossamer.errors import UserError
from gossamer.metrics import sweep as sweep_mod
from gossamer.metrics.compare import aggregate, mean_ci, seed_curves
from gossamer.metrics.sweep import Run, cell_name, cells, command, parse_grid, split_values
from tests.conftest import small_config


def test_split_values_keeps_commas_inside_brackets_and_quotes():
    assert split_values("0.02,0.05, 0.1") == ["0.02", "0.05", "0.1"]
    assert split_values("[16],[32,16]") == ["[16]", "[32,16]"]
    assert split_values("'a,b',c") == ["'a,b'", "c"]


def test_grid_is_a_cartesian_product_with_stable_safe_names():
    grid = parse_grid(["local.lr=0.05,0.1", "model.params.hidden=[16],[32,16]"])
    assert [k for k, _ in grid] == ["local.lr", "model.params.hidden"]
    names = [cell_name(c) for c in cells(grid)]
    assert names == ["local.lr=0.05,model.params.hidden=_16_", "local.lr=0.05,model.params.hidden=_32,16_",
                     "local.lr=0.1,model.params.hidden=_16_", "local.lr=0.1,model.params.hidden=_32,16_"]
    assert cells([]) == [[]] and cell_name([]) == "base"
    long = cell_name([("data.path", "/x" * 200)])
    assert len(long) <= 120 and "/" not in long and long == cell_name([("data.path", "/x" * 200)])


@pytest.mark.parametrize("item, expected", [
    ("local.lr", "expected key=v1,v2"), ("seed=1,2", "--seeds"), ("local.lr=0.1,,0.2", "empty value"),
    ("local.lr=0.1,0.1", "repeated"), ("a b=1", "expected key=v1,v2")])
def test_bad_grid_flags_are_one_line_errors(item, expected):
    with pytest.raises(UserError, match=expected):
        parse_grid([item])
    with pytest.raises(UserError, match="twice"):
        parse_grid(["local.lr=0.1", "local.lr=0.2"])


def test_mean_ci_is_student_t():
    mean, half = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)   # t_{0.975,2}
    assert mean_ci([0.5]) == (0.5, None)
    assert mean_ci([None, float("nan")]) == (None, None)
    assert mean_ci([0.7, None, 0.7])[1] == 0.0


def _fake_run(path, accs, dt=1.0, algorithm="fedavg"):
    """A run directory with metrics.csv (one evaluation per round) and summary.json."""
    path.mkdir(parents=True)
    with (path / "metrics.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["round", "sim_time_s", "bytes_up", "bytes_down", "test_accuracy"])
        for r, acc in enumerate(accs):
            w.writerow([r, r * dt, r * 1e6, r * 1e6, acc])
    (path / "summary.json").write_text(json.dumps({"algorithm": algorithm}))
    return path


def test_aggregate_counts_seeds_that_reach_each_target(tmp_path):
    dirs = [_fake_run(tmp_path / "s0", [0.1, 0.5, 0.8]), _fake_run(tmp_path / "s1", [0.1, 0.6, 0.9]),
            _fake_run(tmp_path / "s2", [0.1, 0.3, 0.4])]
    row = aggregate({"local.lr": "0.1"}, dirs, [0.5, 0.85])
    assert row["local.lr"] == "0.1" and row["seeds"] == 3 and row["algorithm"] == "fedavg"
    assert row["final_accuracy_mean"] == pytest.approx(0.7)
    assert row["final_accuracy_ci95"] == pytest.approx(mean_ci([0.8, 0.9, 0.4])[1])
    assert row["reached_0.5"] == 2 and row["time_to_0.5_mean"] == 1.0 and row["time_to_0.5_ci95"] == 0.0
    assert row["bytes_to_0.5_mean"] == 2e6
    assert row["reached_0.85"] == 1 and row["time_to_0.85_mean"] == 2.0 and row["time_to_0.85_ci95"] is None
    empty = aggregate({"local.lr": "1"}, [], [0.5])
    assert empty["seeds"] == 0 and empty["final_accuracy_mean"] is None and empty["reached_0.5"] == 0


def test_seed_curves_share_a_grid_over_the_range_every_seed_covers(tmp_path):
    a = _fake_run(tmp_path / "a", [0.0, 0.5, 1.0], dt=1.0)
    b = _fake_run(tmp_path / "b", [0.0, 0.5, 1.0, 1.0], dt=0.5)       # covers 0..1.5 s
    curves = seed_curves([a, b], points=4)
    x, mean, half = curves["time"]
    assert x[0] == 0.0 and x[-1] == 1.5                                # up to the shorter run
    assert mean[-1] == pytest.approx((0.75 + 1.0) / 2)                 # a interpolated at 1.5 s
    rounds, mean_r, _ = curves["round"]
    assert list(rounds) == [0, 1, 2] and list(mean_r) == [0.0, 0.5, 1.0]
    assert curves["bytes"][0][0] == pytest.approx(2.0)                 # log grid from the first positive


def test_command_reuses_finished_resumes_interrupted_and_refuses_another_config(tmp_path, write_config):
    config = str(write_config(small_config()))
    run = Run("x/seed=1", tmp_path / "x" / "seed=1", config, ["local.lr=0.05", "stop.rounds=3", "seed=1"])
    cmd = command(run)
    assert cmd[cmd.index("--out") + 1] == str(run.run_dir) and "local.lr=0.05" in cmd
    run.run_dir.mkdir(parents=True)
    from gossamer import config as config_mod

    (run.run_dir / "config.yaml").write_text(config_mod.dump(config_mod.load(config, run.overrides)))
    cmd = command(run)
    assert "--resume" in cmd and "local.lr=0.05" not in cmd and "stop.rounds=3" in cmd
    (run.run_dir / "summary.json").write_text("{}")
    assert command(run) is None
    other = Run(run.label, run.run_dir, config, ["local.lr=0.1", "seed=1"])
    with pytest.raises(UserError, match="differs at local.lr"):
        command(other)


@pytest.fixture
def in_process(monkeypatch):
    """Run the sweep's ``gossamer run`` commands in this process (no interpreter start per run);
    records each command; a run whose directory contains a name in ``fail`` exits 1."""
    calls, fail = [], set()

    def fake(cmd, env):
        calls.append(cmd)
        return (1 if any(f in " ".join(cmd) for f in fail) else main(cmd)), ""

    monkeypatch.setattr(sweep_mod, "execute", fake)
    return calls, fail


def _run_dir_of(cmd):
    return cmd[cmd.index("--resume") + 1] if "--resume" in cmd else cmd[cmd.index("--out") + 1]


def test_rerun_after_an_interruption_runs_only_what_is_missing(tmp_path, write_config, in_process, capsys):
    calls, fail = in_process
    config = str(write_config(small_config(stop={"rounds": 2})))
    out = tmp_path / "sw"
    argv = ["sweep", config, "--grid", "local.lr=0.05,0.1", "--seeds", "2", "--out", str(out),
            "--targets", "0.2"]
    fail.add("local.lr=0.1/seed=1")                          # one run crashes
    assert main(argv) == 2
    assert len(calls) == 4
    assert "1 of 4 runs failed" in capsys.readouterr().err
    table = (out / "sweep.md").read_text()
    assert "| 0.05 | 2 |" in table and "| 0.1 | 1 |" in table          # the finished ones
    fail.clear()
    # An interrupted run (killed after its config and checkpoint, before summary.json) and
    # one that never started.
    (out / "local.lr=0.05" / "seed=1" / "summary.json").unlink()
    shutil.rmtree(out / "local.lr=0.05" / "seed=0")
    kept = out / "local.lr=0.1" / "seed=0" / "summary.json"
    mtime = kept.stat().st_mtime_ns
    calls.clear()
    assert main(argv) == 0
    assert sorted(_run_dir_of(c) for c in calls) == sorted(
        str(out / d) for d in ("local.lr=0.05/seed=0", "local.lr=0.05/seed=1", "local.lr=0.1/seed=1"))
    assert "--resume" in next(c for c in calls if "local.lr=0.05/seed=1" in " ".join(c))
    assert kept.stat().st_mtime_ns == mtime
    assert "4 runs: 1 finished, 3 to run" in capsys.readouterr().out
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    assert [(r["local.lr"], r["seeds"]) for r in rows] == [("0.05", 2), ("0.1", 2)]
    with (out / "sweep.csv").open() as f:
        assert [r["seeds"] for r in csv.DictReader(f)] == ["2", "2"]
    stored = yaml.safe_load((out / "local.lr=0.1" / "seed=1" / "config.yaml").read_text())
    assert stored["seed"] == 1 and stored["local"]["lr"] == 0.1
    calls.clear()
    assert main(argv) == 0 and calls == []                             # all finished: nothing runs
    assert (out / "sweep.png").stat().st_size > 1000


def test_sweep_validates_every_cell_before_running(tmp_path, write_config, in_process, capsys):
    calls, _ = in_process
    config = str(write_config(small_config()))
    assert main(["sweep", config, "--grid", "local.lr=0.1,-1", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "local.lr=-1" in err and calls == []
    assert main(["sweep", config, "--grid", "local.lr=0.1", "--seeds", "0", "--out", str(tmp_path / "o")]) == 2
    assert "--seeds" in capsys.readouterr().err


def test_sweep_refuses_a_folder_holding_runs_of_another_config(tmp_path, write_config, in_process, capsys):
    config = str(write_config(small_config(stop={"rounds": 1})))
    out = str(tmp_path / "o")
    assert main(["sweep", config, "--grid", "local.lr=0.1", "--out", out]) == 0
    capsys.readouterr()
    assert main(["sweep", config, "--grid", "local.lr=0.1", "--set", "local.epochs=2", "--out", out]) == 2
    assert "differs at local.epochs" in capsys.readouterr().err


def test_compare_with_seeds_writes_mean_and_ci(tmp_path, write_config, in_process, capsys):
    calls, _ = in_process
    a = write_config(small_config("fedavg", stop={"rounds": 2}), "sync.yaml")
    b = write_config(small_config("fedavg", stop={"rounds": 2}, seed=5), "other.yaml")
    out = tmp_path / "cmp"
    assert main(["compare", str(a), str(b), "--seeds", "2", "--out", str(out), "--targets", "0.2"]) == 0
    assert sorted(_run_dir_of(c) for c in calls) == sorted(
        str(out / d) for d in ("sync/seed=0", "sync/seed=1", "other/seed=5", "other/seed=6"))
    table = (out / "comparison.md").read_text()
    assert "| sync | fedavg | 2 |" in table and "| other | fedavg | 2 |" in table and " ± " in table
    rows = json.loads((out / "comparison.json").read_text())
    assert rows[0]["seeds"] == 2 and rows[0]["final_accuracy_ci95"] is not None
    assert (out / "accuracy_vs_time.png").stat().st_size > 1000
    calls.clear()
    assert main(["compare", str(a), "--seeds", "2", "--out", str(out)]) == 0 and calls == []
