"""Child processes of launch, run --ranks, sweep and compare: starting and stopping them.

A launched run starts one ``gossamer`` process per node (or rank) on this machine. Each would
import PyTorch on its own (2.3 s of CPU on the CI machine, and most of a short run's start-up),
so by default they are forked from one server process that imported PyTorch and the simulator
once (multiprocessing's ``forkserver`` with those modules preloaded; it never runs a tensor
operation, so its children start with no thread pool to inherit). A child then differs from
``python -m gossamer ARGS`` only in its command line (the forkserver's) and in sharing the
preloaded pages with its siblings. ``GOSSAMER_START_METHOD=spawn`` starts each child as a fresh
interpreter instead (the default outside Linux, and where the parent is a script of the
user's, which multiprocessing would import again in each child).
"""

from __future__ import annotations

import multiprocessing
import os
import runpy
import subprocess
import sys
import time
from pathlib import Path
from typing import Protocol

from gossamer.errors import UserError

START_METHOD_ENV = "GOSSAMER_START_METHOD"
# what the forkserver imports once: PyTorch, numpy and the simulator's modules (not gRPC, which
# each child imports after the fork)
PRELOAD = ["torch", "numpy", "gossamer.cli", "gossamer.experiment", "gossamer.sim.runner"]


class Process(Protocol):
    """The part of :class:`subprocess.Popen` the launchers use."""

    pid: int

    @property
    def returncode(self) -> int | None: ...

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def terminate(self) -> None: ...

    def kill(self) -> None: ...


class Forked:
    """A forkserver child with :class:`subprocess.Popen`'s methods (negative return codes for
    signals, ``TimeoutExpired`` from ``wait``)."""

    def __init__(self, process: multiprocessing.process.BaseProcess, args: list[str]) -> None:
        self._process, self.args = process, args
        self.pid = int(process.pid)

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def poll(self) -> int | None:
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        code = self._process.exitcode
        if code is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
        return code

    def terminate(self) -> None:
        self._process.terminate()

    def kill(self) -> None:
        self._process.kill()


class _Fd:
    """A file descriptor handed to a forkserver child (sent over the forkserver's socket while
    the process object is pickled; the child receives its own copy)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self):
        from multiprocessing import reduction

        return _received, (reduction.DupFd(self.fd),)


def _received(dup) -> int:
    return dup.detach()


def _child(args: list[str], env: dict[str, str], cwd: str, out: int, err: int,
           new_session: bool) -> None:
    """A forkserver child's body: become ``python -m gossamer ARGS`` with ``env``."""
    if new_session:
        os.setsid()
    os.dup2(out, 1)
    os.dup2(err, 2)
    for fd in {out, err} - {1, 2}:
        os.close(fd)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    threads = env.get("OMP_NUM_THREADS")
    if threads and threads.isdigit() and int(threads) > 0:
        # the forkserver's thread count came from its own environment
        import torch

        torch.set_num_threads(int(threads))
    sys.argv = ["gossamer", *args]
    runpy.run_module("gossamer", run_name="__main__", alter_sys=True)     # python -m gossamer ARGS


def _main_is_safe() -> bool:
    """Whether a forkserver child may start here: multiprocessing re-imports the parent's main
    module in each child, which is harmless for ``python -m gossamer`` (skipped), the
    ``gossamer`` console script (its body is guarded) and a parent with no main file (a
    notebook, ``python -c``, a pytest-xdist worker); a user's script might start it all over."""
    from multiprocessing import spawn

    data = spawn.get_preparation_data("gossamer")
    name, path = data.get("init_main_from_name"), data.get("init_main_from_path")
    if name is not None:
        return name == "__main__" or name.endswith(".__main__")
    return path is None or os.path.basename(path) == "gossamer"


def start_method() -> str:
    """``forkserver`` or ``spawn``: ``GOSSAMER_START_METHOD``; by default the forkserver on
    Linux when the parent's main module is safe to re-import (:func:`_main_is_safe`)."""
    method = os.environ.get(START_METHOD_ENV, "")
    if method == "":
        # Linux only: macOS system frameworks are not fork-safe once loaded (CPython starts
        # with spawn there for that reason)
        return "forkserver" if sys.platform.startswith("linux") and _main_is_safe() else "spawn"
    if method not in ("forkserver", "spawn"):
        raise UserError(f"{START_METHOD_ENV}={method!r}: use forkserver or spawn")
    return method


def start(args: list[str], env: dict[str, str], *, log: Path | None = None, quiet: bool = False,
          new_session: bool = False) -> Process:
    """Start ``gossamer ARGS`` with environment ``env``: its output to ``log`` (appended), to
    nowhere (``quiet``), or to this process's own stdout and stderr."""
    if start_method() == "spawn":
        sink = log.open("ab") if log is not None else subprocess.DEVNULL if quiet else None
        try:
            return subprocess.Popen([sys.executable, "-m", "gossamer", *args], env=env, stdout=sink,
                                    stderr=subprocess.STDOUT if log is not None else None,
                                    start_new_session=new_session)
        finally:
            if log is not None:
                sink.close()
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    if log is not None:
        out = err = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        owned = [out]
    elif quiet:
        out = os.open(os.devnull, os.O_WRONLY)
        err, owned = 2, [out]
    else:
        sys.stdout.flush()
        sys.stderr.flush()
        out, err, owned = 1, 2, []
    try:
        process = context.Process(target=_child, name=f"gossamer {' '.join(args[:1])}",
                                  args=(args, dict(env), os.getcwd(), _Fd(out), _Fd(err), new_session))
        process.start()
    finally:
        for fd in owned:
            os.close(fd)
    return Forked(process, args)


def stop(procs: list[Process], grace_s: float = 3.0) -> None:
    """Terminate every process still running, then kill what has not exited after ``grace_s``."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    end = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
