"""The `Dataset` record, the dataset registry and `load_dataset`, the one entry point."""

from __future__ import annotations

import inspect
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from gossamer.registry import Registry


@dataclass(frozen=True, eq=False)
class Dataset:
    """Train and test tensors of one classification task.

    x_train: float32 [S, *input_shape]; y_train: int64 [S]; likewise x_test / y_test.
    natural_partition: train row indices per user for naturally partitioned data, else None.
    local_tests: each user's own test row indices into x_train / y_train, when the dataset
    holds them out itself (graph datasets: a client's held-out nodes); else None.
    Graph datasets (``data/graph.py``) label every node of a sample: y is then ``[S, M]``,
    ``-1`` where a node is not a target.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    input_shape: tuple[int, ...]
    name: str
    natural_partition: list[np.ndarray] | None = None
    local_tests: list[np.ndarray] | None = None


DatasetLoader = Callable[..., Dataset]
DATASETS: Registry[DatasetLoader] = Registry("dataset")


def load_dataset(name: str, **params: object) -> Dataset:
    """Load the dataset registered as `name`; `max_train` / `max_test` keep the first rows.

    Every user error (unknown name or parameter, missing file) is a one-line ValueError.
    """
    try:
        loader = DATASETS.get(name)
    except KeyError as err:
        raise ValueError(err.args[0]) from None
    max_train = params.pop("max_train", None)
    max_test = params.pop("max_test", None)
    check_params(f"dataset {name!r}", loader, params)
    dataset = loader(**params)
    return subsample(
        dataset, _optional_count("max_train", max_train), _optional_count("max_test", max_test)
    )


def check_params(
    what: str, fn: Callable[..., object], params: dict[str, object], skip: tuple[str, ...] = ()
) -> None:
    """Reject keyword arguments `fn` does not accept, or required ones left out, in one line."""
    signature = inspect.signature(fn).parameters
    accepted = [p for p in signature if p not in skip]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(
            f"{what} got unknown parameter(s) {', '.join(unknown)}; accepted: {', '.join(accepted) or 'none'}"
        )
    missing = [
        p for p in accepted if signature[p].default is inspect.Parameter.empty and p not in params
    ]
    if missing:
        raise ValueError(f"{what} needs parameter(s) {', '.join(missing)}")


def _optional_count(field: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{field} must be a positive integer, got {value!r}")
    return value


def subsample(dataset: Dataset, max_train: int | None, max_test: int | None) -> Dataset:
    """Keep the first `max_train` train rows and `max_test` test rows (deterministic)."""
    if max_train is None and max_test is None:
        return dataset
    if dataset.local_tests is not None:
        raise ValueError(f"max_train and max_test do not apply to dataset {dataset.name}: its "
                         "samples are whole client subgraphs")
    natural = dataset.natural_partition
    if natural is not None and max_train is not None:
        natural = [idx[idx < max_train] for idx in natural]
    return replace(
        dataset,
        x_train=dataset.x_train[:max_train],
        y_train=dataset.y_train[:max_train],
        x_test=dataset.x_test[:max_test],
        y_test=dataset.y_test[:max_test],
        natural_partition=natural,
    )


def from_arrays(
    name: str,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    num_classes: int,
    input_shape: tuple[int, ...],
    natural_partition: list[np.ndarray] | None = None,
) -> Dataset:
    """Build a Dataset from numpy (features, labels) pairs, reshaping features to input_shape."""

    def features(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32).reshape(-1, *input_shape))

    def labels(y: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64).reshape(-1))

    return Dataset(
        x_train=features(train[0]),
        y_train=labels(train[1]),
        x_test=features(test[0]),
        y_test=labels(test[1]),
        num_classes=num_classes,
        input_shape=tuple(input_shape),
        name=name,
        natural_partition=natural_partition,
    )


def cache_dir() -> Path:
    """Where derived arrays are cached: `$GOSSAMER_CACHE`, else `~/.cache/gossamer`."""
    env = os.environ.get("GOSSAMER_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "gossamer"


def save_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    """Write an .npz so that readers see either the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
