"""Which process class runs each algorithm pattern on real processes.

``gossamer server`` builds ``COORDINATORS[pattern]`` (synchronous or asynchronous FL, islands)
and ``gossamer client`` the pattern's client class (:func:`client_class`).

``gossamer peer`` builds ``PEER_ROLES[pattern]`` for the config's algorithm; ``gossamer launch``
starts one such process per node and then calls ``MERGER`` (``runtime/dl_merge.py``: the
pattern's rows of ``protocols/dl_metrics.py`` from the peers' records) to write the run's
``metrics.csv`` and ``summary.json``.
The classes come from the one pattern table, ``protocols/patterns.py`` ("module:Class",
imported lazily); a new pattern gets a runtime by naming its class there.
A peer class takes ``(cfg, node_id, run_dir, *, listen, resume)`` and has ``run(peers_file)``.
"""

from __future__ import annotations

import importlib
from typing import Any

from gossamer.protocols.patterns import PATTERNS

COORDINATORS: dict[str, str] = {p: x.runtime for p, x in PATTERNS.items() if x.role == "coordinator"}
PEER_ROLES: dict[str, str] = {p: x.runtime for p, x in PATTERNS.items() if x.role == "peer"}
MERGER = "gossamer.runtime.dl_merge:merge_metrics"


def _load(target: str) -> Any:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def peer_class(pattern: str, algorithm: str) -> Any:
    """The process class for ``pattern``, or a ConfigError naming ``algorithm.name``."""
    if pattern not in PEER_ROLES:
        from gossamer.config import ConfigError

        runnable = ", ".join(sorted(PEER_ROLES))
        raise ConfigError("algorithm.name", f"{algorithm} ({pattern}) has no runtime peer yet; peers "
                          f"run the patterns {runnable}; use `gossamer run` (the simulator)")
    return _load(PEER_ROLES[pattern])


def client_class(pattern: str) -> Any:
    """The client process class of a coordinator ``pattern`` (the FL client unless it names one)."""
    return _load(PATTERNS[pattern].client)


def merger(pattern: str) -> Any:
    """What writes ``metrics.csv`` from the peers' records (one merger for every peer pattern)."""
    return _load(MERGER)


def coordinator_class(pattern: str) -> Any:
    """The coordinator process class of ``pattern`` (the synchronous one refuses a pattern it
    does not run, in one line)."""
    return _load(COORDINATORS.get(pattern, COORDINATORS["sync_fl"]))


def make_coordinator(cfg: Any, run_dir: Any, *, resume: bool = False, listen: str | None = None) -> Any:
    """The coordinator for ``cfg``'s algorithm: synchronous rounds or asynchronous updates."""
    from gossamer.algorithms import ALGORITHMS
    from gossamer.runtime.common import refuse_simulator_only

    refuse_simulator_only(cfg)                       # e.g. choco, which has no coordinator yet
    pattern = ALGORITHMS.get(cfg.algorithm.name).pattern
    # any other pattern: the synchronous coordinator refuses it in one line
    return coordinator_class(pattern)(cfg, run_dir, resume=resume, listen=listen)
