import itertools

import numpy as np
import pytest
import torch

from gossamer.aggregators import AGGREGATORS, aggregate, check_aggregator


@pytest.mark.parametrize(
    ("name", "n", "params"),
    [
        ("mean", 1, {}),
        ("median", 2, {"f": 5}),                 # ignores f: runs on any n
        ("trimmed_mean", 5, {"f": 2}),
        ("trimmed_mean", 4, {"beta": 0.49}),     # floor(0.49 * 4) = 1 < 4 / 2
        ("krum", 7, {"f": 2}),
        ("krum", 3, {}),
        ("multi_krum", 7, {"f": 2, "m": 5}),
        ("bulyan", 11, {"f": 2}),
        ("bulyan", 3, {}),
        ("geometric_median", 1, {"iters": 0}),
        ("centered_clipping", 2, {"tau": 0.1, "iters": 3}),
        ("flag", 2, {"m": 5, "lam": 1.0}),       # m above the rank is capped, not an error
        ("bristle", 3, {"f": 2}),
        ("bristle", 3, {"keep": 3, "temperature": 0.5}),
        ("bristle", 3, {"fraction": 0.1}),       # keeps at least one
        ("krum", np.int64(7), {"f": np.int64(2)}),
    ],
)
def test_accepts(name, n, params):
    check_aggregator(name, n, **params)


@pytest.mark.parametrize(
    ("name", "n", "params", "message"),
    [
        ("krum", 6, {"f": 2}, "krum requires n > 2f + 2; got n=6, f=2"),
        ("krum", 2, {}, "krum requires n > 2f + 2; got n=2, f=0"),
        ("multi_krum", 6, {"f": 2}, "multi_krum requires n > 2f + 2"),
        ("multi_krum", 7, {"f": 2, "m": 6}, "multi_krum requires 1 <= m <= n - f; got n=7, f=2, m=6"),
        ("multi_krum", 7, {"f": 2, "m": 0}, "m must be an int >= 1"),
        ("bulyan", 10, {"f": 2}, "bulyan requires n >= 4f + 3; got n=10, f=2"),
        ("trimmed_mean", 4, {"f": 2}, "trimmed_mean requires n > 2f; got n=4, f=2"),
        ("trimmed_mean", 4, {"beta": 0.5}, "beta must be in [0, 0.5)"),
        ("trimmed_mean", 4, {"f": 1, "beta": 0.2}, "f or beta, not both"),
        ("bristle", 3, {"f": 3}, "bristle requires f < n"),
        ("bristle", 3, {"keep": 4}, "bristle requires keep <= n; got n=3, keep=4"),
        ("bristle", 3, {"keep": 2, "fraction": 0.5}, "keep or fraction, not both"),
        ("bristle", 3, {"fraction": 1.5}, "fraction must be in (0, 1]"),
        ("bristle", 3, {"temperature": 0}, "temperature must be a finite number > 0"),
        ("flag", 3, {"m": 0}, "m must be an int >= 1"),
        ("flag", 3, {"lam": -1.0}, "lam must be a finite number >= 0"),
        ("geometric_median", 3, {"eps": 0.0}, "eps must be a finite number > 0"),
        ("centered_clipping", 3, {"tau": float("inf")}, "tau must be a finite number > 0"),
        ("median", 3, {"f": -1}, "f must be an int >= 0"),
        ("median", 3, {"f": True}, "f must be an int"),
        ("krum", 7, {"f": 1.5}, "f must be an int"),
        ("mean", 0, {}, "n (number of inputs) must be an int >= 1"),
        ("krum", 7, {"f": 1, "beta": 0.1}, "aggregator 'krum' has no parameter 'beta'; it takes f"),
        ("flag", 7, {"lambda": 1.0}, "has no parameter 'lambda'; it takes f, m, lam, iters"),
        ("nope", 7, {}, "unknown aggregator 'nope'; known: "),
    ],
)
def test_refuses_with_one_line(name, n, params, message):
    with pytest.raises(ValueError) as e:
        check_aggregator(name, n, **params)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


# A grid of sizes and parameters: the check must refuse exactly what the rule refuses at run time.
GRID = {
    "trimmed_mean": [{"f": f} for f in range(4)] + [{"beta": b} for b in (0.0, 0.2, 0.34, 0.49)],
    "krum": [{"f": f} for f in range(4)],
    "multi_krum": [{"f": f, "m": m} for f in range(3) for m in (1, 3, 5)],
    "bulyan": [{"f": f} for f in range(3)],
    "bristle": [{"f": f} for f in range(4)] + [{"keep": k} for k in (1, 4, 8)],
    "flag": [{"m": m} for m in (1, 3, 9)],
}


@pytest.mark.parametrize(("name", "n"), list(itertools.product(sorted(GRID), range(1, 11))))
def test_check_agrees_with_rule(name, n):
    x = torch.randn(n, 3, generator=torch.Generator().manual_seed(n))
    for params in GRID[name]:
        try:
            check_aggregator(name, n, **params)
            ok = True
        except ValueError:
            ok = False
        try:
            aggregate(name, x, **params)
            ran = True
        except ValueError:
            ran = False
        assert ok == ran, (name, n, params)


def test_every_rule_has_a_check():
    for name in AGGREGATORS.names():
        assert callable(AGGREGATORS.get(name).check)
        check_aggregator(name, 20)  # defaults run on a large enough group
