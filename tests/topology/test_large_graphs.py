"""Graphs built as CSR arrays without networkx (10^6-node runs) and the spectral gap estimate."""

import numpy as np
import pytest

from gossamer.topology import make_topology, mixing_matrix, spectral_gap
from gossamer.topology.graphs import NUMPY_ABOVE_NODES


def test_numpy_random_regular_is_simple_regular_and_seeded():
    topo = make_topology("random_regular", 3000, 5, degree=4, method="numpy")
    assert topo.num_edges == 3000 * 4 // 2                   # canonical: no repeats, no loops
    assert (topo.degrees() == 4).all() and topo.is_connected()
    assert topo == make_topology("random_regular", 3000, 5, degree=4, method="numpy")
    assert topo != make_topology("random_regular", 3000, 6, degree=4, method="numpy")
    odd = make_topology("random_regular", 1001, 0, degree=6, method="numpy")
    assert (odd.degrees() == 6).all()


def test_numpy_barabasi_albert_attaches_preferentially():
    topo = make_topology("barabasi_albert", 20_000, 1, m=2, method="numpy")
    deg = topo.degrees()
    assert topo.is_connected() and deg.min() >= 1
    assert 1.9 * 20_000 < topo.num_edges <= 2 * 20_000       # m per node, a few repeats merged
    assert deg.max() > 50 * 4                                # hubs: far above the mean degree 4
    assert (np.sort(deg)[::-1][:10] > np.sort(deg)[::-1][-10:]).all()


def test_auto_keeps_networkx_below_the_threshold_and_numpy_above():
    small = make_topology("random_regular", 100, 0, degree=4)
    assert small == make_topology("random_regular", 100, 0, degree=4, method="networkx")
    assert NUMPY_ABOVE_NODES < 10**6
    with pytest.raises(ValueError, match="method must be"):
        make_topology("random_regular", 100, 0, degree=4, method="fast")


def test_power_estimate_bounds_the_gap_from_above_and_is_close_on_an_expander():
    w = mixing_matrix("metropolis_hastings", make_topology("random_regular", 3000, 2, degree=4))
    exact = spectral_gap(w)
    estimate = spectral_gap(w, exact_max_nodes=1000)
    assert exact <= estimate <= exact + 0.05
    ring = mixing_matrix("metropolis_hastings", make_topology("ring", 3000, 0))
    assert spectral_gap(ring, exact_max_nodes=1000) >= spectral_gap(ring)
    directed = mixing_matrix("uniform_neighbor", make_topology("barabasi_albert", 3000, 0, m=2))
    assert spectral_gap(directed, exact_max_nodes=1000) is None
