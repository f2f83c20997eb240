import numpy as np
import pytest
import scipy.sparse as sp

from gossamer.topology import (
    Topology,
    make_topology,
    metropolis_hastings,
    spectral_gap,
    uniform_neighbor,
)


def reference_gap(W) -> float:
    moduli = np.sort(np.abs(np.linalg.eigvals(np.asarray(W.todense()))))
    return 1.0 - moduli[-2]


def circulant_ring(n: int, self_weight: float) -> sp.csr_matrix:
    """Ring with the given self weight and the rest split over the two neighbours."""
    nodes = np.arange(n)
    rows = np.concatenate([nodes, nodes, nodes])
    cols = np.concatenate([nodes, (nodes + 1) % n, (nodes - 1) % n])
    side = (1.0 - self_weight) / 2
    data = np.concatenate([np.full(n, self_weight), np.full(2 * n, side)])
    return sp.csr_matrix((data, (rows, cols)), shape=(n, n))


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("ring", {}),
        ("torus", {"rows": 5, "cols": 6}),
        ("exponential", {}),
        ("random_regular", {"degree": 4}),
        ("barabasi_albert", {"m": 2}),
        ("erdos_renyi", {"p": 0.3}),
        ("complete", {}),
    ],
)
def test_gap_matches_numpy_eigenvalues(name, params):
    W = metropolis_hastings(make_topology(name, 30, 4, **params))
    assert spectral_gap(W) == pytest.approx(reference_gap(W), abs=1e-10)


@pytest.mark.parametrize(
    ("name", "params"), [("random_regular", {"degree": 4}), ("barabasi_albert", {"m": 2})]
)
def test_lanczos_path_agrees_with_dense_path(name, params):
    W = metropolis_hastings(make_topology(name, 300, 1, **params))
    assert spectral_gap(W, dense_max_nodes=0) == pytest.approx(spectral_gap(W), rel=1e-8)


@pytest.mark.parametrize("dense_max_nodes", [2000, 0])
def test_most_negative_eigenvalue_counts(dense_max_nodes):
    # Eigenvalues 0.1 + 0.9 cos(2 pi k / 6): lambda_2 = 0.55 but lambda_N = -0.8.
    W = circulant_ring(6, 0.1)
    assert spectral_gap(W, dense_max_nodes) == pytest.approx(0.2, abs=1e-10)
    assert reference_gap(W) == pytest.approx(0.2, abs=1e-10)


@pytest.mark.parametrize("dense_max_nodes", [2000, 0])
def test_bipartite_graph_without_self_weight_has_zero_gap(dense_max_nodes):
    assert spectral_gap(circulant_ring(20, 0.0), dense_max_nodes) == pytest.approx(0.0, abs=1e-10)


@pytest.mark.parametrize("dense_max_nodes", [2000, 0])
def test_disconnected_graph_has_zero_gap(dense_max_nodes):
    two_triangles = Topology(6, np.array([[0, 1], [1, 2], [0, 2], [3, 4], [4, 5], [3, 5]]))
    assert spectral_gap(metropolis_hastings(two_triangles), dense_max_nodes) == pytest.approx(
        0, abs=1e-10
    )


def test_large_ring_uses_lanczos_and_matches_closed_form():
    n = 2500
    W = metropolis_hastings(make_topology("ring", n, 0))
    closed_form = 1.0 - (1.0 / 3.0 + 2.0 / 3.0 * np.cos(2 * np.pi / n))
    assert spectral_gap(W) == pytest.approx(closed_form, rel=1e-6)


def test_complete_graph_and_single_node():
    assert spectral_gap(metropolis_hastings(make_topology("complete", 8, 0))) == pytest.approx(1.0)
    assert spectral_gap(metropolis_hastings(make_topology("ring", 1, 0))) == 1.0


@pytest.mark.parametrize("dense_max_nodes", [2000, 0])
def test_non_symmetric_row_stochastic_matrix(dense_max_nodes):
    W = uniform_neighbor(make_topology("barabasi_albert", 60, 3, m=2))
    assert spectral_gap(W, dense_max_nodes) == pytest.approx(reference_gap(W), abs=1e-8)


def test_matrix_that_is_not_row_stochastic_is_rejected():
    with pytest.raises(ValueError, match="row-stochastic"):
        spectral_gap(sp.csr_matrix(np.full((3, 3), 0.5)))
