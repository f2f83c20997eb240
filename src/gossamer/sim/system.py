"""Device and network profiles, node availability, and the simulated cost of work.

Every local step and every message costs simulated seconds: compute is samples times the
node's seconds-per-sample; a message costs latency plus bytes over bandwidth.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gossamer import rng
from gossamer.config import ConfigError, Distribution, SystemConfig


def draw(spec: Distribution, n: int, seed: int, key: int, field: str) -> np.ndarray:
    """Draw one value per node from a distribution spec (deterministic in seed and key)."""
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


@dataclass(frozen=True)
class SystemProfile:
    """Per-node device and link parameters, arrays of length N."""

    sample_time_s: np.ndarray
    latency_s: np.ndarray
    bandwidth_up_Bps: np.ndarray
    bandwidth_down_Bps: np.ndarray
    server_bandwidth_Bps: float | None = None

    @classmethod
    def from_config(cls, cfg: SystemConfig, n: int, seed: int) -> SystemProfile:
        parts = {}
        for key, field in enumerate(("sample_time_s", "latency_s", "bandwidth_up_Bps",
                                     "bandwidth_down_Bps")):
            values = draw(getattr(cfg, field), n, seed, key, f"system.{field}")
            if field.startswith("bandwidth") and (values <= 0).any():
                raise ConfigError(f"system.{field}", "bandwidth must be > 0 for every node")
            parts[field] = values
        return cls(**parts, server_bandwidth_Bps=cfg.server_bandwidth_Bps)

    def compute_s(self, nodes: np.ndarray, samples: np.ndarray) -> np.ndarray:
        return self.sample_time_s[nodes] * samples

    def upload_s(self, nodes: np.ndarray, nbytes: int | np.ndarray) -> np.ndarray:
        return self.latency_s[nodes] + nbytes / self.bandwidth_up_Bps[nodes]

    def download_s(self, nodes: np.ndarray, nbytes: int | np.ndarray) -> np.ndarray:
        return self.latency_s[nodes] + nbytes / self.bandwidth_down_Bps[nodes]

    def server_fanout_s(self, total_bytes: int) -> float:
        """Time the server's own link needs to move ``total_bytes`` (0 when unlimited)."""
        return 0.0 if self.server_bandwidth_Bps is None else total_bytes / self.server_bandwidth_Bps


class Availability:
    """Which nodes are online at a simulated time.

    ``always``: every node, always. ``markov``: each node alternates on and off periods with
    exponential durations (means ``mean_on_s``, ``mean_off_s``); the k-th duration of node i
    is a pure function of (seed, i, k), so the process is reproducible and resumable from
    its small state (current phase, switch time, counter per node).
    """

    def __init__(self, model: str, n: int, seed: int, mean_on_s: float = 1.0,
                 mean_off_s: float = 1.0, initial_on_fraction: float | None = None) -> None:
        self.model, self.n, self.seed = model, n, seed
        self.mean = np.array([mean_off_s, mean_on_s])
        frac = mean_on_s / (mean_on_s + mean_off_s) if initial_on_fraction is None else initial_on_fraction
        nodes = np.arange(n)
        self.on = rng.uniform(seed, rng.STREAM_AVAILABILITY, nodes, 0) < frac
        self.counter = np.ones(n, dtype=np.int64)
        self.next_switch = self._duration(nodes)
        self.time = 0.0

    @classmethod
    def from_config(cls, cfg: SystemConfig, n: int, seed: int) -> Availability:
        a = cfg.availability
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
        while True:
            due = np.flatnonzero(self.next_switch <= t)
            if due.size == 0:
                return self.on.copy()
            self.on[due] = ~self.on[due]
            self.next_switch[due] += self._duration(due)

    def state_dict(self) -> dict:
        return {"on": self.on.copy(), "counter": self.counter.copy(),
                "next_switch": self.next_switch.copy(), "time": self.time}

    def load_state_dict(self, state: dict) -> None:
        self.on, self.counter = np.asarray(state["on"]), np.asarray(state["counter"])
        self.next_switch, self.time = np.asarray(state["next_switch"]), float(state["time"])
