"""Device and link profiles of a registered population, drawn from counters on demand.

Client ``i``'s value of field ``k`` is ``quantile(spec, u)`` with ``u`` the counter-based
uniform of ``(seed, STREAM_SYSTEM, k, i)``: a pure function of the client's id, computed
when the client acts and never stored. The law is the configured distribution's; the numbers
differ from a materialized population's, whose draws come from one generator per field.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from gossamer import rng
from gossamer.config import ConfigError, Distribution, SystemConfig

if TYPE_CHECKING:
    from gossamer.sim.system import SystemProfile


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
        from scipy.special import ndtri  # 0.2 s to import: only where it is needed

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


class DrawnColumn:
    """A profile field of a registered population, used like the materialized profile's array:
    ``column[nodes]`` draws each of ``nodes``' values from its counters (times ``factor``)."""

    def __init__(self, spec: Distribution, seed: int, key: int, factor: float = 1.0) -> None:
        self.spec, self.seed, self.key, self.factor = spec, seed, key, factor

    def __getitem__(self, nodes: np.ndarray | int) -> np.ndarray:
        u = open_uniform(self.seed, rng.STREAM_SYSTEM, self.key, np.asarray(nodes, dtype=np.int64))
        return quantile(self.spec, u) * self.factor


def lazy_profile(cfg: SystemConfig, seed: int, compute_factor: float = 1.0) -> SystemProfile:
    """A :class:`~gossamer.sim.system.SystemProfile` (the same cost methods) whose fields are
    :class:`DrawnColumn` s: nothing of length N. Field ``k`` of ``_PROFILE_FIELDS`` draws with
    key ``k``; ``compute_factor`` scales seconds per sample (SAM's two passes)."""
    from gossamer.sim.system import _PROFILE_FIELDS, SystemProfile

    columns: dict[str, DrawnColumn] = {}
    for key, field in enumerate(_PROFILE_FIELDS):
        spec = getattr(cfg, field)
        if spec is None:                             # latency_up_s / latency_down_s: latency_s
            continue
        if spec.dist in ("per_node", "trace"):
            raise ConfigError(f"system.{field}", f"dist {spec.dist} lists one value per node; a "
                              "lazy population draws them (constant, uniform, lognormal, "
                              "exponential, tiers)")
        if field.startswith("bandwidth") and quantile(spec, np.array([1e-16]))[0] <= 0:
            raise ConfigError(f"system.{field}", "bandwidth must be > 0 for every node")
        columns[field] = DrawnColumn(spec, seed, key, compute_factor if field == "sample_time_s" else 1.0)
    return SystemProfile(**columns, server_bandwidth_Bps=cfg.server_bandwidth_Bps)  # type: ignore[arg-type]
