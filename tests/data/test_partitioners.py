"""Partitioners: sizes, label skew, shards, quantity skew, relay-only nodes, errors."""

from __future__ import annotations

import re

import numpy as np
import pytest

from gossamer.data import PARTITIONERS, partition, relay_nodes

LABELS = np.arange(4000) % 10  # balanced, 400 rows per class


def label_histograms(parts: list[np.ndarray], labels: np.ndarray = LABELS) -> np.ndarray:
    return np.array([np.bincount(labels[p], minlength=10) for p in parts])


def assert_disjoint_cover(parts: list[np.ndarray], size: int) -> None:
    rows = np.concatenate(parts)
    assert all(p.dtype == np.int64 for p in parts)
    assert np.array_equal(np.sort(rows), np.arange(size))


@pytest.mark.parametrize(
    ("name", "params"),
    [("iid", {}), ("dirichlet", {"alpha": 0.3}), ("shards", {}), ("quantity_skew", {"alpha": 0.5})],
)
def test_every_partitioner_covers_each_row_once_and_is_seeded(name: str, params: dict) -> None:
    parts = partition(name, LABELS, np.int64(50), seed=np.int64(1), **params)
    assert len(parts) == 50
    assert_disjoint_cover(parts, len(LABELS))
    again = partition(name, LABELS, 50, seed=1, **params)
    other = partition(name, LABELS, 50, seed=2, **params)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_iid_is_exactly_the_design_protocol() -> None:
    parts = partition("iid", LABELS, 100, seed=0)
    expected = np.random.RandomState(0).permutation(4000).reshape(100, 40)
    assert np.array_equal(np.stack(parts), expected)
    uneven = partition("iid", np.zeros(10, dtype=np.int64), 3, seed=5)
    assert [len(p) for p in uneven] == [4, 3, 3]
    assert np.array_equal(np.concatenate(uneven), np.random.RandomState(5).permutation(10))


def test_dirichlet_small_alpha_skews_labels_large_alpha_does_not() -> None:
    skewed = label_histograms(partition("dirichlet", LABELS, 20, seed=0, alpha=0.05))
    uniform = label_histograms(partition("dirichlet", LABELS, 20, seed=0, alpha=1000.0))
    skewed_share = (skewed.max(axis=1) / skewed.sum(axis=1)).mean()
    uniform_share = (uniform.max(axis=1) / uniform.sum(axis=1)).mean()
    assert skewed_share > 0.6 and uniform_share < 0.15
    assert (skewed > 0).sum(axis=1).mean() < 4 and (uniform > 0).all()


def test_dirichlet_min_size_and_its_error() -> None:
    parts = partition("dirichlet", LABELS, 40, seed=0, alpha=0.1, min_size=20)
    assert min(len(p) for p in parts) >= 20
    message = "dirichlet: no draw in 5 tries gave all 400 nodes >= 10 samples"
    with pytest.raises(ValueError, match=message):
        partition("dirichlet", LABELS, 400, seed=0, alpha=0.01, min_size=10, max_tries=5)


def test_shards_give_each_node_at_most_shards_per_node_labels() -> None:
    for per_node in (1, 2, 4, 5):  # shard sizes divide the 400 rows of a class
        parts = partition("shards", LABELS, 40, seed=0, shards_per_node=per_node)
        labels_per_node = (label_histograms(parts) > 0).sum(axis=1)
        assert labels_per_node.max() <= per_node
        assert {len(p) for p in parts} == {4000 // 40}


def test_quantity_skew_sizes() -> None:
    skewed = np.array([len(p) for p in partition("quantity_skew", LABELS, 50, seed=0, alpha=0.2)])
    even = np.array([len(p) for p in partition("quantity_skew", LABELS, 50, seed=0, alpha=1e4)])
    assert skewed.std() > 5 * even.std() and skewed.max() > 4 * skewed.mean()
    assert even.min() >= 70 and even.max() <= 90
    many = [len(p) for p in partition("quantity_skew", LABELS, 1000, seed=0, alpha=0.1, min_size=2)]
    assert min(many) >= 2 and sum(many) == 4000


@pytest.mark.parametrize("name", ["iid", "dirichlet", "shards", "quantity_skew"])
def test_relay_nodes_hold_no_data(name: str) -> None:
    parts = partition(name, LABELS, 40, seed=3, relay_fraction=0.25)
    relays = relay_nodes(40, seed=3, relay_fraction=0.25)
    assert len(relays) == 10
    assert [i for i, p in enumerate(parts) if len(p) == 0] == relays.tolist()
    assert_disjoint_cover(parts, len(LABELS))


def test_relays_do_not_change_the_split_and_data_nodes_is_an_alternative() -> None:
    plain = partition("iid", LABELS, 30, seed=0)
    with_relays = partition("iid", LABELS, 40, seed=0, data_nodes=30)
    assert [p.tolist() for p in with_relays if len(p)] == [p.tolist() for p in plain]
    assert not np.array_equal(relay_nodes(40, 0, 0.25), relay_nodes(40, 1, 0.25))


def test_natural_partition_is_passed_through_and_checked() -> None:
    natural = [np.array([3, 1]), np.array([0]), np.array([2, 4])]
    labels = np.zeros(5, dtype=np.int64)
    assert [p.tolist() for p in partition("natural", labels, 3, seed=0, natural=natural)] == [
        [3, 1],
        [0],
        [2, 4],
    ]
    with pytest.raises(ValueError, match="has 3 users but 4 data-holding nodes"):
        partition("natural", labels, 4, seed=0, natural=natural)
    with pytest.raises(ValueError, match="distinct and in 0..4"):
        partition("natural", labels, 2, seed=0, natural=[np.array([0, 5]), np.array([1])])
    with pytest.raises(ValueError, match="no natural partition"):
        partition("natural", labels, 2, seed=0)


@pytest.mark.parametrize(
    ("args", "params", "message"),
    [
        (("iid", LABELS, 4001, 0), {}, "4001 data-holding nodes but only 4000 samples"),
        (("dirichlet", LABELS, 10, 0), {"alpha": 0.0}, "alpha must be > 0, got 0.0"),
        (("quantity_skew", LABELS, 10, 0), {"alpha": -1}, "alpha must be > 0, got -1"),
        (("quantity_skew", LABELS, 10, 0), {"min_size": 401}, "min_size=401 x 10 nodes"),
        (("shards", LABELS, 10, 0), {"shards_per_node": 0}, "shards: need 1 <= shards_per_node"),
        (("iid", LABELS, 0, 0), {}, "num_nodes must be a positive integer, got 0"),
        (("iid", LABELS, 10, -1), {}, "seed must be an integer in [0, 2**32), got -1"),
        (("iid", LABELS.astype(float), 10, 0), {}, "1-D integer array, got float64"),
        (("iid", LABELS, 10, 0), {"relay_fraction": 1.0}, "relay_fraction must be in [0, 1)"),
        (("iid", LABELS, 10, 0), {"data_nodes": 11}, "data_nodes must be in 1..10, got 11"),
        (("iid", LABELS, 10, 0), {"data_nodes": 5, "relay_fraction": 0.5}, "not both"),
        (
            ("iid", LABELS, 10, 0),
            {"alpha": 0.5},
            "partitioner 'iid' got unknown parameter(s) alpha",
        ),
        (
            ("pathological", LABELS, 10, 0),
            {},
            "unknown partitioner 'pathological'; known: dirichlet",
        ),
    ],
)
def test_user_errors_are_one_line_value_errors(args: tuple, params: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        partition(*args, **params)
    assert "\n" not in str(info.value)


def test_registry_names() -> None:
    assert PARTITIONERS.names() == ["dirichlet", "iid", "natural", "quantity_skew", "shards"]
