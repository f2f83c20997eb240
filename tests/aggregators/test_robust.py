import pytest
import torch

from gossamer.aggregators import AGGREGATORS, aggregate

ALL = AGGREGATORS.names()
ROBUST = [n for n in ALL if n != "mean"]
# Rules that read row 0 as the node's own model: only the other rows may be permuted.
OWN_ROW_FIRST = {"bristle"}
# Params per rule for the contract/robustness tests (n = 12 rows, f = 2 Byzantine).
PARAMS = {n: {"f": 2} for n in ALL}
PARAMS["centered_clipping"] = {"f": 2, "tau": 1.0}


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_registered():
    assert set(ALL) == {
        "mean",
        "median",
        "trimmed_mean",
        "krum",
        "multi_krum",
        "bulyan",
        "geometric_median",
        "centered_clipping",
        "flag",
        "bristle",
    }


def test_mean_weighted():
    x = t([[0.0, 0.0], [4.0, 8.0]])
    assert torch.equal(aggregate("mean", x), t([2.0, 4.0]))
    assert torch.allclose(aggregate("mean", x, torch.tensor([3.0, 1.0])), t([1.0, 2.0]))


def test_median_even_and_odd():
    assert aggregate("median", t([[1], [5], [3], [100]])).item() == 4.0
    assert aggregate("median", t([[1], [5], [3]])).item() == 3.0


def test_trimmed_mean():
    x = t([[1, 100], [2, 3], [3, 1], [100, 2]])
    assert torch.equal(aggregate("trimmed_mean", x, f=1), t([2.5, 2.5]))
    assert torch.equal(aggregate("trimmed_mean", x, beta=0.25), t([2.5, 2.5]))
    assert torch.equal(aggregate("trimmed_mean", x, f=0), x.mean(0))


def _clustered():
    inliers = t([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    outliers = t([[50.0, 50.0], [-60.0, 40.0]])
    return inliers, torch.cat([inliers, outliers])


def test_krum_picks_inlier():
    inliers, x = _clustered()  # n = 6 > 2f + 2 = 4
    out = aggregate("krum", x, f=1)
    assert any(torch.equal(out, r) for r in inliers)


def test_krum_picks_central_point():
    x = t([[0.0], [1.0], [2.0], [3.0], [100.0], [-100.0]])
    assert aggregate("krum", x, f=1).item() in (1.0, 2.0)


def test_multi_krum_averages_inliers():
    inliers, x = _clustered()
    assert torch.allclose(aggregate("multi_krum", x, f=1, m=4), inliers.mean(0))
    # default m = n - f = 5 selects the 4 inliers plus one outlier
    assert aggregate("multi_krum", x, f=1).shape == (2,)


def test_bulyan_small():
    x = t([[0.0], [1.0], [2.0], [3.0], [4.0], [1e6], [-1e6]])  # n = 7 = 4f + 3
    assert 0.0 <= aggregate("bulyan", x, f=1).item() <= 4.0


def test_geometric_median_collinear():
    x = t([[0.0, 0.0], [1.0, 1.0], [10.0, 10.0]])
    assert torch.allclose(aggregate("geometric_median", x), t([1.0, 1.0]), atol=1e-4)


def test_geometric_median_two_points_on_segment():
    a, b = t([0.0, 0.0]), t([3.0, 4.0])
    z = aggregate("geometric_median", torch.stack([a, b]), torch.tensor([1.0, 2.0]))
    assert torch.isclose((z - a).norm() + (b - z).norm(), (b - a).norm(), atol=1e-9)


def test_centered_clipping_large_tau_is_mean():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 5, generator=g, dtype=torch.float64)
    w = torch.rand(7, generator=g, dtype=torch.float64)
    assert torch.allclose(aggregate("centered_clipping", x, w, tau=1e9), aggregate("mean", x, w))


def test_centered_clipping_center_and_iters():
    x = t([[0.0], [0.0], [100.0]])
    out = aggregate("centered_clipping", x, tau=1.0, iters=3, center=t([0.0]))
    assert 0.0 < out.item() < 1.1


@pytest.mark.parametrize("name", ALL)
def test_contract(name):
    g = torch.Generator().manual_seed(1)
    p = PARAMS[name]
    row = torch.randn(6, generator=g)
    same = row.repeat(12, 1)
    assert torch.allclose(aggregate(name, same, **p), row, atol=1e-6)

    x = torch.randn(12, 6, generator=g)
    w = torch.rand(12, generator=g) + 0.5
    out = aggregate(name, x, w, **p)
    assert out.shape == (6,) and out.dtype == torch.float32
    assert torch.equal(out, aggregate(name, x, w, **p))
    perm = torch.randperm(12, generator=g)
    if name in OWN_ROW_FIRST:
        perm = torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(11, generator=g)])
    assert torch.allclose(aggregate(name, x[perm], w[perm], **p), out, atol=1e-5)
    assert torch.allclose(aggregate(name, x, **p), aggregate(name, x, torch.ones(12), **p))


@pytest.mark.parametrize("name", ALL)
def test_robustness(name):
    g = torch.Generator().manual_seed(2)
    x = torch.cat([0.01 * torch.randn(10, 4, generator=g), torch.full((2, 4), 1e6)])
    norm = aggregate(name, x, **PARAMS[name]).norm().item()
    if name == "mean":
        assert norm > 1e5
    else:
        assert norm < 1.0


@pytest.mark.parametrize(
    ("name", "n", "params", "word"),
    [
        ("trimmed_mean", 4, {"f": 2}, "f"),
        ("trimmed_mean", 4, {"f": 1, "beta": 0.2}, "beta"),
        ("trimmed_mean", 4, {"beta": 0.6}, "beta"),
        ("krum", 4, {"f": 1}, "f"),
        ("multi_krum", 6, {"f": 1, "m": 7}, "m"),
        ("multi_krum", 6, {"f": -1}, "f"),
        ("bulyan", 6, {"f": 1}, "f"),
        ("geometric_median", 3, {"eps": 0.0}, "eps"),
        ("centered_clipping", 3, {"tau": 0.0}, "tau"),
    ],
)
def test_errors(name, n, params, word):
    with pytest.raises(ValueError, match=word) as e:
        aggregate(name, torch.zeros(n, 2), **params)
    assert "\n" not in str(e.value)


def test_bad_shapes():
    with pytest.raises(ValueError, match="updates"):
        aggregate("mean", torch.zeros(3))
    with pytest.raises(ValueError, match="weights"):
        aggregate("mean", torch.zeros(3, 2), torch.ones(2))
    with pytest.raises(KeyError):
        aggregate("nope", torch.zeros(3, 2))
