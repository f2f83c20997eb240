"""Child processes of the launchers (gossamer/processes.py): a forkserver child behaves as
``python -m gossamer ARGS`` does."""

import json
import os
import signal
import subprocess

import pytest

from gossamer.errors import UserError
from gossamer.processes import START_METHOD_ENV, start, start_method, stop
from tests.conftest import small_config, subprocess_env


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_a_child_runs_gossamer_with_its_environment_threads_and_output(write_config, tmp_path, method,
                                                                       monkeypatch):
    monkeypatch.setenv(START_METHOD_ENV, method)
    path = write_config(small_config(stop={"rounds": 2}))
    out = tmp_path / "run"
    args = ["run", str(path), "--out", str(out)]
    threads = "1" if os.cpu_count() == 1 else "2"       # not the forkserver's own count
    child = start(args, subprocess_env(OMP_NUM_THREADS=threads), log=tmp_path / "run.log")
    assert child.wait(timeout=120) == 0
    env = json.loads((out / "environment.json").read_text())
    assert env["torch_threads"] == int(threads) and env["argv"][1:] == args
    assert f"run {out}: 2 rounds" in (tmp_path / "run.log").read_text()
    # a user error: exit code 2, its one line in the log (appended to)
    bad = write_config({"seed": 0, "data": {"dataset": "nope"}}, name="bad.yaml")
    child = start(["run", str(bad), "--quiet"], subprocess_env(), log=tmp_path / "run.log")
    assert child.wait(timeout=60) == 2
    log = (tmp_path / "run.log").read_text()
    assert f"run {out}: 2 rounds" in log and "gossamer: config error: " in log


def test_forked_and_spawned_runs_are_identical(write_config, tmp_path, monkeypatch):
    path = write_config(small_config(stop={"rounds": 3}))
    for method in ("forkserver", "spawn"):
        monkeypatch.setenv(START_METHOD_ENV, method)
        child = start(["run", str(path), "--out", str(tmp_path / method), "--quiet"], subprocess_env(),
                      quiet=True)
        assert child.wait(timeout=120) == 0
    assert (tmp_path / "forkserver" / "metrics.csv").read_bytes() == \
        (tmp_path / "spawn" / "metrics.csv").read_bytes()


def test_wait_times_out_and_a_killed_child_reports_the_signal(write_config, tmp_path, monkeypatch):
    monkeypatch.setenv(START_METHOD_ENV, "forkserver")
    path = write_config(small_config(stop={"rounds": 100_000}))
    child = start(["run", str(path), "--out", str(tmp_path / "long"), "--quiet"], subprocess_env(),
                  quiet=True, new_session=True)
    with pytest.raises(subprocess.TimeoutExpired):
        child.wait(timeout=0.2)
    assert child.poll() is None and os.getsid(child.pid) == child.pid     # a session of its own
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait(timeout=30) == -signal.SIGKILL and child.returncode == -signal.SIGKILL
    stop([child])                                           # nothing left to stop: no error


def test_an_unknown_start_method_is_one_line(monkeypatch):
    monkeypatch.setenv(START_METHOD_ENV, "thread")
    with pytest.raises(UserError, match=START_METHOD_ENV):
        start_method()


def test_a_script_of_the_users_gets_fresh_interpreters(tmp_path, monkeypatch):
    """multiprocessing would run a user's script again in each forkserver child; a command run
    without a main file (``python -c``, a notebook, ``python -m gossamer``) forks."""
    import sys

    monkeypatch.delenv(START_METHOD_ENV, raising=False)
    code = "from gossamer.processes import start_method; print(start_method())"
    script = tmp_path / "study.py"
    script.write_text(code + "\n")
    env = subprocess_env()
    env.pop(START_METHOD_ENV, None)
    ran = [subprocess.run([sys.executable, *how], env=env, capture_output=True, text=True, timeout=120)
           for how in ([str(script)], ["-c", code])]
    assert [r.stdout.strip() for r in ran] == ["spawn", "forkserver"], [r.stderr for r in ran]
