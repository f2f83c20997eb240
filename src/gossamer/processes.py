"""Stopping child processes: what the runtime's launcher and the sharded simulator's share."""

from __future__ import annotations

import subprocess
import time


def stop(procs: list[subprocess.Popen], grace_s: float = 3.0) -> None:
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
