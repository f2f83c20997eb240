"""The run directory: resolved config, metrics, summary, checkpoints; every write atomic.

A file is written to a temporary name in the same directory, flushed and fsynced, then
renamed over the target, so a crash (or kill -9) leaves either the old or the new file.

Checkpoints hold plain tensors and values only and load with ``torch.load(weights_only=True)``:
a crafted run directory cannot run code. Numpy arrays and scalars are stored as raw bytes and
come back as the same numpy types. Saving a checkpoint keeps the last good one as
``X.prev.pt``; loading falls back to it (one-line warning) when ``X.pt`` is damaged.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import pickle
import platform
import re
import shutil
import sys
import tempfile
import threading
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


def atomic_write_bytes(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write via a temp file in the same directory, fsync, rename; ``mode`` sets permissions
    (default 0644, as an ordinary file: a temp file would otherwise keep mkstemp's 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o644 if mode is None else mode)
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
    """Appends metric rows to ``metrics.csv`` (one row per evaluation), columns fixed at start.

    Every append is flushed (a killed process loses nothing). With ``durable`` each append is
    also fsynced; without, :meth:`sync` does it, and a caller that checkpoints calls it before
    each checkpoint: rows past the last checkpoint are dropped on resume anyway, so only the
    rows a checkpoint covers must survive an operating-system crash (the simulator: an fsync
    per round cost ~5% of a small round)."""

    def __init__(self, path: Path, columns: list[str], durable: bool = True) -> None:
        self.path, self.columns, self.durable = path, columns, durable
        self.rows: list[dict[str, Any]] = []
        self._unsynced = False
        self.listeners: list[Any] = []      # called with each appended row (experiment trackers)

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
        self.append_many([row])

    def append_many(self, rows: list[dict[str, Any]]) -> None:
        """Append ``rows`` with one flush (and fsync, when durable)."""
        text_rows = [{c: format_value(row.get(c)) for c in self.columns} for row in rows]
        self.rows.extend(text_rows)
        new_file = not self.path.exists()
        with self.path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns, lineterminator="\n")
            if new_file:
                writer.writeheader()
            writer.writerows(text_rows)
            f.flush()
            if self.durable:
                os.fsync(f.fileno())
        self._unsynced = not self.durable
        for listener in self.listeners:
            for row in rows:
                listener(row)

    def sync(self) -> None:
        """Make every appended row durable (fsync), if some is not yet."""
        if self._unsynced and self.path.exists():
            with self.path.open("rb") as f:
                os.fsync(f.fileno())
        self._unsynced = False


def environment(device: torch.device | None = None) -> dict[str, Any]:
    """What produced a run: versions, platform, threads, and the device it computed on (a GPU's
    name and CUDA version)."""
    import numpy

    import gossamer

    where = {} if device is None else {"device": str(device)}
    if device is not None and device.type == "cuda":
        where.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    return {
        "gossamer": gossamer.__version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "argv": sys.argv,
        **where,
    }


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


class CheckpointError(ValueError):
    """A checkpoint (and its previous copy) cannot be loaded; the message is one line."""


_NUMPY = "__gossamer_numpy__"                   # marker key of an encoded numpy array or scalar
_save_lock = threading.Lock()
_written: dict[str, tuple[int, int, int]] = {}  # path -> (inode, size, mtime) this process wrote


def previous_path(path: Path) -> Path:
    """Where the previous checkpoint of ``path`` is kept: ``X.pt`` -> ``X.prev.pt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def checkpoint_exists(path: Path) -> bool:
    """Whether ``path`` or its previous copy exists (what a resume can load)."""
    return Path(path).exists() or previous_path(path).exists()


def _encode(value: Any) -> Any:
    """A copy torch's weights-only unpickler accepts: numpy arrays and scalars as their raw
    bytes in a uint8 tensor, with dtype and shape (``None`` for a scalar)."""
    if isinstance(value, (np.ndarray, np.generic)):
        arr = np.asarray(value)
        if arr.dtype.hasobject:
            raise TypeError(f"checkpoint: cannot store a numpy array of Python objects ({arr.dtype})")
        shape = None if isinstance(value, np.generic) else list(arr.shape)
        raw = torch.from_numpy(np.frombuffer(np.ascontiguousarray(arr).tobytes(), dtype=np.uint8).copy())
        return {_NUMPY: [arr.dtype.str, shape, raw]}
    if isinstance(value, torch.Tensor):          # stored on the host: a run resumes on any device
        return value.cpu()
    if isinstance(value, OrderedDict):
        return OrderedDict((k, _encode(v)) for k, v in value.items())
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if type(value) is tuple:
        return tuple(_encode(v) for v in value)
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if len(value) == 1 and _NUMPY in value:
            dtype, shape, data = value[_NUMPY]
            arr = np.frombuffer(data.numpy().tobytes(), dtype=np.dtype(dtype))
            return arr[0] if shape is None else arr.reshape(shape).copy()
        items = ((k, _decode(v)) for k, v in value.items())
        return OrderedDict(items) if isinstance(value, OrderedDict) else dict(items)
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if type(value) is tuple:
        return tuple(_decode(v) for v in value)
    return value


def _fingerprint(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


def save_checkpoint(path: Path, state: dict[str, Any], *, keep_previous: bool = True) -> None:
    """Save a checkpoint (tensors, numpy arrays and plain values) atomically.

    With ``keep_previous``, the current file (if it loads) is first kept as ``X.prev.pt``: a
    hard link renamed over the old previous copy, so ``X.pt`` never goes missing and a crash at
    any point leaves a loadable checkpoint.
    """
    path = Path(path)
    buf = io.BytesIO()
    torch.save(_encode(state), buf)
    with _save_lock:
        if keep_previous and path.exists() and _loads(path):
            prev = previous_path(path)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{prev.name}.")
            os.close(fd)
            os.unlink(tmp)
            try:
                try:
                    os.link(path, tmp)
                except OSError:                      # no hard links here: copy, then fsync
                    shutil.copyfile(path, tmp)
                    with open(tmp, "rb+") as f:
                        os.fsync(f.fileno())
                os.replace(tmp, prev)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
        atomic_write_bytes(path, buf.getvalue())
        _written[str(path.resolve())] = _fingerprint(path)


def _loads(path: Path) -> bool:
    """Whether ``path`` is a good checkpoint: this process wrote it, or it loads."""
    if _written.get(str(path.resolve())) == _fingerprint(path):
        return True
    try:
        _load_one(path)
    except CheckpointError:
        return False
    return True


def _reason(exc: BaseException) -> str:
    """One line saying why torch could not load a file."""
    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError) and "Weights only load failed" in text:
        if m := re.search(r"GLOBAL ([\w.]+)", text):
            return f"it would run code to load ({m.group(1)}); refused, checkpoints hold plain tensors and values only"
        return "not a checkpoint of plain tensors and values (unreadable pickle)"
    if isinstance(exc, EOFError):
        return "empty or truncated"
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    first = first.split(". ")[0]
    if isinstance(exc, (RuntimeError, zipfile.BadZipFile)) and "zip" in first.lower():
        return f"truncated or corrupted ({first})"
    return f"unreadable ({type(exc).__name__}: {first[:200]})"


def _load_one(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise CheckpointError(f"checkpoint {path}: not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:                          # noqa: BLE001 - any failure is a damaged file
        raise CheckpointError(f"checkpoint {path}: {_reason(exc)}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path}: not a checkpoint (holds a {type(state).__name__}, not a dict)")
    try:
        return _decode(state)
    except Exception as exc:                          # noqa: BLE001 - a malformed numpy record
        raise CheckpointError(f"checkpoint {path}: malformed numpy value ({exc})") from None


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load ``path`` weights-only; if it is missing or damaged, warn in one line and load the
    previous checkpoint (``X.prev.pt``) instead. Neither loads: ``CheckpointError``, one line."""
    path = Path(path)
    try:
        return _load_one(path)
    except CheckpointError as exc:
        prev = previous_path(path)
        if not prev.exists():
            raise
        first = exc
    try:
        state = _load_one(prev)
    except CheckpointError as exc:
        raise CheckpointError(f"{first}; previous {exc}") from None
    log.warning("%s; using the previous checkpoint %s", first, prev)
    return state
