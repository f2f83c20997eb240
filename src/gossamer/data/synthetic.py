"""Synthetic(alpha, beta): the naturally partitioned softmax-regression task of FedProx.

FedProx — Tian Li, Anit Kumar Sahu, Manzil Zaheer, et al., "Federated Optimization in
Heterogeneous Networks", MLSys 2020. arXiv:1812.06127
"""

from __future__ import annotations

import math

import numpy as np

from gossamer.data.datasets import DATASETS, Dataset, from_arrays


@DATASETS.register("synthetic")
def synthetic(
    alpha: float = 1.0,
    beta: float = 1.0,
    num_nodes: int = 30,
    dim: int = 60,
    num_classes: int = 10,
    seed: int = 0,
    iid: bool = False,
    test_fraction: float = 0.2,
    samples_per_user: int | None = None,
) -> Dataset:
    """Synthetic(alpha, beta) of Li et al. 2020 (arXiv:1812.06127), one user per node.

    User k: u_k ~ N(0, alpha^2), W_k ~ N(u_k, 1), b_k ~ N(u_k, 1); B_k ~ N(0, beta^2),
    v_k ~ N(B_k, 1); x ~ N(v_k, diag(j^-1.2)); y = argmax(W_k x + b_k). alpha and beta are
    standard deviations, as in the FedProx generator. `iid=True`: one W, b ~ N(0, 1) and
    v_k = 0 for all users. Sizes ~ int(lognormal(4, 2)) + 50 unless `samples_per_user` is set.
    As in that generator, u_k adds the same u_k * (sum(x) + 1) to every class logit, so the data
    do not depend on alpha (same seed, same data); beta moves the users' distributions apart.
    Each user's last round(test_fraction * n_k) samples go to the pooled test set;
    `natural_partition[k]` lists user k's train rows.
    """
    _validate(alpha, beta, num_nodes, dim, num_classes, test_fraction, samples_per_user)
    rng = np.random.RandomState(seed)
    if samples_per_user is None:
        sizes = rng.lognormal(4, 2, num_nodes).astype(np.int64) + 50
    else:
        sizes = np.full(num_nodes, samples_per_user, dtype=np.int64)
    if iid:
        mean_w = np.zeros(num_nodes)
        mean_x = np.zeros((num_nodes, dim))
        shared = (rng.normal(0, 1, (dim, num_classes)), rng.normal(0, 1, num_classes))
    else:
        mean_w = rng.normal(0, alpha, num_nodes)
        centers = rng.normal(0, beta, num_nodes)
        mean_x = rng.normal(centers[:, None], 1, (num_nodes, dim))
    feature_std = np.power(np.arange(1, dim + 1, dtype=np.float64), -1.2) ** 0.5
    num_train = sizes - np.array([int(round(test_fraction * s)) for s in sizes.tolist()], dtype=np.int64)
    train_end, test_end = np.cumsum(num_train), np.cumsum(sizes - num_train)
    # written in place, user after user (lists of per-user arrays cost ~6x the data at 10^6 users)
    train_x = np.empty((int(train_end[-1]), dim), dtype=np.float32)
    test_x = np.empty((int(test_end[-1]), dim), dtype=np.float32)
    train_y = np.empty(len(train_x), dtype=np.int64)
    test_y = np.empty(len(test_x), dtype=np.int64)
    for k in range(num_nodes):
        if iid:
            weight, bias = shared
        else:
            weight = rng.normal(mean_w[k], 1, (dim, num_classes))
            bias = rng.normal(mean_w[k], 1, num_classes)
        x = mean_x[k] + rng.standard_normal((sizes[k], dim)) * feature_std
        y = np.argmax(x @ weight + bias, axis=1)
        a, b, c, d = train_end[k] - num_train[k], train_end[k], test_end[k] - (sizes[k] - num_train[k]), test_end[k]
        train_x[a:b], train_y[a:b] = x[: num_train[k]], y[: num_train[k]]
        test_x[c:d], test_y[c:d] = x[num_train[k]:], y[num_train[k]:]
    natural = [np.arange(e - n, e, dtype=np.int64) for e, n in zip(train_end.tolist(), num_train.tolist(), strict=True)]
    return from_arrays("synthetic", (train_x, train_y), (test_x, test_y), num_classes, (dim,), natural)


def _validate(
    alpha: float,
    beta: float,
    num_nodes: int,
    dim: int,
    num_classes: int,
    test_fraction: float,
    samples_per_user: int | None,
) -> None:
    for name, value in (("alpha", alpha), ("beta", beta), ("test_fraction", test_fraction)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"synthetic: {name} must be a finite number, got {value!r}")
    for name, value in (("num_nodes", num_nodes), ("dim", dim), ("num_classes", num_classes),
                        ("samples_per_user", samples_per_user)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"synthetic: {name} must be an integer, got {value!r}")
    if alpha < 0 or beta < 0:
        raise ValueError(
            f"synthetic: alpha and beta must be >= 0, got alpha={alpha!r}, beta={beta!r}"
        )
    if num_nodes < 1 or dim < 1 or num_classes < 2:
        raise ValueError(
            f"synthetic: need num_nodes >= 1, dim >= 1, num_classes >= 2; "
            f"got {num_nodes!r}, {dim!r}, {num_classes!r}"
        )
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"synthetic: test_fraction must be in (0, 1), got {test_fraction!r}")
    if (
        samples_per_user is not None
        and samples_per_user - round(test_fraction * samples_per_user) < 1
    ):
        raise ValueError(
            f"synthetic: samples_per_user={samples_per_user!r} leaves no training sample per user"
        )


@DATASETS.register("random")
def random_inputs(shape: list[int] | tuple[int, ...] = (3, 32, 32), num_classes: int = 10,
                  train: int = 4000, test: int = 1000, seed: int = 0) -> Dataset:
    """Uniform inputs in [0, 1) of ``shape`` with uniform labels: data of a real task's shape
    (e.g. CIFAR's 3x32x32) for speed benchmarks where no real data may be downloaded. There is
    nothing to learn: accuracies stay at chance; losses still compare two executions."""
    dims = tuple(int(d) for d in shape) if isinstance(shape, (list, tuple)) else ()
    if not dims or any(d < 1 for d in dims):
        raise ValueError(f"random: shape must list positive sizes, e.g. [3, 32, 32], got {shape!r}")
    for name, value in (("num_classes", num_classes), ("train", train), ("test", test)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"random: {name} must be a positive integer, got {value!r}")
    rng = np.random.RandomState(seed)
    x = rng.random_sample((train + test, *dims)).astype(np.float32)
    y = rng.randint(0, num_classes, train + test)
    return from_arrays("random", (x[:train], y[:train]), (x[train:], y[train:]), num_classes, dims)
