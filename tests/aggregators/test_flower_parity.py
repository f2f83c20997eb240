"""Gossamer's rules against Flower's (``flwr.server.strategy.aggregate``) on the same updates.

Flower's functions take ``results = [(layers, num_examples), ...]``; each update here is two
layers (``[3, 4]`` and ``[8]``, P = 20), and Flower's flattened result must equal Gossamer's
on the stacked flat rows to 1e-6. Parameters are mapped so that the same rule is compared:

- median: both take the mean of the two middle values for an even count; both ignore weights.
- trimmed mean: Flower's ``proportiontocut`` cuts ``int(p * n)`` values at each end, which
  is Gossamer's ``beta`` (and ``f = int(p * n)``); both ignore weights.
- Krum: Flower's ``aggregate_krum(num_malicious=f, to_keep=0)`` sums the distances to the
  ``max(1, n - f - 2)`` nearest others; Gossamer uses ``n - f - 2`` and requires
  ``n > 2f + 2``, where the two agree (Flower runs below that bound, Gossamer refuses).
- Multi-Krum: Flower's ``to_keep = m > 0``; it averages the selection weighted by
  ``num_examples``, which are Gossamer's ``weights``. Gossamer requires ``1 <= m <= n - f``.
- Bulyan: Flower's inner rule is an argument; only ``aggregate_krum`` (with ``to_keep=0``) is
  accepted, which is Gossamer's fixed choice. Flower mutates ``results``: pass a copy.
- Exact ties in scores: Flower takes the first index, Gossamer the row with the smallest
  position-independent key (so its rules do not depend on the order of rows). Such ties are
  not rare: when Krum sums over one neighbour (Bulyan's last selection rounds, Krum with
  n = 3), two mutual nearest neighbours score exactly the same. The rows are therefore given
  to both libraries sorted by Gossamer's key, where "first index" and "smallest key" agree.
  In Bulyan's last step Flower's ``argpartition`` leaves ties in distance to the median
  unspecified; continuous random data has none.
"""

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")
from flwr.server.strategy import aggregate as fl  # noqa: E402

from gossamer.aggregators import aggregate  # noqa: E402
from gossamer.aggregators.base import rank, tie_keys  # noqa: E402

SHAPES = [(3, 4), (8,)]
P = sum(int(np.prod(s)) for s in SHAPES)
SEEDS = [0, 1, 2, 3, 4]


def _data(seed: int, n: int):
    rng = np.random.default_rng(seed)
    rows = rng.normal(size=(n, P)) * rng.uniform(0.5, 2.0, size=(n, 1))
    rows[: n // 5] += rng.normal(scale=5.0, size=(n // 5, P))      # a few outliers
    x = torch.as_tensor(rows)[None]
    rows = rows[rank(torch.zeros(1, n, dtype=x.dtype), tie_keys(x))[0].numpy()]  # tie order
    examples = rng.integers(1, 100, size=n)
    results = []
    for row, k in zip(rows, examples, strict=True):
        layers, at = [], 0
        for s in SHAPES:
            size = int(np.prod(s))
            layers.append(row[at : at + size].reshape(s).copy())
            at += size
        results.append((layers, int(k)))
    return rows, examples, results


def _flat(layers) -> np.ndarray:
    return np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in layers])


def _ours(name, rows, weights=None, **params) -> np.ndarray:
    w = None if weights is None else torch.as_tensor(weights, dtype=torch.float64)
    return aggregate(name, torch.as_tensor(rows), w, **params).numpy()


def _close(a, b):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n", [10, 11, 15])
def test_median(seed, n):
    rows, _, results = _data(seed, n)
    _close(_ours("median", rows), _flat(fl.aggregate_median(results)))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("n", "cut"), [(10, 0.1), (10, 0.25), (13, 0.2), (13, 0.45), (15, 0.0)])
def test_trimmed_mean(seed, n, cut):
    rows, _, results = _data(seed, n)
    theirs = _flat(fl.aggregate_trimmed_avg(results, proportiontocut=cut))
    _close(_ours("trimmed_mean", rows, beta=cut), theirs)
    _close(_ours("trimmed_mean", rows, f=int(cut * n)), theirs)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("n", "f"), [(3, 0), (10, 1), (10, 3), (13, 2), (15, 6)])
def test_krum(seed, n, f):
    rows, _, results = _data(seed, n)
    theirs = _flat(fl.aggregate_krum(results, num_malicious=f, to_keep=0))
    _close(_ours("krum", rows, f=f), theirs)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("n", "f", "m"), [(10, 1, 3), (10, 3, 7), (13, 2, 11), (15, 4, 1)])
def test_multi_krum(seed, n, f, m):
    rows, examples, results = _data(seed, n)
    theirs = _flat(fl.aggregate_krum(results, num_malicious=f, to_keep=m))
    _close(_ours("multi_krum", rows, examples, f=f, m=m), theirs)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("n", "f"), [(10, 0), (10, 1), (11, 2), (15, 3)])
def test_bulyan(seed, n, f):
    rows, _, results = _data(seed, n)
    theirs = _flat(fl.aggregate_bulyan(list(results), num_malicious=f,
                                       aggregation_rule=fl.aggregate_krum, to_keep=0))
    _close(_ours("bulyan", rows, f=f), theirs)


def test_batched_matches_flower_per_group():
    """A batch of groups (decentralized receivers) equals Flower on each group."""
    data = [_data(seed, 11) for seed in SEEDS]
    stacked = torch.as_tensor(np.stack([rows for rows, _, _ in data]))
    ours = aggregate("bulyan", stacked, f=2).numpy()
    for i, (_, _, results) in enumerate(data):
        theirs = fl.aggregate_bulyan(list(results), num_malicious=2,
                                     aggregation_rule=fl.aggregate_krum, to_keep=0)
        _close(ours[i], _flat(theirs))
