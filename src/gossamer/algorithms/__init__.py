"""Algorithms, registered by name: ``algorithm.name`` in a config selects one."""

from gossamer.algorithms.base import Algorithm
from gossamer.algorithms.dl.dpsgd import DPSGD
from gossamer.algorithms.dl.gossip import GossipLearning
from gossamer.algorithms.dl.modest import MoDeST
from gossamer.algorithms.fl.fedavg import FedAvg
from gossamer.registry import Registry

ALGORITHMS: Registry[type[Algorithm]] = Registry("algorithm")
ALGORITHMS.register("fedavg")(FedAvg)
ALGORITHMS.register("dpsgd")(DPSGD)
ALGORITHMS.register("gossip")(GossipLearning)
ALGORITHMS.register("modest")(MoDeST)

__all__ = ["ALGORITHMS", "Algorithm", "DPSGD", "FedAvg", "GossipLearning", "MoDeST"]
