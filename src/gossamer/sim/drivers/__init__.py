"""Executors of the algorithm patterns in the simulator, one per pattern (imported on demand;
the table is ``protocols/patterns.py``)."""

from __future__ import annotations

import importlib

from gossamer.protocols.patterns import PATTERNS
from gossamer.sim.drivers.base import Driver


def driver_for(pattern: str) -> type[Driver]:
    """The simulator's executor class for an algorithm pattern."""
    module, _, name = PATTERNS[pattern].simulator.partition(":")
    return getattr(importlib.import_module(module), name)


__all__ = ["Driver", "driver_for"]
