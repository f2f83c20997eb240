"""The data of a registered population, generated for a client when it acts.

Client ``i``'s sample count and rows are pure functions of ``(seed, i)``; nothing of length N
is ever built. Two sources:

- :class:`SyntheticClients`: Synthetic(alpha, beta) of FedProx (Li et al., MLSys 2020,
  arXiv:1812.06127), user ``i`` drawn from its own counter-based generator (the law of
  ``gossamer.data.synthetic``; its numbers differ, since that one draws users in sequence);
- :class:`PartitionedClients`: a loaded dataset partitioned on demand: client ``i`` draws its
  sample count from a distribution and its rows uniformly (``iid``) or with class
  proportions from Dir(alpha) (``dirichlet``, the label skew of Hsu et al. 2019,
  arXiv:1909.06335), with replacement: with 10^8 clients the shards of a 60k-row dataset
  cannot be disjoint.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.special import ndtri

from gossamer import rng
from gossamer.config import Distribution
from gossamer.data.datasets import Dataset
from gossamer.population.profiles import open_uniform, quantile

_IID_MODEL = (1 << 62) + 1          # key of the model every user shares in Synthetic's iid variant


class ClientSource:
    """Per-client data of ``n`` registered clients: what a lazy trainer and evaluator read."""

    n: int
    input_shape: tuple[int, ...]
    num_classes: int

    def sizes(self, ids: np.ndarray) -> np.ndarray:
        """Training samples of each of ``ids`` (int64, >= 1)."""
        raise NotImplementedError

    def data(self, ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """The training rows of ``ids``, client after client: inputs, labels and each client's
        count (equal to :meth:`sizes`)."""
        raise NotImplementedError

    def example(self) -> torch.Tensor:
        """One input row (for building the model's stacked forward)."""
        return self.data(np.zeros(1, dtype=np.int64))[0][:1]


class SyntheticClients(ClientSource):
    """Synthetic(alpha, beta), user ``i`` generated from ``(seed, i)``.

    User i: u ~ N(0, alpha^2), W ~ N(u, 1), b ~ N(u, 1); B ~ N(0, beta^2), v ~ N(B, 1);
    x ~ N(v, diag(j^-1.2)); y = argmax(W x + b); ``iid``: one W, b ~ N(0, 1) for all users
    and v = 0. Sizes: ``samples_per_user``, else int(lognormal(4, 2)) + 50 (the FedProx law),
    at most ``max_samples``; the last round(test_fraction * size) rows are the user's test rows.
    """

    def __init__(self, n: int, alpha: float = 1.0, beta: float = 1.0, dim: int = 60,
                 num_classes: int = 10, seed: int = 0, iid: bool = False, test_fraction: float = 0.2,
                 samples_per_user: int | None = None, max_samples: int | None = None) -> None:
        from gossamer.data.synthetic import _validate

        _validate(alpha, beta, 1, dim, num_classes, test_fraction, samples_per_user)
        if max_samples is not None and max_samples - round(test_fraction * max_samples) < 1:
            raise ValueError(f"population.max_samples={max_samples} leaves no training sample per user")
        self.n, self.alpha, self.beta, self.dim = int(n), float(alpha), float(beta), int(dim)
        self.num_classes, self.seed, self.iid = int(num_classes), int(seed), bool(iid)
        self.test_fraction, self.per_user, self.cap = float(test_fraction), samples_per_user, max_samples
        self.input_shape = (self.dim,)
        self.std = np.power(np.arange(1, self.dim + 1, dtype=np.float64), -1.2) ** 0.5
        self.shared = None
        if self.iid:
            g = rng.generator(self.seed, rng.STREAM_POPULATION, _IID_MODEL)
            self.shared = (g.normal(0, 1, (self.dim, self.num_classes)), g.normal(0, 1, self.num_classes))

    def total(self, ids: np.ndarray) -> np.ndarray:
        """Each user's rows, train and test."""
        ids = np.asarray(ids, dtype=np.int64)
        if self.per_user is not None:
            size = np.full(ids.shape, self.per_user, dtype=np.int64)
        else:
            z = ndtri(open_uniform(self.seed, rng.STREAM_POPULATION, ids, 0))
            size = np.exp(np.minimum(4.0 + 2.0 * z, 40.0)).astype(np.int64) + 50
        return size if self.cap is None else np.minimum(size, self.cap)

    def sizes(self, ids: np.ndarray) -> np.ndarray:
        total = self.total(ids)
        return total - np.round(self.test_fraction * total).astype(np.int64)

    def _user(self, i: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
        """User ``i``'s first ``rows`` rows (inputs, labels)."""
        g = rng.generator(self.seed, rng.STREAM_POPULATION, i)
        if self.iid:
            weight, bias = self.shared
            mean_x = np.zeros(self.dim)
        else:
            u, center = g.normal(0, self.alpha), g.normal(0, self.beta)
            mean_x = g.normal(center, 1, self.dim)
            weight, bias = g.normal(u, 1, (self.dim, self.num_classes)), g.normal(u, 1, self.num_classes)
        x = mean_x + g.standard_normal((rows, self.dim)) * self.std
        return x, np.argmax(x @ weight + bias, axis=1)

    def data(self, ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        ids = np.asarray(ids, dtype=np.int64)
        sizes = self.sizes(ids)
        parts = [self._user(i, s) for i, s in zip(ids.tolist(), sizes.tolist(), strict=True)]
        x, y = _rows(parts, self.dim)
        return x, y, sizes

    def test(self, ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The pooled test rows of ``ids``."""
        ids = np.asarray(ids, dtype=np.int64)
        total, train = self.total(ids), self.sizes(ids)
        parts = []
        for i, t, s in zip(ids.tolist(), total.tolist(), train.tolist(), strict=True):
            x, y = self._user(i, t)
            parts.append((x[s:], y[s:]))
        return _rows(parts, self.dim)


def _rows(parts: list[tuple[np.ndarray, np.ndarray]], dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not parts:
        return torch.zeros(0, dim), torch.zeros(0, dtype=torch.int64)
    x = np.concatenate([p[0] for p in parts]).astype(np.float32)
    y = np.concatenate([p[1] for p in parts]).astype(np.int64)
    return torch.from_numpy(x), torch.from_numpy(y)


class PartitionedClients(ClientSource):
    """``dataset``'s training rows partitioned on demand over ``n`` clients (see the module)."""

    def __init__(self, dataset: Dataset, n: int, scheme: str, samples: Distribution, seed: int,
                 alpha: float | None = None, max_samples: int | None = None) -> None:
        if scheme not in ("iid", "dirichlet"):
            raise ValueError(f"a lazy population partitions on demand with iid or dirichlet, not {scheme!r}")
        if scheme == "dirichlet" and (alpha is None or not alpha > 0 or not math.isfinite(alpha)):
            raise ValueError(f"dirichlet needs a finite alpha > 0, got {alpha!r}")
        self.dataset, self.n, self.scheme, self.alpha = dataset, int(n), scheme, alpha
        self.spec, self.seed, self.cap = samples, int(seed), max_samples
        self.input_shape, self.num_classes = dataset.input_shape, dataset.num_classes
        labels = dataset.y_train.numpy()
        self.by_class = [np.flatnonzero(labels == c) for c in range(self.num_classes)]
        self.present = np.array([len(rows) > 0 for rows in self.by_class])

    def sizes(self, ids: np.ndarray) -> np.ndarray:
        u = open_uniform(self.seed, rng.STREAM_POPULATION, np.asarray(ids, dtype=np.int64), 0)
        size = np.maximum(np.round(quantile(self.spec, u)), 1).astype(np.int64)
        return size if self.cap is None else np.minimum(size, self.cap)

    def rows(self, i: int, size: int) -> np.ndarray:
        """Client ``i``'s row indices into the training split."""
        g = rng.generator(self.seed, rng.STREAM_POPULATION, i)
        if self.scheme == "iid":
            return g.integers(0, len(self.dataset.y_train), size)
        p = g.dirichlet(np.full(self.num_classes, self.alpha)) * self.present
        p = p / p.sum() if p.sum() > 0 else self.present / self.present.sum()
        counts = g.multinomial(size, p)
        return np.concatenate([pool[g.integers(0, len(pool), k)]
                               for pool, k in zip(self.by_class, counts.tolist(), strict=True) if k])

    def data(self, ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        ids = np.asarray(ids, dtype=np.int64)
        sizes = self.sizes(ids)
        idx = [self.rows(i, s) for i, s in zip(ids.tolist(), sizes.tolist(), strict=True)]
        flat = torch.from_numpy(np.concatenate(idx)) if idx else torch.zeros(0, dtype=torch.int64)
        return self.dataset.x_train[flat], self.dataset.y_train[flat], sizes
