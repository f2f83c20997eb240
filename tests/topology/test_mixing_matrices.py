import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from gossamer.topology import (
    MIXING,
    Topology,
    make_topology,
    metropolis_hastings,
    mixing_matrix,
    renormalize_for_available,
    to_torch_sparse,
    uniform_neighbor,
)

GRAPHS = [
    ("ring", {}),
    ("star", {}),
    ("grid", {"rows": 4, "cols": 6}),
    ("exponential", {}),
    ("erdos_renyi", {"p": 0.2}),
    ("random_regular", {"degree": 4}),
    ("barabasi_albert", {"m": 2}),
]


def path3() -> Topology:
    return Topology(3, np.array([[0, 1], [1, 2]]))


def test_metropolis_hastings_three_node_path_by_hand():
    # degrees (1, 2, 1): every edge weight is 1 / (1 + 2); self weights fill rows to 1.
    W = metropolis_hastings(path3())
    expected = np.array([[2, 1, 0], [1, 1, 1], [0, 1, 2]]) / 3
    assert isinstance(W, sp.csr_matrix) and W.dtype == np.float64
    assert W.nnz == 7
    np.testing.assert_allclose(W.toarray(), expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize(("name", "params"), GRAPHS)
def test_metropolis_hastings_is_symmetric_doubly_stochastic(name, params):
    topology = make_topology(name, 24, 5, **params)
    W = metropolis_hastings(topology)
    dense = W.toarray()
    np.testing.assert_array_equal(dense, dense.T)
    np.testing.assert_allclose(dense.sum(axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(dense.sum(axis=0), 1.0, atol=1e-12)
    assert dense.min() >= 0.0
    pattern = topology.adjacency().toarray() + np.eye(24)
    np.testing.assert_array_equal(dense[pattern == 0], 0.0)
    assert np.all(dense[pattern == 1] > 0)


def test_metropolis_hastings_on_the_benchmark_graph_is_one_fifth():
    W = metropolis_hastings(make_topology("random_regular", 100, 0, degree=4))
    np.testing.assert_allclose(W.data, 0.2, rtol=0, atol=1e-15)
    assert W.nnz == 500


def test_uniform_neighbor_is_row_stochastic_with_equal_shares():
    topology = make_topology("star", 5, 0)
    dense = uniform_neighbor(topology).toarray()
    np.testing.assert_allclose(dense.sum(axis=1), 1.0, atol=1e-15)
    np.testing.assert_allclose(dense[0], 0.2)
    np.testing.assert_allclose(dense[1], [0.5, 0.5, 0, 0, 0])
    assert not np.allclose(dense, dense.T)


def test_mixing_registry():
    assert MIXING.names() == ["metropolis_hastings", "uniform_neighbor"]
    topology = make_topology("ring", 6, 0)
    assert (
        mixing_matrix("metropolis_hastings", topology) != metropolis_hastings(topology)
    ).nnz == 0
    with pytest.raises(KeyError, match="metropolis_hastings"):
        mixing_matrix("max_degree", topology)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_sparse_product_matches_dense(dtype):
    W = metropolis_hastings(make_topology("barabasi_albert", 50, 1, m=2))
    X = torch.randn(50, 9, dtype=dtype, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sparse = to_torch_sparse(W, dtype=dtype)
    assert sparse.layout == torch.sparse_csr and sparse.dtype == dtype
    expected = torch.from_numpy(W.toarray()).to(dtype) @ X
    torch.testing.assert_close(torch.sparse.mm(sparse, X), expected)


def test_torch_sparse_accepts_unsorted_indices():
    W = sp.csr_matrix((np.array([0.5, 0.5]), np.array([1, 0]), np.array([0, 2, 2])), shape=(2, 2))
    dense = to_torch_sparse(W, dtype=torch.float64).to_dense()
    torch.testing.assert_close(dense, torch.tensor([[0.5, 0.5], [0.0, 0.0]], dtype=torch.float64))


def test_renormalize_three_node_path_by_hand():
    W = renormalize_for_available(metropolis_hastings(path3()), np.array([True, True, False]))
    expected = np.array([[2, 1, 0], [1, 2, 0], [0, 0, 3]]) / 3
    np.testing.assert_allclose(W.toarray(), expected, rtol=0, atol=1e-15)


def test_renormalize_keeps_rows_stochastic_and_symmetric():
    W = metropolis_hastings(make_topology("random_regular", 60, 2, degree=6))
    mask = np.random.default_rng(0).random(60) < 0.6
    dense = renormalize_for_available(W, mask).toarray()
    np.testing.assert_allclose(dense.sum(axis=1), 1.0, atol=1e-12)
    np.testing.assert_array_equal(dense, dense.T)
    np.testing.assert_array_equal(dense[~mask], np.eye(60)[~mask])
    assert np.all(dense[np.ix_(mask, ~mask)] == 0)
    both = np.outer(mask, mask) & ~np.eye(60, dtype=bool)
    np.testing.assert_array_equal(dense[both], W.toarray()[both])


def test_renormalize_with_everyone_available_is_identity_map():
    W = metropolis_hastings(make_topology("exponential", 20, 0))
    same = renormalize_for_available(W, np.ones(20, dtype=bool))
    np.testing.assert_allclose(same.toarray(), W.toarray(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="shape"):
        renormalize_for_available(W, np.ones(19, dtype=bool))
