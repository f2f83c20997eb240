"""Executors of the algorithm patterns in the simulator, one per pattern (imported on demand)."""

from __future__ import annotations

import importlib

from gossamer.sim.drivers.base import Driver

_DRIVERS = {
    "sync_fl": "gossamer.sim.drivers.sync_fl:SyncFLDriver",
    "sync_dl": "gossamer.sim.drivers.sync_dl:SyncDLDriver",
    "async_gossip": "gossamer.sim.drivers.gossip:GossipDriver",
    "sampled_dl": "gossamer.sim.drivers.modest:ModestDriver",
    "async_fl": "gossamer.sim.drivers.async_fl:AsyncFLDriver",
    "random_walk": "gossamer.sim.drivers.random_walk:RandomWalkDriver",
    "gradient_tracking": "gossamer.sim.drivers.gradient_tracking:GradientTrackingDriver",
    "choco": "gossamer.sim.drivers.choco:ChocoDriver",
    "zo_fl": "gossamer.sim.drivers.zo_fl:ZOFLDriver",
}


def driver_for(pattern: str) -> type[Driver]:
    """The simulator's executor class for an algorithm pattern."""
    module, _, name = _DRIVERS[pattern].partition(":")
    return getattr(importlib.import_module(module), name)


__all__ = ["Driver", "driver_for"]
