import math

import torch

from gossamer.aggregators import aggregate


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_flag_median_line_exact():
    # Directions e1, e1, e2. For Y = (cos a, sin a) the objective is 2|sin a| + |cos a|,
    # smallest at a = 0 (value 1; a = pi/2 gives 2). Norms 1, 2, 1 are clipped to the median
    # norm 1, so the output is the projection of (e1 + e1 + e2) / 3 on e1.
    out = aggregate("flag", t([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]]))
    assert torch.allclose(out, t([2 / 3, 0.0]), atol=1e-12)


def test_flag_weights_exact():
    # Weights 3:1 on e1 and e2 (omega = 1.5, 0.5): objective 1.5|sin a| + 0.5|cos a|, smallest
    # at a = 0; the output projects (3 e1 + e2) / 4 on e1.
    out = aggregate("flag", t([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([3.0, 1.0]))
    assert torch.allclose(out, t([0.75, 0.0]), atol=1e-12)


def test_flag_pairwise_term_exact():
    # Rows e1, e1, e2 and m = 1. Pairs: (e1, e1) has no direction; the two (e1, e2) pairs have
    # direction (e1 - e2) / sqrt(2), each pair weight 1/3. Objective for Y = (cos a, sin a):
    #   2|sin a| + |cos a| + lam * (2/3) * |cos a + sin a| / sqrt(2)
    # whose minima sit at a = 0 (1 + 0.471 lam) or a = -pi/4 (3 / sqrt(2) = 2.121).
    x = t([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert torch.allclose(aggregate("flag", x, lam=1.0), t([2 / 3, 0.0]), atol=1e-5)
    # lam = 10: Y = (1, -1) / sqrt(2); the projection of (2 e1 + e2) / 3 on it is (1, -1) / 6.
    assert torch.allclose(aggregate("flag", x, lam=10.0), t([1 / 6, -1 / 6]), atol=1e-5)


def test_flag_full_rank_is_mean_of_clipped_rows():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, generator=g, dtype=torch.float64)
    w = torch.rand(6, generator=g, dtype=torch.float64) + 0.1
    norm = x.norm(dim=1)
    median_norm = norm.sort().values[2:4].mean()  # six rows: mean of the two middle norms
    clipped = x * (torch.minimum(norm, median_norm) / norm)[:, None]
    expected = (w / w.sum()) @ clipped
    assert torch.allclose(aggregate("flag", x, w, m=3), expected, atol=1e-10)
    assert torch.allclose(aggregate("flag", x, w, m=50), expected, atol=1e-10)  # m capped


def test_flag_positively_homogeneous():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 5, generator=g, dtype=torch.float64)
    assert torch.allclose(aggregate("flag", 7.0 * x, m=2), 7.0 * aggregate("flag", x, m=2),
                          atol=1e-9)


def test_flag_majority_direction_wins_against_huge_rows():
    # 7 honest rows near direction u, 3 Byzantine rows of norm 1e6 along an orthogonal
    # direction: the line is u's, and the output's norm is at most the median norm.
    g = torch.Generator().manual_seed(2)
    u = torch.tensor([1.0, 2.0, 0.0, -1.0], dtype=torch.float64) / math.sqrt(6)
    honest = u * (1 + 0.1 * torch.rand(7, 1, generator=g, dtype=torch.float64)) \
        + 0.01 * torch.randn(7, 4, generator=g, dtype=torch.float64)
    byz = torch.tensor([[2.0, -1.0, 0.0, 0.0]], dtype=torch.float64).repeat(3, 1) * 1e6
    out = aggregate("flag", torch.cat([honest, byz]))
    assert out.norm() <= honest.norm(dim=1).max()
    cos = (out @ u) / out.norm()
    assert cos > 0.999


def test_flag_zero_rows():
    assert torch.equal(aggregate("flag", torch.zeros(4, 3)), torch.zeros(3))
    out = aggregate("flag", t([[0.0, 0.0], [1.0, 0.0], [1.0, 0.0]]))
    assert torch.allclose(out, t([2 / 3, 0.0]), atol=1e-12)
