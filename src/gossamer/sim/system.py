"""Device and network profiles, node availability, and the simulated cost of work.

Every local step and every message costs simulated seconds: compute is samples times the
node's seconds-per-sample; a message costs latency plus bytes over bandwidth. Per-node
values come from distributions or CSV traces; availability is ``always``, ``markov``,
``diurnal`` or a ``trace`` of online intervals (docs/heterogeneity.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gossamer import rng
from gossamer.config import ConfigError, Distribution, SystemConfig

# Last keys of the diurnal draws under rng.STREAM_AVAILABILITY. Markov draws are keyed
# (node, counter) with small counters, so these never coincide with them.
_DIURNAL_PHASE = (1 << 63) + 1
_DIURNAL_SLOT = (1 << 63) + 2


# --- CSV traces -------------------------------------------------------------------------------
def _bad(field: str, path: str, line: int, message: str) -> ConfigError:
    return ConfigError(field, f"{path} line {line}: {message}")


def _number(text: str) -> float | None:
    """``text`` as a finite float, else None."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _node_rows(path: str, field: str, header: tuple[str, ...], n: int
               ) -> tuple[list[tuple[int, int, list[str]]], int]:
    """Data rows ``(line, node, other cells)`` of a per-node CSV, and the file's last line number.

    Blank lines, ``#`` comments and a first line equal to ``header`` are skipped; every row
    must have ``len(header)`` cells and a node id in 0..n-1.
    """
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise ConfigError(field, f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(field, f"{path} is not a text file") from None
    rows: list[tuple[int, int, list[str]]] = []
    seen_data = False
    for line, text in enumerate(lines, start=1):
        text = text.strip()
        if not text or text.startswith("#"):
            continue
        cells = [c.strip() for c in text.split(",")]
        if not seen_data and [c.lower() for c in cells] == list(header):
            seen_data = True
            continue
        seen_data = True
        if len(cells) != len(header):
            raise _bad(field, path, line, f"expected {len(header)} columns {','.join(header)}, "
                                          f"got {len(cells)}")
        try:
            node = int(cells[0])
        except ValueError:
            raise _bad(field, path, line, f"node {cells[0]!r} is not an integer") from None
        if not 0 <= node < n:
            raise _bad(field, path, line, f"node {node} is outside 0..{n - 1} ({n} nodes)")
        rows.append((line, node, cells[1:]))
    return rows, max(len(lines), 1)


def read_node_values(path: str, n: int, field: str, positive: bool = False) -> np.ndarray:
    """One value per node from a ``node,value`` CSV; every node exactly once, values >= 0
    (> 0 when ``positive``). Errors name ``field``, the file and the line."""
    values = np.zeros(n)
    first_line = np.zeros(n, dtype=np.int64)
    rows, last = _node_rows(path, field, ("node", "value"), n)
    for line, node, (cell,) in rows:
        value = _number(cell)
        if value is None:
            raise _bad(field, path, line, f"value {cell!r} is not a finite number")
        if value < 0 or (positive and value == 0):
            raise _bad(field, path, line, f"value {cell} must be {'> 0' if positive else '>= 0'}")
        if first_line[node]:
            raise _bad(field, path, line, f"node {node} appears twice (also on line {first_line[node]})")
        first_line[node], values[node] = line, value
    missing = np.flatnonzero(first_line == 0)
    if missing.size:
        shown = ", ".join(str(i) for i in missing[:5])
        if missing.size > 5:
            shown += f" and {missing.size - 5} more"
        noun = "node" if missing.size == 1 else "nodes"
        raise _bad(field, path, last, f"file ends without rows for {noun} {shown} "
                                      f"(every node 0..{n - 1} needs one)")
    return values


def read_intervals(path: str, n: int, field: str = "system.availability.path"
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Online intervals from a ``node,start_s,end_s`` CSV (empty ``end_s``: online for good).

    Returns ``(starts, ends, ptr)``: node i's intervals are ``[ptr[i], ptr[i + 1])``, sorted,
    with touching intervals merged. Overlapping intervals of one node are an error.
    """
    rows, _ = _node_rows(path, field, ("node", "start_s", "end_s"), n)
    spans: list[list[tuple[float, float, int]]] = [[] for _ in range(n)]
    for line, node, (a, b) in rows:
        start = _number(a)
        end = math.inf if b == "" or b.lower() == "inf" else _number(b)
        if start is None or end is None:
            raise _bad(field, path, line, f"start_s and end_s must be numbers, got {a!r}, {b!r}")
        if start < 0:
            raise _bad(field, path, line, f"start_s ({a}) must be >= 0")
        if not end > start:
            raise _bad(field, path, line, f"end_s ({b}) must be after start_s ({a})")
        spans[node].append((start, end, line))
    starts: list[float] = []
    ends: list[float] = []
    ptr = [0]
    for node, node_spans in enumerate(spans):
        node_spans.sort()
        for prev, cur in zip(node_spans, node_spans[1:], strict=False):
            if cur[0] < prev[1]:
                first, second = sorted((prev, cur), key=lambda span: span[2])   # by line
                raise _bad(field, path, second[2],
                           f"node {node}: interval {_span(second)} overlaps {_span(first)} "
                           f"on line {first[2]}")
        for start, end, _ in node_spans:
            if len(starts) > ptr[-1] and ends[-1] == start:      # touching: one interval
                ends[-1] = end
            else:
                starts.append(start)
                ends.append(end)
        ptr.append(len(starts))
    return np.asarray(starts, dtype=np.float64), np.asarray(ends, dtype=np.float64), np.asarray(ptr)


def _span(span: tuple[float, float, int]) -> str:
    return f"[{span[0]:.10g}, {span[1]:.10g})"


# --- device and link profiles -----------------------------------------------------------------
def draw(spec: Distribution, n: int, seed: int, key: int, field: str,
         positive: bool = False) -> np.ndarray:
    """Draw one value per node from a distribution spec (deterministic in seed and key).

    ``dist: trace`` reads the values from its CSV file; ``positive`` makes 0 an error there.
    """
    if spec.dist == "trace":
        return read_node_values(spec.path, n, field, positive)  # type: ignore[attr-defined]
    g = rng.generator(seed, rng.STREAM_SYSTEM, key)
    if spec.dist == "constant":
        return np.full(n, float(spec.value))
    if spec.dist == "uniform":
        return g.uniform(spec.low, spec.high, n)
    if spec.dist == "lognormal":
        return spec.median * np.exp(spec.sigma * g.standard_normal(n))
    if spec.dist == "exponential":
        return g.exponential(spec.mean, n)
    values = np.asarray(spec.values, dtype=np.float64)
    if spec.dist == "tiers":
        return values[g.choice(len(values), size=n, p=spec.probs)]
    if len(values) != n:
        raise ConfigError(field, f"per_node needs {n} values (one per node), got {len(values)}")
    return values


# Field order fixes each field's random key (its index): new fields go at the end.
_PROFILE_FIELDS = ("sample_time_s", "latency_s", "bandwidth_up_Bps", "bandwidth_down_Bps",
                   "latency_up_s", "latency_down_s")


@dataclass(frozen=True)
class SystemProfile:
    """Per-node device and link parameters, arrays of length N (a registered population's are
    :class:`~gossamer.population.profiles.DrawnColumn` s, indexed the same way, drawn on demand).

    ``upload_s`` / ``download_s`` use ``latency_up_s`` / ``latency_down_s``, which default to
    ``latency_s`` (the same array); drivers that model one latency per peer-to-peer
    message read ``latency_s``.
    """

    sample_time_s: np.ndarray
    latency_s: np.ndarray
    bandwidth_up_Bps: np.ndarray
    bandwidth_down_Bps: np.ndarray
    server_bandwidth_Bps: float | None = None
    latency_up_s: np.ndarray | None = None
    latency_down_s: np.ndarray | None = None

    def __post_init__(self) -> None:
        for name in ("latency_up_s", "latency_down_s"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, self.latency_s)

    @classmethod
    def from_config(cls, cfg: SystemConfig, n: int, seed: int) -> SystemProfile:
        parts: dict[str, np.ndarray] = {}
        for key, field in enumerate(_PROFILE_FIELDS):
            spec = getattr(cfg, field)
            if spec is None:                          # latency_up_s / latency_down_s unset
                continue
            positive = field.startswith("bandwidth")
            values = draw(spec, n, seed, key, f"system.{field}", positive)
            if positive and (values <= 0).any():
                raise ConfigError(f"system.{field}", "bandwidth must be > 0 for every node")
            parts[field] = values
        return cls(**parts, server_bandwidth_Bps=cfg.server_bandwidth_Bps)

    def compute_s(self, nodes: np.ndarray, samples: np.ndarray) -> np.ndarray:
        return self.sample_time_s[nodes] * samples

    def upload_s(self, nodes: np.ndarray, nbytes: int | np.ndarray) -> np.ndarray:
        return self.latency_up_s[nodes] + nbytes / self.bandwidth_up_Bps[nodes]

    def download_s(self, nodes: np.ndarray, nbytes: int | np.ndarray) -> np.ndarray:
        return self.latency_down_s[nodes] + nbytes / self.bandwidth_down_Bps[nodes]

    def server_fanout_s(self, total_bytes: int) -> float:
        """Time the server's own link needs to move ``total_bytes`` (0 when unlimited)."""
        return 0.0 if self.server_bandwidth_Bps is None else total_bytes / self.server_bandwidth_Bps


# --- availability -----------------------------------------------------------------------------
class Availability:
    """Which nodes are online at a simulated time; this class runs ``always`` and ``markov``.

    Interface shared by every model: ``model``; ``at(t)``, the online mask ``[N]`` at
    non-decreasing ``t``; ``next_switch`` ``[N]``, the next time each node's state may
    change (``inf``: never), always after the last queried time; ``next_change()``, its
    minimum; ``state_dict``/``load_state_dict`` with numpy arrays and floats only.

    ``markov``: each node alternates on and off periods with exponential durations (means
    ``mean_on_s``, ``mean_off_s``); the k-th duration of node i is a pure function of
    (seed, i, k), so the process is reproducible and resumable from its small state
    (current phase, switch time, counter per node).
    """

    def __init__(self, model: str, n: int, seed: int, mean_on_s: float = 1.0,
                 mean_off_s: float = 1.0, initial_on_fraction: float | None = None) -> None:
        self.model, self.n, self.seed = model, n, seed
        self.time = 0.0
        if model == "always":        # nothing per node: a registered population may be huge
            return
        nodes = np.arange(n)
        self.counter = np.ones(n, dtype=np.int64)
        self.mean = np.array([mean_off_s, mean_on_s])
        frac = mean_on_s / (mean_on_s + mean_off_s) if initial_on_fraction is None else initial_on_fraction
        self.on = rng.uniform(seed, rng.STREAM_AVAILABILITY, nodes, 0) < frac
        self.next_switch = self._duration(nodes)

    @classmethod
    def from_config(cls, cfg: SystemConfig, n: int, seed: int) -> Availability:
        a = cfg.availability
        if a.model == "diurnal":
            return DiurnalAvailability(n, seed, a.period_s, a.slots, a.low, a.high, a.peak_s,
                                       a.phase_spread_s)
        if a.model == "trace":
            starts, ends, ptr = read_intervals(a.path, n)  # type: ignore[arg-type]
            return TraceAvailability(n, starts, ends, ptr, unlisted_online=a.unlisted == "online")
        return cls(a.model, n, seed, a.mean_on_s, a.mean_off_s, a.initial_on_fraction)

    def _duration(self, nodes: np.ndarray) -> np.ndarray:
        u = rng.uniform(self.seed, rng.STREAM_AVAILABILITY, nodes, self.counter[nodes])
        self.counter[nodes] += 1
        return -np.log1p(-u) * self.mean[self.on[nodes].astype(np.int64)]

    def at(self, t: float) -> np.ndarray:
        """Boolean mask ``[N]`` of online nodes at time ``t`` (monotone in ``t``)."""
        if self.model == "always":
            return np.ones(self.n, dtype=bool)
        if t < self.time:
            raise ValueError("availability must be queried at non-decreasing times")
        self.time = t
        if self.n and self.next_switch.min() <= t:
            self._advance(t)
        return self.on.copy()

    def next_change(self) -> float:
        """The earliest time any node's state may change (``inf``: never)."""
        if self.model == "always":
            return math.inf
        return float(self.next_switch.min()) if self.n else math.inf

    @property
    def next_switch(self) -> np.ndarray:
        """``[N]``: the next time each node's state may change (``always``: never)."""
        if self.model == "always":
            return np.full(self.n, np.inf)
        return self._next_switch

    @next_switch.setter
    def next_switch(self, value: np.ndarray) -> None:
        self._next_switch = value

    def _advance(self, t: float) -> None:
        """Bring ``on`` and ``next_switch`` to time ``t`` (some ``next_switch`` is <= t)."""
        while True:
            due = np.flatnonzero(self.next_switch <= t)
            if due.size == 0:
                return
            self.on[due] = ~self.on[due]
            self.next_switch[due] += self._duration(due)

    def state_dict(self) -> dict:
        if self.model == "always":
            return {"time": self.time}
        return {"on": self.on.copy(), "counter": self.counter.copy(),
                "next_switch": self.next_switch.copy(), "time": self.time}

    def load_state_dict(self, state: dict) -> None:
        self.time = float(state["time"])
        if self.model == "always":
            return
        self.on, self.counter = np.asarray(state["on"]), np.asarray(state["counter"])
        self.next_switch = np.asarray(state["next_switch"])


class DiurnalAvailability(Availability):
    """Day/night cycles: online in each local time slot with a probability that follows the day.

    The day (``period_s``) has ``slots`` equal slots. Node i's clock is shifted by an offset
    drawn uniformly in ``[0, phase_spread_s)`` (``None``: a whole period), so its slot s
    spans global times ``[s * slot_s - offset_i, (s + 1) * slot_s - offset_i)``. In slot k
    of local day d it is online iff ``uniform(seed, i, d, k) < p_k``, where ``p_k`` is
    ``low + (high - low) * (1 + cos(2 pi (tau_k - peak_s) / period_s)) / 2`` at the slot's
    midpoint ``tau_k``. Every answer is a pure function of the time: the state is ``time``.
    """

    def __init__(self, n: int, seed: int, period_s: float = 86400.0, slots: int = 24,
                 low: float = 0.2, high: float = 0.9, peak_s: float = 72000.0,
                 phase_spread_s: float | None = None) -> None:
        self.model, self.n, self.seed, self.time = "diurnal", n, seed, 0.0
        self.slots, self.slot_s = int(slots), float(period_s) / int(slots)
        spread = float(period_s) if phase_spread_s is None else float(phase_spread_s)
        self.offset = spread * rng.uniform(seed, rng.STREAM_AVAILABILITY, np.arange(n), _DIURNAL_PHASE)
        mid = (np.arange(self.slots) + 0.5) * self.slot_s
        self.prob = low + (high - low) * (1 + np.cos(2 * np.pi * (mid - peak_s) / period_s)) / 2
        self.changes = not ((self.prob <= 0).all() or (self.prob >= 1).all())
        self.on = np.zeros(n, dtype=bool)
        self.next_switch = np.zeros(n)
        self._refresh(np.arange(n), 0.0)

    def _refresh(self, nodes: np.ndarray, t: float) -> None:
        """Recompute the state of ``nodes`` at ``t``: slot s with start <= t < next start."""
        off, w = self.offset[nodes], self.slot_s
        s = np.floor((t + off) / w).astype(np.int64)
        s -= (s * w - off > t)                      # guard against rounding at a boundary
        s += ((s + 1) * w - off <= t)
        day, k = s // self.slots, s % self.slots
        u = rng.uniform(self.seed, rng.STREAM_AVAILABILITY, nodes, day, k, _DIURNAL_SLOT)
        self.on[nodes] = u < self.prob[k]
        self.next_switch[nodes] = (s + 1) * w - off if self.changes else np.inf

    def _advance(self, t: float) -> None:
        self._refresh(np.flatnonzero(self.next_switch <= t), t)

    def state_dict(self) -> dict:
        return {"time": self.time}

    def load_state_dict(self, state: dict) -> None:
        self.time = float(state["time"])
        self._refresh(np.arange(self.n), self.time)


class TraceAvailability(Availability):
    """Online exactly within recorded intervals ``[start, end)`` (a CSV trace).

    Node i's intervals are ``starts/ends[ptr[i]:ptr[i + 1]]``, sorted and disjoint; the state
    is ``pos`` (each node's first interval not yet over) and ``time``. Nodes without
    intervals are offline, or online throughout with ``unlisted_online``.
    """

    def __init__(self, n: int, starts: np.ndarray, ends: np.ndarray, ptr: np.ndarray,
                 unlisted_online: bool = False) -> None:
        self.model, self.n, self.time = "trace", n, 0.0
        self.starts = np.append(np.asarray(starts, dtype=np.float64), np.inf)   # sentinel
        self.ends = np.append(np.asarray(ends, dtype=np.float64), np.inf)
        self.stop = np.asarray(ptr[1:], dtype=np.int64)
        self.pos = np.asarray(ptr[:-1], dtype=np.int64).copy()
        self.always_on = (self.stop == self.pos) & unlisted_online
        self.on = np.zeros(n, dtype=bool)
        self.next_switch = np.zeros(n)
        self._advance(0.0)

    def _advance(self, t: float) -> None:
        while True:
            over = np.flatnonzero((self.pos < self.stop) & (self.ends[self.pos] <= t))
            if over.size == 0:
                break
            self.pos[over] += 1
        pending = self.pos < self.stop
        start = np.where(pending, self.starts[self.pos], np.inf)
        end = np.where(pending, self.ends[self.pos], np.inf)
        self.on = (start <= t) | self.always_on
        self.next_switch = np.where(self.always_on, np.inf, np.where(start <= t, end, start))

    def state_dict(self) -> dict:
        return {"pos": self.pos.copy(), "time": self.time}

    def load_state_dict(self, state: dict) -> None:
        self.pos, self.time = np.asarray(state["pos"], dtype=np.int64).copy(), float(state["time"])
        self._advance(self.time)
