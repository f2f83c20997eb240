"""Every rule on ``[G, B, P]`` equals ``G`` separate calls on ``[B, P]`` (contract over all rules)."""

import pytest
import torch

from gossamer.aggregators import AGGREGATORS, aggregate

G, B, P = 5, 12, 7

# Several parameter sets per rule (B = 12 rows), covering each rule's options.
CASES = {
    "mean": [{}],
    "median": [{}, {"f": 3}],
    "trimmed_mean": [{"f": 2}, {"beta": 0.3}],
    "krum": [{"f": 2}, {"f": 4}],
    "multi_krum": [{"f": 2}, {"f": 3, "m": 4}],
    "bulyan": [{"f": 2}, {"f": 0}],
    "geometric_median": [{}, {"iters": 3}, {"eps": 1e-3, "tol": 0.0}],
    "centered_clipping": [{"tau": 1.0}, {"tau": 0.3, "iters": 4}],
    "flag": [{}, {"m": 2, "lam": 0.5}, {"m": 3, "iters": 2}],
    "bristle": [{"f": 2}, {"keep": 4}, {"fraction": 0.5, "temperature": 0.2}],
}


def test_cases_cover_every_rule():
    assert set(CASES) == set(AGGREGATORS.names())


def _groups(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Groups at different scales and offsets, so iterative rules stop at different steps."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([0.01, 1.0, 30.0, 1.0, 5.0])[:, None, None]
    x = torch.randn(G, B, P, generator=g) * scale + torch.randn(G, 1, P, generator=g)
    x[3, 9:] += 50.0  # outliers in one group only
    w = torch.rand(G, B, generator=g) + 0.2
    return x, w


def _params(rows):
    return [pytest.param(name, p, id=f"{name}-{i}") for name in rows for i, p in enumerate(rows[name])]


@pytest.mark.parametrize(("name", "params"), _params(CASES))
@pytest.mark.parametrize("weighted", [False, True])
def test_batch_equals_groups(name, params, weighted):
    x, w = _groups(3)
    ws = w if weighted else None
    out = aggregate(name, x, ws, **params)
    assert out.shape == (G, P) and out.dtype == x.dtype
    for i in range(G):
        one = aggregate(name, x[i], None if ws is None else ws[i], **params)
        assert one.shape == (P,)
        assert torch.allclose(out[i], one, atol=1e-6, rtol=1e-6), (name, i)


@pytest.mark.parametrize("name", AGGREGATORS.names())
def test_batch_of_one_and_consensus(name):
    x, w = _groups(4)
    p = CASES[name][0]
    assert torch.allclose(aggregate(name, x[:1], w[:1], **p)[0], aggregate(name, x[0], w[0], **p),
                          atol=1e-6)
    same = x[:, :1].expand(G, B, P).contiguous()   # every group holds copies of one row
    assert torch.allclose(aggregate(name, same, w, **p), x[:, 0], atol=1e-5)


def test_krum_batch_returns_exact_rows():
    x, _ = _groups(5)
    out = aggregate("krum", x, f=2)
    for i in range(G):
        assert any(torch.equal(out[i], r) for r in x[i])


def test_centered_clipping_center_per_group():
    x, w = _groups(6)
    center = x[:, 0] + 0.5
    out = aggregate("centered_clipping", x, w, tau=0.5, iters=2, center=center)
    for i in range(G):
        one = aggregate("centered_clipping", x[i], w[i], tau=0.5, iters=2, center=center[i])
        assert torch.allclose(out[i], one, atol=1e-6)
    shared = aggregate("centered_clipping", x, w, tau=0.5, center=center[0])  # [P] broadcasts
    assert torch.allclose(shared[2], aggregate("centered_clipping", x[2], w[2], tau=0.5,
                                               center=center[0]), atol=1e-6)


def test_bristle_center_and_losses_per_group():
    x, w = _groups(7)
    g = torch.Generator().manual_seed(8)
    losses = torch.rand(G, B, generator=g) * 3
    center = x[:, 2]
    out = aggregate("bristle", x, w, keep=5, center=center, losses=losses)
    for i in range(G):
        one = aggregate("bristle", x[i], w[i], keep=5, center=center[i], losses=losses[i])
        assert torch.allclose(out[i], one, atol=1e-6)


@pytest.mark.parametrize(
    ("name", "kwargs", "word"),
    [
        ("mean", {"weights": torch.ones(B)}, "weights"),            # [B] weights for a batch
        ("centered_clipping", {"center": torch.zeros(G + 1, P)}, "center"),
        ("bristle", {"center": torch.zeros(2, P)}, "center"),
        ("bristle", {"losses": torch.zeros(B)}, "losses"),
        ("mean", {"weights": torch.zeros(G, B)}, "weights"),
    ],
)
def test_batched_shape_errors(name, kwargs, word):
    x, _ = _groups(9)
    weights = kwargs.pop("weights", None)
    with pytest.raises(ValueError, match=word) as e:
        aggregate(name, x, weights, **kwargs)
    assert "\n" not in str(e.value)
