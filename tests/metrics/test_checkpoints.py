"""Checkpoints load weights-only, keep the previous one, and fall back to it when damaged."""

import csv
import logging
import os
import subprocess
from collections import OrderedDict

import numpy as np
import pytest
import torch

from gossamer.cli import main
from gossamer.metrics import runstore
from gossamer.metrics.runstore import (
    CheckpointError,
    load_checkpoint,
    previous_path,
    save_checkpoint,
)
from tests.conftest import gossamer_cmd, small_config, subprocess_env


class _Evil:
    """Unpickling this would create ``marker``: what a crafted run directory could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _rows(run_dir):
    with (run_dir / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def _one_line(text):
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


def test_numpy_values_round_trip_exactly_and_load_weights_only(tmp_path):
    state = {"f64": np.linspace(0, 1, 7), "i32": np.arange(6, dtype=np.int32).reshape(2, 3),
             "bool": np.array([True, False]), "u8": np.zeros((0, 3), dtype=np.uint8),
             "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
             "scalars": [np.float32(0.1), np.int64(-3), np.bool_(True)], "text": np.array(["a", "bc"]),
             "nested": ({"x": np.float64(2.5)}, OrderedDict(a=np.arange(3))),
             "tensor": torch.arange(4.0), "plain": {"n": 3, "s": "x", "none": None, "t": (1, 2.0)}}
    path = tmp_path / "c.pt"
    save_checkpoint(path, state)
    raw = torch.load(path, weights_only=True)            # no numpy globals needed
    assert isinstance(raw["f64"], dict)
    back = load_checkpoint(path)
    for key in ("f64", "i32", "bool", "u8", "fortran", "text"):
        assert type(back[key]) is np.ndarray and back[key].dtype == state[key].dtype
        np.testing.assert_array_equal(back[key], state[key])
        assert back[key].flags.writeable
    assert [type(v) for v in back["scalars"]] == [np.float32, np.int64, np.bool_]
    assert back["scalars"] == state["scalars"]
    assert type(back["nested"]) is tuple and type(back["nested"][0]["x"]) is np.float64
    assert type(back["nested"][1]) is OrderedDict
    np.testing.assert_array_equal(back["nested"][1]["a"], np.arange(3))
    assert torch.equal(back["tensor"], state["tensor"]) and back["plain"] == state["plain"]
    with pytest.raises(TypeError, match="Python objects"):
        save_checkpoint(tmp_path / "o.pt", {"o": np.array([object()])})


def test_a_pickle_that_runs_code_is_refused_without_running_it(tmp_path):
    marker, path = tmp_path / "pwned", tmp_path / "checkpoint.pt"
    torch.save({"params": torch.zeros(2), "x": _Evil(marker)}, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert not marker.exists()
    msg = _one_line(str(err.value))
    assert str(path) in msg and "run code" in msg and "posix.system" in msg


def test_save_keeps_the_previous_checkpoint_and_load_falls_back(tmp_path, caplog):
    path = tmp_path / "ckpt" / "checkpoint.pt"
    save_checkpoint(path, {"round": 2})
    assert not previous_path(path).exists()
    save_checkpoint(path, {"round": 4})
    assert previous_path(path) == tmp_path / "ckpt" / "checkpoint.prev.pt"
    assert load_checkpoint(previous_path(path))["round"] == 2 and load_checkpoint(path)["round"] == 4
    data = path.read_bytes()
    for damaged in (data[: len(data) // 2], b"", b"garbage" * 100):
        path.write_bytes(damaged)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="gossamer.metrics.runstore"):
            assert load_checkpoint(path) == {"round": 2}
        assert len(caplog.records) == 1
        msg = _one_line(caplog.records[0].getMessage())
        assert str(path) in msg and str(previous_path(path)) in msg
    # a missing current checkpoint falls back too
    path.unlink()
    assert load_checkpoint(path) == {"round": 2}


def test_a_damaged_checkpoint_never_replaces_the_good_previous_one(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"round": 2})
    save_checkpoint(path, {"round": 4})
    path.write_bytes(b"garbage")                         # damaged by someone else
    save_checkpoint(path, {"round": 6})
    assert load_checkpoint(previous_path(path)) == {"round": 2}
    assert load_checkpoint(path) == {"round": 6}


def test_a_crash_while_saving_leaves_a_loadable_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"round": 2})
    save_checkpoint(path, {"round": 4})

    def crash(*args, **kwargs):
        raise KeyboardInterrupt                          # killed after keeping the previous one
    monkeypatch.setattr(runstore, "atomic_write_bytes", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"round": 6})
    assert load_checkpoint(path) == {"round": 4} == load_checkpoint(previous_path(path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.prev.pt", "checkpoint.pt"]


def test_neither_checkpoint_loads_one_line_naming_both(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"garbage")
    previous_path(path).write_bytes(b"\x80\x02more garbage")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    msg = _one_line(str(err.value))
    assert str(path) in msg and str(previous_path(path)) in msg
    previous_path(path).unlink()
    with pytest.raises(CheckpointError, match="checkpoint.pt"):
        load_checkpoint(path)
    path.unlink()
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(path)
    torch.save([1, 2], path)
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_checkpoint(path)


def _killed_run(write_config, tmp_path):
    """A full 6-round run and one killed at round 5 (checkpoints at rounds 4 and 2)."""
    path = write_config(small_config("fedavg"))
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert main(["run", str(path), "--out", str(full), "--quiet"]) == 0
    proc = subprocess.run(gossamer_cmd("run", str(path), "--out", str(killed), "--quiet"),
                          env=subprocess_env(GOSSAMER_TEST_KILL_AT_ROUND="5"))
    assert proc.returncode == -9
    ckpt = killed / "checkpoints" / "checkpoint.pt"
    assert load_checkpoint(ckpt)["driver"]["round"] == 4
    assert load_checkpoint(previous_path(ckpt))["driver"]["round"] == 2
    return full, killed, ckpt


def test_resume_from_a_truncated_checkpoint_uses_the_previous_one(write_config, tmp_path):
    full, killed, ckpt = _killed_run(write_config, tmp_path)
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 3])
    proc = subprocess.run(gossamer_cmd("run", "--resume", str(killed), "--quiet"),
                          env=subprocess_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    msg = _one_line(proc.stderr)
    assert str(ckpt) in msg and "checkpoint.prev.pt" in msg
    assert (full / "metrics.csv").read_bytes() == (killed / "metrics.csv").read_bytes()


def test_resume_refuses_damaged_or_malicious_checkpoints_with_exit_2(write_config, tmp_path, capsys):
    _, killed, ckpt = _killed_run(write_config, tmp_path)
    rows = (killed / "metrics.csv").read_bytes()
    ckpt.write_bytes(b"garbage")
    previous_path(ckpt).write_bytes(b"more garbage")
    capsys.readouterr()
    assert main(["run", "--resume", str(killed), "--quiet"]) == 2
    msg = _one_line(capsys.readouterr().err)
    assert msg.startswith("gossamer: error: ") and str(ckpt) in msg and "checkpoint.prev.pt" in msg
    assert (killed / "metrics.csv").read_bytes() == rows            # nothing touched
    marker = tmp_path / "pwned"
    torch.save({"driver": _Evil(marker)}, ckpt)
    previous_path(ckpt).unlink()
    assert main(["run", "--resume", str(killed), "--quiet"]) == 2
    msg = _one_line(capsys.readouterr().err)
    assert str(ckpt) in msg and "refused" in msg
    assert not marker.exists()
    assert [int(r["round"]) for r in _rows(killed)] == list(range(6))


def test_atomic_writes_are_ordinary_files_unless_a_mode_is_given(tmp_path):
    from gossamer.metrics.runstore import atomic_write_bytes

    atomic_write_bytes(tmp_path / "report.html", b"<html></html>")
    atomic_write_bytes(tmp_path / "node.key", b"secret", 0o600)
    assert (tmp_path / "report.html").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "node.key").stat().st_mode & 0o777 == 0o600
