"""The run directory: resolved config, metrics, summary, checkpoints; every write atomic.

A file is written to a temporary name in the same directory, flushed and fsynced, then
renamed over the target, so a crash (or kill -9) leaves either the old or the new file.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch


def atomic_write_bytes(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write via a temp file in the same directory, fsync, rename; ``mode`` sets permissions."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def format_value(value: Any) -> str:
    """Deterministic text for a metric value (floats with 8 significant digits)."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.8g}"
    return str(value)


class MetricsWriter:
    """Appends metric rows to ``metrics.csv`` (one row per evaluation), columns fixed at start."""

    def __init__(self, path: Path, columns: list[str]) -> None:
        self.path, self.columns = path, columns
        self.rows: list[dict[str, Any]] = []

    def load_existing(self, up_to_round: int) -> None:
        """On resume: keep the rows up to the checkpointed round and rewrite the file atomically."""
        self.rows = []
        if self.path.exists():
            with self.path.open(newline="") as f:
                for row in csv.DictReader(f):
                    if int(row["round"]) <= up_to_round:
                        self.rows.append(row)
        self._rewrite()

    def _rewrite(self) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.columns, lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({c: row.get(c, "") for c in self.columns})
        atomic_write_text(self.path, buf.getvalue())

    def append(self, row: dict[str, Any]) -> None:
        text_row = {c: format_value(row.get(c)) for c in self.columns}
        self.rows.append(text_row)
        new_file = not self.path.exists()
        with self.path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns, lineterminator="\n")
            if new_file:
                writer.writeheader()
            writer.writerow(text_row)
            f.flush()
            os.fsync(f.fileno())


def environment() -> dict[str, Any]:
    """What produced a run: versions, platform, threads."""
    import numpy

    import gossamer

    return {
        "gossamer": gossamer.__version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "argv": sys.argv,
    }


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Save a checkpoint (tensors, numpy arrays and plain values) atomically."""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: Path) -> dict[str, Any]:
    return torch.load(path, weights_only=False)
