"""Synthetic(alpha, beta) of FedProx: shapes, natural partition, determinism, heterogeneity."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from gossamer.data import Dataset, load_dataset, partition


def label_spread(ds: Dataset) -> float:
    """Mean over classes of the std across users of each user's label frequency."""
    y = ds.y_train.numpy()
    hist = np.array(
        [np.bincount(y[idx], minlength=ds.num_classes) / len(idx) for idx in ds.natural_partition]
    )
    return float(hist.std(axis=0).mean())


def test_shapes_and_natural_partition() -> None:
    ds = load_dataset("synthetic", alpha=0.5, beta=0.5, num_nodes=12, seed=1)
    assert ds.input_shape == (60,) and ds.num_classes == 10 and ds.x_train.dtype == torch.float32
    assert ds.x_train.shape[1:] == (60,) and ds.y_train.max() < 10
    assert len(ds.natural_partition) == 12
    rows = np.concatenate(ds.natural_partition)
    assert np.array_equal(np.sort(rows), np.arange(len(ds.y_train)))
    sizes = np.array([len(p) for p in ds.natural_partition])
    assert sizes.min() >= 40  # at least 50 samples per user, 80% of them for training
    assert len(ds.y_test) == pytest.approx(0.25 * len(ds.y_train), rel=0.05)


def test_fixed_samples_per_user_and_dim() -> None:
    ds = load_dataset("synthetic", num_nodes=5, dim=7, num_classes=3, samples_per_user=10)
    assert ds.x_train.shape == (40, 7) and ds.x_test.shape == (10, 7)
    assert [len(p) for p in ds.natural_partition] == [8] * 5


def test_same_seed_same_data_other_seed_other_data() -> None:
    a = load_dataset("synthetic", num_nodes=6, seed=3)
    b = load_dataset("synthetic", num_nodes=6, seed=3)
    c = load_dataset("synthetic", num_nodes=6, seed=4)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert a.x_train.shape != c.x_train.shape or not torch.equal(a.x_train, c.x_train)


def test_larger_beta_spreads_user_distributions() -> None:
    common = {"alpha": 0.0, "num_nodes": 30, "samples_per_user": 200, "seed": 0}
    spreads = [label_spread(load_dataset("synthetic", beta=beta, **common)) for beta in (0.0, 10.0)]
    assert spreads[1] > spreads[0] + 0.03
    iid = load_dataset("synthetic", iid=True, **common)
    assert label_spread(iid) < spreads[0]


def test_alpha_shifts_every_logit_equally_as_in_the_fedprox_generator() -> None:
    a = load_dataset("synthetic", alpha=0.0, beta=1.0, num_nodes=5, seed=2)
    b = load_dataset("synthetic", alpha=5.0, beta=1.0, num_nodes=5, seed=2)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)


def test_natural_partition_feeds_the_natural_partitioner_with_relays() -> None:
    ds = load_dataset("synthetic", num_nodes=4, samples_per_user=10)
    parts = partition(
        "natural", ds.y_train.numpy(), 6, seed=0, data_nodes=4, natural=ds.natural_partition
    )
    assert sum(len(p) == 0 for p in parts) == 2
    assert [p.tolist() for p in parts if len(p)] == [p.tolist() for p in ds.natural_partition]


def test_max_train_filters_the_natural_partition() -> None:
    ds = load_dataset("synthetic", num_nodes=4, samples_per_user=10, max_train=12)
    assert [len(p) for p in ds.natural_partition] == [8, 4, 0, 0]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"alpha": -1.0}, "alpha and beta must be >= 0"),
        ({"num_nodes": 0}, "need num_nodes >= 1"),
        ({"test_fraction": 0.0}, "test_fraction must be in (0, 1)"),
        ({"samples_per_user": 2, "test_fraction": 0.75}, "leaves no training sample"),
    ],
)
def test_bad_parameters(params: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        load_dataset("synthetic", **params)
