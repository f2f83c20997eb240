"""The one table of execution patterns: each pattern's protocol and its executors.

An algorithm names its ``pattern``; this table says which module holds the pattern's
decisions and which classes execute them in the simulator and on real processes
(``"module:Class"``, imported lazily by ``sim/drivers`` and ``runtime/roles.py``, so this
module imports no executor). ``runtime`` is None for a pattern that runs in the simulator
only; ``role`` says whether its real processes are a coordinator with clients or peers;
``client`` names a coordinator pattern's client class when it is not the FL client.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Pattern:
    protocol: str
    simulator: str
    runtime: str | None = None
    role: Literal["coordinator", "peer"] | None = None
    client: str = "gossamer.runtime.fl_client:Client"


_SIM, _RT = "gossamer.sim.drivers.", "gossamer.runtime."
PATTERNS: dict[str, Pattern] = {
    "sync_fl": Pattern("gossamer.protocols.sync_fl", _SIM + "sync_fl:SyncFLDriver",
                       _RT + "fl_server:Coordinator", "coordinator"),
    "async_fl": Pattern("gossamer.protocols.async_fl", _SIM + "async_fl:AsyncFLDriver",
                        _RT + "async_server:AsyncCoordinator", "coordinator"),
    "zo_fl": Pattern("gossamer.protocols.zo_fl", _SIM + "zo_fl:ZOFLDriver", _RT + "zo_fl:ZOCoordinator",
                     "coordinator", _RT + "zo_fl:ZOClient"),
    "sync_dl": Pattern("gossamer.protocols.sync_dl", _SIM + "sync_dl:SyncDLDriver",
                       _RT + "dl_peer:Peer", "peer"),
    "gradient_tracking": Pattern("gossamer.protocols.sync_dl",
                                 _SIM + "gradient_tracking:GradientTrackingDriver",
                                 _RT + "tracking_peer:GradientTrackingPeer", "peer"),
    "choco": Pattern("gossamer.protocols.sync_dl", _SIM + "choco:ChocoDriver", _RT + "choco_peer:ChocoPeer",
                     "peer"),
    "async_gossip": Pattern("gossamer.protocols.gossip", _SIM + "gossip:GossipDriver",
                            _RT + "gossip_peer:GossipPeer", "peer"),
    "sampled_dl": Pattern("gossamer.protocols.modest", _SIM + "modest:ModestDriver",
                          _RT + "modest_peer:ModestPeer", "peer"),
    "experts": Pattern("gossamer.protocols.experts", _SIM + "experts:ExpertsDriver",
                       _RT + "experts:ExpertsCoordinator", "coordinator", _RT + "experts:ExpertsClient"),
    "islands": Pattern("gossamer.protocols.islands", _SIM + "islands:IslandsDriver",
                       _RT + "islands:IslandsCoordinator", "coordinator", _RT + "islands:IslandsWorker"),
    "grank": Pattern("gossamer.algorithms.dl.grank", _SIM + "grank:GRankDriver"),
    "coded": Pattern("gossamer.protocols.coding", _SIM + "coded:CodedDriver", _RT + "coded:CodedCoordinator",
                     "coordinator", _RT + "coded:CodedClient"),
    "random_walk": Pattern("gossamer.protocols.random_walk", _SIM + "random_walk:RandomWalkDriver",
                           _RT + "walk_peer:WalkPeer", "peer"),
}
