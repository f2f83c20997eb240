"""The simulator sharded over torch.distributed ranks: work split, exact sums, failures, resume."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from gossamer import config
from gossamer.config import ConfigError
from gossamer.sim.experiment import build_experiment
from gossamer.sim.sharded import BLOCK, check, ranges
from tests.conftest import small_config

ROOT = Path(__file__).resolve().parents[2]


def test_ranges_are_contiguous_block_aligned_and_balanced_by_work():
    work = np.ones(1000)
    work[:200] = 10                                   # the first ids hold most of the data
    cuts = ranges(work, 2, block=50)
    assert cuts[0][0] == 0 and cuts[-1][1] == 1000 and cuts[0][1] == cuts[1][0]
    assert cuts[0][1] % 50 == 0
    share = [work[a:b].sum() for a, b in cuts]
    assert abs(share[0] - share[1]) <= 50 * 10       # within one block's work
    assert ranges(work, 1) == [(0, 1000)]
    many = ranges(np.ones(100), 4, block=BLOCK)       # fewer blocks than ranks: some own nothing
    assert [b - a for a, b in many].count(0) >= 2 and sum(b - a for a, b in many) == 100


@pytest.mark.parametrize("change, field", [
    ({"algorithm": {"name": "scaffold"}}, "algorithm.name"),
    ({"faults": {"message_loss": {"prob": 0.1}}}, "faults"),
])
def test_what_the_sharded_simulator_cannot_run_is_refused(change, field):
    exp = build_experiment(config.validate({**small_config("fedavg"), **change}))
    with pytest.raises(ConfigError) as err:
        check(exp)
    assert err.value.field == field


def _gossamer(*args, env=None):
    return subprocess.run([sys.executable, "-m", "gossamer", *args], capture_output=True, text=True,
                          cwd=ROOT, env=dict(os.environ, **(env or {})), timeout=300)


def _config(tmp_path: Path) -> Path:
    cfg = small_config("fedavg", partition={"name": "dirichlet", "num_nodes": 200, "params": {"alpha": 0.5}},
                       local={"epochs": 2, "batch_size": 8, "lr": 0.1}, stop={"rounds": 5},
                       output={"progress": False, "checkpoint_every": 2})
    cfg["algorithm"] = {"name": "fedavg", "params": {"client_fraction": 0.4}}
    path = tmp_path / "sharded.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_metrics_are_bit_identical_with_1_2_4_ranks_and_after_a_killed_rank_resumes(tmp_path):
    cfg = _config(tmp_path)
    texts = []
    for ranks in (1, 2, 4):
        out = tmp_path / f"r{ranks}"
        done = _gossamer("run", str(cfg), "--out", str(out), "--ranks", str(ranks), "--quiet")
        assert done.returncode == 0, done.stderr[-2000:]
        texts.append((out / "metrics.csv").read_text())
    assert texts[0] == texts[1] == texts[2]
    models = [torch.load(tmp_path / f"r{k}" / "model.pt", weights_only=True) for k in (1, 2, 4)]
    for name, value in models[0].items():                 # the model itself, bit for bit
        assert torch.equal(value, models[1][name]) and torch.equal(value, models[2][name])
    rows = texts[0].splitlines()
    assert len(rows) == 7 and rows[-1].split(",")[7] == "80"      # 40% of 200 clients a round
    # rank 1 of 2 killed at round 3 (checkpoints every 2): one line, exit 3; resumed with 1 rank
    out = tmp_path / "killed"
    died = _gossamer("run", str(cfg), "--out", str(out), "--ranks", "2", "--quiet",
                     env={"GOSSAMER_TEST_KILL_AT_ROUND": "3", "GOSSAMER_TEST_KILL_RANK": "1"})
    assert died.returncode == 3
    last = died.stderr.strip().splitlines()[-1]
    assert last.startswith("gossamer: rank 1 of 2 stopped (signal SIGKILL)") and "--resume" in last
    assert "Traceback" not in died.stderr
    assert len((out / "metrics.csv").read_text().splitlines()) < 7
    back = _gossamer("run", "--resume", str(out), "--ranks", "1", "--quiet")
    assert back.returncode == 0, back.stderr[-2000:]
    assert (out / "metrics.csv").read_text() == texts[0]


def test_torchrun_without_a_shared_run_directory_is_refused(tmp_path):
    from gossamer.cli import main

    cfg = _config(tmp_path)
    os.environ["WORLD_SIZE"] = "2"
    try:
        assert main(["run", str(cfg), "--quiet"]) == 2
    finally:
        del os.environ["WORLD_SIZE"]


def test_the_launcher_refuses_what_it_cannot_shard_before_starting_processes(tmp_path, capsys):
    from gossamer.cli import main

    cfg = yaml.safe_load(_config(tmp_path).read_text())
    cfg["algorithm"] = {"name": "scaffold"}
    path = tmp_path / "scaffold.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(path), "--ranks", "2", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "algorithm.name" in err[0] and not (tmp_path / "x").exists()
