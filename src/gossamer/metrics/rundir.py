"""Which command wrote a run directory, so that every ``--resume`` refuses the wrong one.

A simulator run and a real deployment keep different checkpoints and metrics; resuming one
with the other's command would rerun the simulator over the runtime's ``metrics.csv`` or
cut it to its header. Each command records its mode in ``run.json`` when it creates the
directory; directories from before that file are recognised by what they hold.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from gossamer.metrics.runstore import write_json

FILE = "run.json"
COMMANDS = {"simulator": "gossamer run", "server": "gossamer server", "launch": "gossamer launch"}


def record(run_dir: Path, mode: str) -> None:
    """Note that ``mode`` wrote ``run_dir`` (kept if a mode is already recorded: the launcher
    records ``launch`` before its server process starts)."""
    if mode not in COMMANDS:
        raise ValueError(f"unknown run mode {mode!r}")
    if not (Path(run_dir) / FILE).exists():
        write_json(Path(run_dir) / FILE, {"mode": mode})


def mode_of(run_dir: Path) -> str | None:
    """The recorded mode, or the one its files show, or None for an empty directory."""
    run_dir = Path(run_dir)
    try:
        mode = json.loads((run_dir / FILE).read_text()).get("mode")
        if mode in COMMANDS:
            return mode
    except (OSError, ValueError, AttributeError):
        pass
    if (run_dir / "peers").is_dir() or (run_dir / "launch.yaml").exists():
        return "launch"
    if (run_dir / "checkpoints" / "server.pt").exists() or (run_dir / "server.json").exists():
        return "server"
    if (run_dir / "checkpoints").is_dir():
        return "simulator"
    return None


def check_resume(run_dir: Path, command: str, accepted: tuple[str, ...]) -> None:
    """Raise ValueError (one line) if ``run_dir`` was written by a mode ``command`` cannot resume."""
    mode = mode_of(run_dir)
    if mode is None or mode in accepted:
        return
    raise ValueError(f"--resume: {run_dir} was written by `{COMMANDS[mode]}`, not `{command}`; "
                     f"resume it with `{COMMANDS[mode]} --resume {run_dir}`")


def new_run_dir(output_dir: str | Path, name: str) -> Path:
    """A fresh ``OUTPUT_DIR/NAME-YYYYmmdd-HHMMSS`` (``-1``, ``-2``, ... when taken)."""
    base = Path(output_dir) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, k = base, 1
    while path.exists():
        path, k = Path(f"{base}-{k}"), k + 1
    return path
