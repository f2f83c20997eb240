import math

import pytest
import scipy.stats
import torch

from gossamer.attacks import (
    ATTACKS,
    DATA_ATTACKS,
    MODEL_ATTACKS,
    alie_z,
    apply_attack,
    check_attack_params,
    flip_labels,
)

DETERMINISTIC = sorted(MODEL_ATTACKS - {"gaussian"})
SQRT3 = math.sqrt(3.0)


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def mask(bits):
    return torch.tensor(bits, dtype=torch.bool)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# Three honest rows and one attacker (row 3) whose honest update is [4, 4].
# Honest mean [2, 1]; sample std (ddof = 1) [1, sqrt(3)].
X = t([[1.0, 0.0], [3.0, 0.0], [2.0, 3.0], [4.0, 4.0]])
BYZ = mask([False, False, False, True])


def attacked_row(name, **params):
    out = apply_attack(name, X, BYZ, generator=gen(), **params)
    assert torch.equal(out[:3], X[:3])
    return out[3]


def random_groups(seed=0, g=4, b=7, p=5):
    """Groups with 0, 1, 3 and all-but-one Byzantine rows."""
    x = torch.randn(g, b, p, generator=gen(seed), dtype=torch.float64)
    byz = torch.zeros(g, b, dtype=torch.bool)
    byz[1, 2] = True
    byz[2, [0, 3, 6]] = True
    byz[3, 1:] = True
    return x, byz


# ---------------------------------------------------------------- registry and contract


def test_registered_names():
    assert set(ATTACKS.names()) == {
        "free_rider",
        "label_noise",
        "sign_flip",
        "scaling",
        "gaussian",
        "alie",
        "ipm",
        "min_max",
        "min_sum",
        "label_flip",
    }
    assert DATA_ATTACKS == {"label_flip", "label_noise"}
    assert MODEL_ATTACKS == set(ATTACKS.names()) - {"label_flip", "label_noise"}


@pytest.mark.parametrize("name", sorted(MODEL_ATTACKS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_contract(name, dtype):
    x, byz = random_groups()
    x = x.to(dtype)
    out = apply_attack(name, x, byz, generator=gen(3))
    assert out.shape == x.shape and out.dtype == dtype
    assert torch.isfinite(out).all()
    assert torch.equal(out[~byz], x[~byz])  # honest rows bit for bit
    assert not torch.equal(out[byz], x[byz])  # something was sent instead
    assert torch.equal(out, apply_attack(name, x, byz, generator=gen(3)))  # deterministic
    assert x.data_ptr() != out.data_ptr()
    # [B, P] is one group and keeps its shape
    single = apply_attack(name, x[2], byz[2], generator=gen(3))
    assert single.shape == x[2].shape
    assert torch.equal(single, apply_attack(name, x[2:3], byz[2:3], generator=gen(3))[0])
    # no attacker: the input comes back unchanged
    none = torch.zeros_like(byz)
    assert torch.equal(apply_attack(name, x, none, generator=gen(3)), x)


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_batched_equals_per_group(name):
    x, byz = random_groups(seed=1)
    batched = apply_attack(name, x, byz)
    for g in range(x.shape[0]):
        assert torch.allclose(batched[g], apply_attack(name, x[g], byz[g]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["alie", "ipm", "min_max", "min_sum"])
def test_statistics_ignore_the_attackers_own_updates(name):
    moved = X.clone()
    moved[3] = t([-100.0, 50.0])
    assert torch.equal(apply_attack(name, X, BYZ)[3], apply_attack(name, moved, BYZ)[3])


@pytest.mark.parametrize("name", ["alie", "min_max", "min_sum"])
@pytest.mark.parametrize("perturbation", ["std", "unit", "sign"])
def test_consensus_is_sent_back(name, perturbation):
    """When every honest row is the same vector, the statistical attacks cannot hide any
    deviation: ALIE's std is 0 and the distance bounds are 0."""
    x = t([[1.0, -2.0, 0.5]] * 3 + [[9.0, 9.0, 9.0]])
    params = {} if name == "alie" else {"perturbation": perturbation}
    out = apply_attack(name, x, BYZ, **params)
    assert torch.allclose(out[3], x[0], atol=1e-12)


# ---------------------------------------------------------------- exact cases


def test_sign_flip_and_scaling():
    assert torch.equal(attacked_row("sign_flip"), t([-4.0, -4.0]))
    assert torch.equal(attacked_row("sign_flip", scale=2.5), t([-10.0, -10.0]))
    assert torch.equal(attacked_row("scaling"), t([40.0, 40.0]))
    assert torch.equal(attacked_row("scaling", scale=0.5), t([2.0, 2.0]))


def test_sign_flip_uses_each_attackers_own_row():
    x = t([[1.0, 2.0], [3.0, -1.0], [5.0, 5.0]])
    out = apply_attack("sign_flip", x, mask([True, True, False]))
    assert torch.equal(out, t([[-1.0, -2.0], [-3.0, 1.0], [5.0, 5.0]]))


def test_ipm():
    assert torch.allclose(attacked_row("ipm"), t([-0.2, -0.1]))
    assert torch.allclose(attacked_row("ipm", epsilon=2.0), t([-4.0, -2.0]))


def test_alie_explicit_z():
    assert torch.allclose(attacked_row("alie", z=1.0), t([1.0, 1.0 - SQRT3]))
    assert torch.allclose(attacked_row("alie", z=-2.0), t([4.0, 1.0 + 2 * SQRT3]))


def test_alie_z_formula():
    # n = 50, f = 10: s = floor(26) - 10 = 16, z = Phi^-1(34 / 50)
    assert math.isclose(alie_z(50, 10).item(), scipy.stats.norm.ppf(34 / 50), rel_tol=1e-12)
    # n = 4, f = 1: s = 2, Phi^-1(1/2) = 0, so the default ALIE row is the honest mean
    assert alie_z(4, 1).item() == 0.0
    assert torch.allclose(attacked_row("alie"), t([2.0, 1.0]))
    # attackers hold a majority (s <= 0): s is taken as 1
    assert math.isclose(alie_z(4, 3).item(), scipy.stats.norm.ppf(3 / 4), rel_tol=1e-12)


def test_alie_default_z_per_group():
    """Groups with different numbers of attackers get their own z (n = 5: f = 1 -> s = 2,
    f = 2 -> s = 1)."""
    x = torch.randn(2, 5, 3, generator=gen(4), dtype=torch.float64)
    byz = mask([[True, False, False, False, False], [True, True, False, False, False]])
    out = apply_attack("alie", x, byz)
    for g, (f, prob) in enumerate([(1, 3 / 5), (2, 4 / 5)]):
        honest = x[g, f:]
        expect = honest.mean(0) - scipy.stats.norm.ppf(prob) * honest.std(0)
        assert torch.allclose(out[g, :f], expect.expand(f, 3), rtol=1e-12)


def test_no_honest_rows_uses_all_rows():
    x = t([[1.0, 0.0], [3.0, 4.0]])
    out = apply_attack("ipm", x, mask([True, True]), epsilon=1.0)
    assert torch.allclose(out, t([[-2.0, -2.0], [-2.0, -2.0]]))


def test_one_honest_row_has_zero_std():
    x = t([[1.0, 2.0], [7.0, 7.0], [8.0, 8.0]])
    out = apply_attack("alie", x, mask([False, True, True]), z=3.0)
    assert torch.equal(out[1:], t([[1.0, 2.0], [1.0, 2.0]]))


# 1-D: honest 0, 1, 4 (mean 5/3), "unit" direction p = -1, so m = 5/3 - gamma.
# Min-Max: the farthest honest row is 4: 7/3 + gamma <= 4  ->  gamma = 5/3, m = 0.
# Min-Sum: sum (m - g_i)^2 = 26/3 + 3 gamma^2 <= max_i S_i = 25  ->  gamma = 7/3, m = -2/3.
X1 = t([[0.0], [1.0], [4.0], [10.0]])


@pytest.mark.parametrize("name, expect", [("min_max", 0.0), ("min_sum", -2.0 / 3.0)])
def test_min_max_min_sum_exact(name, expect):
    out = apply_attack(name, X1, BYZ, perturbation="unit", tau=1e-9)
    assert torch.equal(out[:3], X1[:3])
    assert out[3].item() >= expect - 1e-12  # gamma never exceeds the largest feasible one
    assert out[3].item() == pytest.approx(expect, abs=2e-9)


# ---------------------------------------------------------------- Min-Max / Min-Sum search


def _honest_stats(x, byz):
    h = x[~byz]
    mean = h.mean(0)
    return h, mean


def _direction(mean, h, perturbation):
    if perturbation == "std":
        return -h.std(0)
    if perturbation == "unit":
        return -mean / mean.norm()
    return -torch.sign(mean)


def _violation(name, m, h):
    """Constraint left side minus right side, computed directly (>0: violated)."""
    if name == "min_max":
        return torch.cdist(m[None], h).max() - torch.cdist(h, h).max()
    return (torch.cdist(m[None], h) ** 2).sum() - (torch.cdist(h, h) ** 2).sum(1).max()


def _largest_gamma(name, h, mean, p):
    """Largest feasible gamma in closed form (both constraints are quadratics in gamma)."""
    c = h - mean
    a, b, pp = (c * c).sum(1), c @ p, p @ p
    if name == "min_max":
        bound = (torch.cdist(h, h) ** 2).max()
        return ((b + (b * b - pp * (a - bound)).sqrt()) / pp).min()
    bound = (torch.cdist(h, h) ** 2).sum(1).max()
    n = h.shape[0]
    return (b.sum() + (b.sum() ** 2 - n * pp * (a.sum() - bound)).sqrt()) / (n * pp)


@pytest.mark.parametrize("name", ["min_max", "min_sum"])
@pytest.mark.parametrize("perturbation", ["std", "unit", "sign"])
@pytest.mark.parametrize("tau", [1e-5, 1e-2])
def test_search_finds_the_largest_feasible_gamma(name, perturbation, tau):
    x, byz = random_groups(seed=5, p=6)
    out = apply_attack(name, x, byz, perturbation=perturbation, tau=tau)
    assert torch.equal(out[0], x[0])  # group 0 has no attacker
    for g in (1, 2):  # group 3 has a single honest row: see the next test
        h, mean = _honest_stats(x[g], byz[g])
        p = _direction(mean, h, perturbation)
        m = out[g][byz[g]]
        assert torch.allclose(m, m[0].expand_as(m), rtol=0, atol=0)  # one row for all
        gamma = ((m[0] - mean) @ p / (p @ p)).item()
        assert torch.allclose(m[0], mean + gamma * p, atol=1e-12)
        best = _largest_gamma(name, h, mean, p).item()
        assert 0 < gamma < 2 * 10.0 - 2 * tau  # not capped by the search range
        assert best - 2 * tau <= gamma <= best + 1e-9
        assert _violation(name, mean + gamma * p, h) <= 1e-9
        assert _violation(name, mean + (gamma + 2 * tau + 1e-9) * p, h) > 0


@pytest.mark.parametrize("name", ["min_max", "min_sum"])
def test_single_honest_row_is_sent_back(name):
    """One honest row: both bounds are 0, so only gamma = 0 is feasible."""
    x, byz = random_groups(seed=5)
    out = apply_attack(name, x[3], byz[3], perturbation="unit")
    assert torch.allclose(out[byz[3]], x[3, 0].expand(6, -1), atol=1e-12)


def test_search_is_capped_at_twice_gamma_init():
    x, byz = random_groups(seed=5)
    out = apply_attack("min_max", x[1], byz[1], perturbation="unit", gamma_init=1e-3)
    h, mean = _honest_stats(x[1], byz[1])
    gamma = ((out[byz[1]][0] - mean) @ (-mean / mean.norm())).item()
    assert 2e-3 - 2e-5 <= gamma < 2e-3


def test_max_iter_limits_the_search():
    x, byz = random_groups(seed=5)
    one = apply_attack("min_sum", x, byz, perturbation="unit", max_iter=1)
    # a single test of gamma_init = 10, which is far outside the honest cloud: fails -> 0
    h, mean = _honest_stats(x[1], byz[1])
    assert torch.allclose(one[1][byz[1]][0], mean, atol=1e-12)


# ---------------------------------------------------------------- gaussian


def test_gaussian_deterministic_and_independent_rows():
    x, byz = random_groups(p=64)
    a = apply_attack("gaussian", x, byz, generator=gen(7))
    b = apply_attack("gaussian", x, byz, generator=gen(7))
    c = apply_attack("gaussian", x, byz, generator=gen(8))
    assert torch.equal(a, b) and not torch.equal(a[byz], c[byz])
    rows = a[byz]
    assert len({tuple(r.tolist()) for r in rows}) == rows.shape[0]
    scaled = apply_attack("gaussian", x, byz, generator=gen(7), sigma=3.0)
    assert torch.allclose(scaled[byz], 3.0 * rows)
    assert torch.equal(apply_attack("gaussian", x, byz, sigma=0.0)[byz], torch.zeros_like(rows))


def test_gaussian_moments():
    x = torch.zeros(1, 3, 50_000)
    out = apply_attack("gaussian", x, mask([[False, True, True]]), generator=gen(1), sigma=2.0)
    noise = out[0, 1:]
    assert abs(noise.mean().item()) < 0.05 and abs(noise.std().item() - 2.0) < 0.05
    assert torch.equal(out[0, 0], x[0, 0])


# ---------------------------------------------------------------- label flipping


def test_flip_labels():
    y = torch.tensor([0, 1, 2, 9], dtype=torch.int64)
    assert torch.equal(flip_labels(y, 10), torch.tensor([9, 8, 7, 0]))
    assert torch.equal(flip_labels(flip_labels(y, 10), 10), y)
    assert flip_labels(y.to(torch.int32), 10).dtype == torch.int32
    assert torch.equal(flip_labels(torch.tensor([0, 1]), 2), torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="lie in"):
        flip_labels(torch.tensor([3]), 3)
    with pytest.raises(ValueError, match="integer"):
        flip_labels(torch.tensor([1.0]), 3)
    with pytest.raises(ValueError, match="num_classes"):
        flip_labels(y, 0)


def test_label_flip_is_a_data_attack():
    check_attack_params("label_flip")
    with pytest.raises(ValueError, match="data attack"):
        apply_attack("label_flip", X, BYZ)


# ---------------------------------------------------------------- parameter checks


@pytest.mark.parametrize(
    "name, params, fragment",
    [
        ("nope", {}, "unknown attack 'nope'; known: alie"),
        ("sign_flip", {"sigma": 1.0}, "has no parameter 'sigma'; known: scale"),
        ("label_flip", {"scale": 1.0}, "known: none"),
        ("sign_flip", {"scale": -1.0}, "scale must be a finite number > 0"),
        ("scaling", {"scale": True}, "got True"),
        ("gaussian", {"sigma": -0.5}, ">= 0"),
        ("gaussian", {"sigma": float("nan")}, "got nan"),
        ("alie", {"z": "big"}, "null or a finite number"),
        ("ipm", {"epsilon": 0}, "epsilon must be"),
        ("min_max", {"perturbation": "l2"}, "one of 'std', 'unit', 'sign'"),
        ("min_sum", {"tau": 0.0}, "tau must be"),
        ("min_sum", {"max_iter": 0}, "an int >= 1"),
        ("min_max", {"max_iter": 2.5}, "an int >= 1"),
        ("min_max", {"gamma_init": float("inf")}, "gamma_init"),
        ("alie", {"z": torch.zeros(3, 3)}, "got tensor("),
    ],
)
def test_check_attack_params_errors_are_one_line(name, params, fragment):
    with pytest.raises(ValueError) as err:
        check_attack_params(name, **params)
    msg = str(err.value)
    assert "\n" not in msg and fragment in msg and len(msg) < 200


def test_check_attack_params_accepts_valid_params():
    check_attack_params("sign_flip", scale=2)
    check_attack_params("alie")
    check_attack_params("alie", z=None)
    check_attack_params("alie", z=-1.5)
    check_attack_params("gaussian", sigma=0.0)
    for name in ("min_max", "min_sum"):
        check_attack_params(name, perturbation="sign", gamma_init=5, tau=1e-3, max_iter=30)


def test_apply_attack_validates():
    with pytest.raises(ValueError, match="scale must be"):
        apply_attack("scaling", X, BYZ, scale=-1.0)
    with pytest.raises(ValueError, match="bool tensor of shape"):
        apply_attack("ipm", X, BYZ.to(torch.int64))
    with pytest.raises(ValueError, match="bool tensor of shape"):
        apply_attack("ipm", X, BYZ[:3])
    with pytest.raises(ValueError, match="floating"):
        apply_attack("ipm", X.to(torch.int64), BYZ)


def test_a_free_rider_sends_the_model_it_received():
    updates = torch.randn(1, 4, 6)
    byz = torch.tensor([[False, True, False, True]])
    out = apply_attack("free_rider", updates, byz)
    assert out.shape == updates.shape and torch.equal(out[byz], torch.zeros(2, 6, dtype=out.dtype))
    assert torch.equal(out[~byz], updates[~byz])                     # honest rows untouched
    noisy = apply_attack("free_rider", updates, byz, generator=torch.Generator().manual_seed(0), sigma=0.1)
    assert 0 < noisy[byz].abs().max() < 1


def test_label_noise_replaces_that_fraction_of_labels_by_uniform_draws():
    from gossamer.attacks.data import noisy_labels

    y = torch.zeros(20000, dtype=torch.int64)
    noisy = noisy_labels(y, 10, 0.5, torch.Generator().manual_seed(0))
    changed = (noisy != 0).float().mean().item()
    assert 0.43 < changed < 0.47                     # 0.5 * 9/10 drawn to another class
    assert torch.equal(noisy_labels(y, 10, 0.0, torch.Generator().manual_seed(0)), y)
    with pytest.raises(ValueError, match="data attack"):
        apply_attack("label_noise", torch.zeros(1, 2, 3), torch.tensor([[True, False]]))
