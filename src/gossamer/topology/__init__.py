"""Communication graphs, their mixing matrices and spectral gap."""

from gossamer.topology.core import Topology
from gossamer.topology.edge_list import read_edge_list
from gossamer.topology.graphs import TOPOLOGIES, make_topology
from gossamer.topology.mixing import (
    MIXING,
    metropolis_hastings,
    mixing_matrix,
    renormalize_for_available,
    spectral_gap,
    to_torch_sparse,
    uniform_neighbor,
    without_links,
)

__all__ = [
    "MIXING",
    "TOPOLOGIES",
    "Topology",
    "make_topology",
    "metropolis_hastings",
    "mixing_matrix",
    "read_edge_list",
    "renormalize_for_available",
    "without_links",
    "spectral_gap",
    "to_torch_sparse",
    "uniform_neighbor",
]
