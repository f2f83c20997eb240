"""Build-time checks of the ``faults`` section and the churn trace reader.

The checks that need the number of nodes, the graph or the stop rule (the schema in
``config.py`` cannot know them); every error is one line naming the field.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from gossamer.config import ConfigError, FaultsConfig


def num_groups(p) -> int:
    return p.groups if p.groups is not None else len(p.fractions if p.nodes is None else p.nodes)


# --- build-time checks ---------------------------------------------------------------------
def _check_ids(field: str, ids: list[int], n: int) -> None:
    for v in ids:
        if not 0 <= v < n:
            raise ConfigError(field, f"node {v} is outside 0..{n - 1}")


def _check_time(field: str, at_s: float, stop: float | None) -> None:
    if stop is not None and at_s > stop:
        raise ConfigError(field, f"{at_s} is after stop.max_sim_time_s ({stop})")


def check_events(f: FaultsConfig, n: int, degrees: np.ndarray | None, stop: float | None) -> None:
    for i, event in enumerate(f.events):
        field = f"faults.events.{i}"
        _check_time(f"{field}.at_s", event.at_s, stop)
        if event.nodes is not None:
            _check_ids(f"{field}.nodes", event.nodes, n)
        if event.count is not None and event.count > n:
            raise ConfigError(f"{field}.count", f"{event.count} is more than the {n} nodes")
        if event.select == "highest_degree" and degrees is None:
            raise ConfigError(f"{field}.select", "highest_degree needs a topology (decentralized algorithms)")


def check_partitions(f: FaultsConfig, n: int, stop: float | None) -> None:
    for i, p in enumerate(f.partitions):
        field = f"faults.partitions.{i}"
        _check_time(f"{field}.at_s", p.at_s, stop)
        if p.groups is not None and p.groups > n:
            raise ConfigError(f"{field}.groups", f"{p.groups} groups for {n} nodes")
        if p.nodes is not None:
            flat = [v for members in p.nodes for v in members]
            _check_ids(f"{field}.nodes", flat, n)
            counts = np.bincount(np.asarray(flat, dtype=np.int64), minlength=n)
            if (counts > 1).any():
                raise ConfigError(f"{field}.nodes", f"node {int(np.argmax(counts > 1))} is in more than one group")
            if (counts == 0).any():
                raise ConfigError(f"{field}.nodes", f"node {int(np.argmax(counts == 0))} is in no group "
                                  "(the lists must cover every node)")


# --- churn traces --------------------------------------------------------------------------
_HEADER = ["node", "leave_s", "rejoin_s"]


def read_trace(path: Path, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Parse a churn trace into switch times: node i's are ``times[ptr[i]:ptr[i + 1]]``, sorted.

    Each row ``node,leave_s,rejoin_s`` is one offline interval ``[leave_s, rejoin_s)``;
    an empty ``rejoin_s`` means the node never returns. Errors name the file and line.
    """
    field = "faults.churn.trace"
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ConfigError(field, f"cannot read {path}: {exc.strerror}") from None

    def bad(line: int, message: str) -> ConfigError:
        return ConfigError(field, f"{path}:{line}: {message}")

    rows = list(csv.reader(lines))
    if not rows or [c.strip() for c in rows[0]] != _HEADER:
        raise bad(1, f"expected the header {','.join(_HEADER)}")
    intervals: list[list[tuple[float, float, int]]] = [[] for _ in range(n)]
    for line, row in enumerate(rows[1:], start=2):
        cells = [c.strip() for c in row]
        if not any(cells):
            continue
        if len(cells) != 3:
            raise bad(line, f"expected 3 columns node,leave_s,rejoin_s, got {len(cells)}")
        try:
            node = int(cells[0])
        except ValueError:
            raise bad(line, f"node {cells[0]!r} is not an integer") from None
        if not 0 <= node < n:
            raise bad(line, f"node {node} is outside 0..{n - 1}")
        leave = _time(cells[1])
        rejoin = math.inf if cells[2] == "" else _time(cells[2])
        if leave is None or rejoin is None:
            raise bad(line, f"times must be finite numbers, got {cells[1]!r}, {cells[2]!r}")
        if leave < 0 or rejoin < 0:
            raise bad(line, "times must be >= 0")
        if rejoin < leave:
            raise bad(line, f"rejoin_s ({rejoin}) is before leave_s ({leave})")
        intervals[node].append((leave, rejoin, line))
    times: list[float] = []
    ptr = [0]
    for node, spans in enumerate(intervals):
        spans.sort()
        for prev, cur in zip(spans, spans[1:], strict=False):
            if cur[0] < prev[1]:
                raise bad(max(prev[2], cur[2]), f"node {node} is offline twice at once "
                          f"(overlaps line {min(prev[2], cur[2])})")
        for leave, rejoin, _ in spans:
            times += [leave] if rejoin == math.inf else [leave, rejoin]
        ptr.append(len(times))
    return np.asarray(times, dtype=np.float64), np.asarray(ptr, dtype=np.int64)


def _time(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None
