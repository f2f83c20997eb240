"""Device and link profiles of a registered population, drawn from counters on demand.

Client ``i``'s value of field ``k`` is ``quantile(spec, u)`` with ``u`` the counter-based
uniform of ``(seed, STREAM_SYSTEM, k, i)``: a pure function of the client's id, computed
when the client acts and never stored. The law is the configured distribution's; the numbers
differ from a materialized population's, whose draws come from one generator per field.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.special import ndtri

from gossamer import rng
from gossamer.config import ConfigError, Distribution, SystemConfig

# Field order fixes each field's counter key (its index), as in gossamer.sim.system.
_FIELDS = ("sample_time_s", "latency_s", "bandwidth_up_Bps", "bandwidth_down_Bps",
           "latency_up_s", "latency_down_s")


def open_uniform(seed: int, stream: int, *keys: Any) -> np.ndarray:
    """Counter-based uniforms in the open interval (0, 1) (safe for quantile functions)."""
    h = rng.hash_u64(seed, stream, *keys)
    return ((h >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / (1 << 53))


def quantile(spec: Distribution, u: np.ndarray, nodes: np.ndarray | None = None) -> np.ndarray:
    """The value of ``spec``'s distribution at probability ``u`` (inverse CDF), elementwise;
    ``per_node`` reads ``values[nodes]`` (a registered population has no such list)."""
    if spec.dist == "constant":
        return np.full(np.shape(u), float(spec.value))
    if spec.dist == "uniform":
        return spec.low + (spec.high - spec.low) * u
    if spec.dist == "lognormal":
        return spec.median * np.exp(spec.sigma * ndtri(u))
    if spec.dist == "exponential":
        return -spec.mean * np.log1p(-u)
    values = np.asarray(spec.values, dtype=np.float64)
    if spec.dist == "per_node":
        if nodes is None:
            raise ValueError(f"dist {spec.dist} lists one value per client; a registered population "
                             "draws them: use constant, uniform, lognormal, exponential or tiers")
        return values[nodes]
    probs = np.full(len(values), 1.0 / len(values)) if spec.probs is None else np.asarray(spec.probs)
    index = np.searchsorted(np.cumsum(probs), u, side="right")
    return values[np.minimum(index, len(values) - 1)]


class LazySystemProfile:
    """:class:`~gossamer.sim.system.SystemProfile`'s cost methods for a registered population:
    each client's device and link values are computed from counters when asked for."""

    def __init__(self, cfg: SystemConfig, n: int, seed: int, compute_factor: float = 1.0) -> None:
        self.n, self.seed, self.compute_factor = n, seed, compute_factor
        self.specs: dict[str, tuple[int, Distribution]] = {}
        for key, field in enumerate(_FIELDS):
            spec = getattr(cfg, field)
            if spec is None:
                continue
            if spec.dist in ("per_node", "trace"):
                raise ConfigError(f"system.{field}", f"dist {spec.dist} lists one value per node; a "
                                  "lazy population draws them (constant, uniform, lognormal, "
                                  "exponential, tiers)")
            if field.startswith("bandwidth") and quantile(spec, np.array([1e-16]))[0] <= 0:
                raise ConfigError(f"system.{field}", "bandwidth must be > 0 for every node")
            self.specs[field] = (key, spec)
        for name in ("latency_up_s", "latency_down_s"):
            self.specs.setdefault(name, self.specs["latency_s"])
        self.server_bandwidth_Bps = cfg.server_bandwidth_Bps

    def value(self, field: str, nodes: np.ndarray) -> np.ndarray:
        """``field``'s value for each of ``nodes``."""
        key, spec = self.specs[field]
        return quantile(spec, open_uniform(self.seed, rng.STREAM_SYSTEM, key, np.asarray(nodes, dtype=np.int64)))

    def compute_s(self, nodes: np.ndarray, samples: np.ndarray) -> np.ndarray:
        return self.value("sample_time_s", nodes) * self.compute_factor * samples

    def upload_s(self, nodes: np.ndarray, nbytes: int | np.ndarray) -> np.ndarray:
        return self.value("latency_up_s", nodes) + nbytes / self.value("bandwidth_up_Bps", nodes)

    def download_s(self, nodes: np.ndarray, nbytes: int | np.ndarray) -> np.ndarray:
        return self.value("latency_down_s", nodes) + nbytes / self.value("bandwidth_down_Bps", nodes)

    def server_fanout_s(self, total_bytes: int) -> float:
        return 0.0 if self.server_bandwidth_Bps is None else total_bytes / self.server_bandwidth_Bps
