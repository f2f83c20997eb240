import math

import torch

from gossamer.aggregators import AGGREGATORS, aggregate

# Row 0 is the node's own model; distances to it: 0, 1, 2, 14.1.
X = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [10.0, 10.0]], dtype=torch.float64)


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_needs_losses_flag():
    assert AGGREGATORS.get("bristle").needs_losses is True
    others = [n for n in AGGREGATORS.names() if n != "bristle"]
    assert not any(getattr(AGGREGATORS.get(n), "needs_losses", False) for n in others)


def test_prioritizer_exact():
    expected = t([1 / 3, 2 / 3])  # uniform mean of the three closest rows
    assert torch.allclose(aggregate("bristle", X, keep=3), expected, atol=1e-15)
    assert torch.allclose(aggregate("bristle", X, fraction=0.75), expected, atol=1e-15)
    assert torch.allclose(aggregate("bristle", X, f=1), expected, atol=1e-15)  # keeps n - f
    assert torch.equal(aggregate("bristle", X, keep=1), X[0])
    assert torch.allclose(aggregate("bristle", X), X.mean(0))                  # f = 0 keeps all


def test_integrator_exact():
    # Kept losses 0, ln 2, ln 4 -> weights 1, 1/2, 1/4; (0.5 * (1, 0) + 0.25 * (0, 2)) / 1.75.
    losses = torch.tensor([0.0, math.log(2), math.log(4), 0.0])
    assert torch.allclose(aggregate("bristle", X, keep=3, losses=losses), t([2 / 7, 2 / 7]),
                          atol=1e-12)
    # Temperature 2 halves the exponents: weights 1, 1/sqrt(2), 1/2.
    w = torch.tensor([1.0, 2 ** -0.5, 0.5], dtype=torch.float64)
    expected = (w / w.sum()) @ X[:3]
    assert torch.allclose(aggregate("bristle", X, keep=3, losses=losses, temperature=2.0),
                          expected, atol=1e-12)
    # Losses only matter relative to each other.
    assert torch.allclose(aggregate("bristle", X, keep=3, losses=losses + 5.0), t([2 / 7, 2 / 7]),
                          atol=1e-12)


def test_integrator_uses_weights_and_drops_non_finite_losses():
    weights = torch.tensor([1.0, 3.0, 0.0, 1.0])
    assert torch.allclose(aggregate("bristle", X, weights, keep=3), t([0.75, 0.0]), atol=1e-15)
    losses = torch.tensor([0.0, float("nan"), 0.0, 0.0])
    assert torch.allclose(aggregate("bristle", X, keep=3, losses=losses), t([0.0, 1.0]),
                          atol=1e-15)
    every = torch.full((4,), float("inf"))  # nothing scores: fall back to the weights
    assert torch.allclose(aggregate("bristle", X, keep=3, losses=every), t([1 / 3, 2 / 3]),
                          atol=1e-15)


def test_explicit_center():
    center = t([9.0, 9.0])
    assert torch.equal(aggregate("bristle", X, keep=1, center=center), X[3])
    assert torch.allclose(aggregate("bristle", X, keep=2, center=center), t([5.0, 6.0]))


def test_ignores_far_outliers_when_keeping_fewer_than_honest():
    # 8 honest models (own first) and 4 Byzantine ones far away: keeping 6 < 8 never takes one,
    # whatever the Byzantine models are, and their (low) losses cannot bring them back.
    g = torch.Generator().manual_seed(0)
    honest = torch.randn(8, 5, generator=g, dtype=torch.float64) * 0.1
    dist = (honest - honest[0]).norm(dim=1)
    closest = torch.argsort(dist)[:6]
    for scale in (1e2, 1e6):
        byz = scale * torch.randn(4, 5, generator=g, dtype=torch.float64)
        x = torch.cat([honest, byz])
        losses = torch.cat([torch.ones(8), torch.zeros(4)])   # attackers claim perfect scores
        assert torch.allclose(aggregate("bristle", x, keep=6), honest[closest].mean(0), atol=1e-12)
        out = aggregate("bristle", x, keep=6, losses=losses)
        assert torch.allclose(out, honest[closest].mean(0), atol=1e-12)


def test_losses_downweight_close_bad_models():
    # A Byzantine model inside the kept set is down-weighted by its local loss.
    x = t([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [0.2, 0.2]])
    losses = torch.tensor([0.5, 0.5, 0.5, 20.0])
    out = aggregate("bristle", x, losses=losses)
    assert torch.allclose(out, x[:3].mean(0), atol=1e-8)
