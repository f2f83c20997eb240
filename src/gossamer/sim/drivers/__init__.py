"""Executors of the algorithm patterns in the simulator, one per pattern."""

from gossamer.sim.drivers.base import Driver
from gossamer.sim.drivers.gossip import GossipDriver
from gossamer.sim.drivers.sync_dl import SyncDLDriver
from gossamer.sim.drivers.sync_fl import SyncFLDriver

DRIVERS: dict[str, type[Driver]] = {
    "sync_fl": SyncFLDriver,
    "sync_dl": SyncDLDriver,
    "async_gossip": GossipDriver,
}

__all__ = ["DRIVERS", "Driver", "GossipDriver", "SyncDLDriver", "SyncFLDriver"]
