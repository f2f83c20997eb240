"""Communication graphs (static and changing every round), their mixing matrices and spectral gap."""

from gossamer.topology.core import Links, Topology
from gossamer.topology.dynamic import (
    DYNAMIC_TOPOLOGIES,
    DynamicTopology,
    jointly_connected,
    make_dynamic,
    union_links,
    window_links,
    window_spectral_gap,
)
from gossamer.topology.edge_list import read_edge_list
from gossamer.topology.graphs import RANDOM_TOPOLOGIES, TOPOLOGIES, make_topology
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
    "DYNAMIC_TOPOLOGIES",
    "MIXING",
    "RANDOM_TOPOLOGIES",
    "TOPOLOGIES",
    "DynamicTopology",
    "Links",
    "Topology",
    "jointly_connected",
    "make_dynamic",
    "make_topology",
    "metropolis_hastings",
    "mixing_matrix",
    "read_edge_list",
    "renormalize_for_available",
    "without_links",
    "spectral_gap",
    "to_torch_sparse",
    "uniform_neighbor",
    "union_links",
    "window_links",
    "window_spectral_gap",
]
