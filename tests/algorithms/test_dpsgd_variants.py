"""D-PSGD variants as pure parts: communication schedules, multiple gossip steps, DFedSAM
presets, gradient tracking on a quadratic."""

import numpy as np
import pytest
import torch

from gossamer import config
from gossamer.algorithms import ALGORITHMS, DPSGD
from gossamer.algorithms.dl.dfedsam import DFedSAM, DFedSAMMGS
from gossamer.algorithms.dl.gradient_tracking import GradientTracking
from gossamer.topology import make_topology, mixing_matrix, spectral_gap, to_torch_sparse


def test_constant_and_local_only_schedules():
    assert [DPSGD(gossip_steps=2).gossip_steps_at(r, 4) for r in range(1, 5)] == [2, 2, 2, 2]
    assert [DPSGD(schedule="local_only").gossip_steps_at(r, 4) for r in range(1, 5)] == [0, 0, 0, 0]
    assert [DPSGD(gossip_every=3).gossip_steps_at(r, 7) for r in range(1, 8)] == [0, 0, 1, 0, 0, 1, 0]


def test_increasing_schedule_ramps_from_start_to_gossip_steps():
    algo = DPSGD(gossip_steps=4, schedule="increasing")
    steps = [algo.gossip_steps_at(r, 9) for r in range(1, 10)]
    assert steps == [0, 1, 1, 2, 2, 3, 3, 4, 4]                # round(4 (r - 1) / 8)
    assert steps == sorted(steps) and steps[0] == 0 and steps[-1] == 4
    ramp = DPSGD(gossip_steps=3, schedule="increasing", gossip_steps_start=1)
    assert [ramp.gossip_steps_at(r, 5) for r in range(1, 6)] == [1, 2, 2, 3, 3]
    assert ramp.gossip_steps_at(1, 1) == 1 and ramp.gossip_steps_at(7, 5) == 3   # no division by 0; clamped
    every = DPSGD(gossip_steps=2, schedule="increasing", gossip_every=2)
    assert [every.gossip_steps_at(r, 5) for r in range(1, 6)] == [0, 1, 0, 2, 0]


@pytest.mark.parametrize("params, message", [
    ({"gossip_steps_start": 1}, "gossip_steps_start is only used by schedule increasing"),
    ({"schedule": "increasing", "gossip_steps": 2, "gossip_steps_start": 3}, "gossip_steps_start must be in 0..gossip_steps"),
    ({"gossip_every": 0}, "gossip_every must be >= 1"),
    ({"schedule": "sometimes"}, "schedule"),
])
def test_bad_schedule_params_are_one_line_errors(params, message):
    cfg = {"algorithm": {"name": "dpsgd", "params": params}, "topology": {"name": "ring"}}
    with pytest.raises(config.ConfigError, match=message) as err:
        config.validate(cfg)
    assert str(err.value).startswith("algorithm.params") and "\n" not in str(err.value)


def test_dfedsam_presets():
    assert ALGORITHMS.get("dfedsam") is DFedSAM and ALGORITHMS.get("dfedsam_mgs") is DFedSAMMGS
    assert DFedSAM().local_sam_rho == 0.05 and DFedSAM().gossip_steps == 1
    mgs = DFedSAMMGS.from_params({"rho": 0.1})
    assert mgs.local_sam_rho == 0.1 and mgs.gossip_steps == 4 and mgs.pattern == "sync_dl"
    with pytest.raises(config.ConfigError, match="algorithm.params: rho must be a finite number > 0"):
        config.validate({"algorithm": {"name": "dfedsam", "params": {"rho": 0}}, "topology": {"name": "ring"}})


def _consensus(x: torch.Tensor) -> float:
    return float(((x - x.mean(0)) ** 2).sum(1).mean())


def test_multiple_gossip_steps_shrink_consensus_distance_within_the_spectral_bound():
    n = 16
    w = mixing_matrix("metropolis_hastings", make_topology("ring", n, 0))
    lam = 1.0 - spectral_gap(w)                       # second largest |eigenvalue|
    sparse = to_torch_sparse(w, torch.float64)
    x = torch.randn(n, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ratios = []
    for q in range(1, 6):
        mixed = DPSGD(gossip_steps=q).mix(sparse, x.clone())
        assert torch.allclose(mixed.mean(0), x.mean(0))          # the average is preserved
        ratios.append(_consensus(mixed) / _consensus(x))
        assert ratios[-1] <= lam ** (2 * q) * (1 + 1e-9)
    assert all(a > b for a, b in zip(ratios, ratios[1:], strict=False))   # more steps, more shrinkage
    # the bound is tight: the slowest eigenvector contracts by exactly lambda_2^(2Q)
    values, vectors = np.linalg.eigh(w.toarray())
    slow = torch.from_numpy(vectors[:, np.argsort(np.abs(values))[-2]]).unsqueeze(1)
    out = DPSGD(gossip_steps=3).mix(sparse, slow.clone())
    assert _consensus(out) / _consensus(slow) == pytest.approx(lam ** 6, rel=1e-9)


# --- gradient tracking on heterogeneous quadratics f_i(x) = a_i / 2 ||x - b_i||^2 ---------------
def _quadratic_problem(n=8, dim=3):
    g = torch.Generator().manual_seed(1)
    a = torch.rand(n, 1, generator=g, dtype=torch.float64) * 1.5 + 0.5
    b = torch.randn(n, dim, generator=g, dtype=torch.float64)
    optimum = (a * b).sum(0) / a.sum()
    w = mixing_matrix("metropolis_hastings", make_topology("ring", n, 0))
    return a, b, optimum, torch.from_numpy(w.toarray())


def _run(algo, a, b, w, lr, local_steps, rounds, tracking):
    n, dim = b.shape
    x = torch.zeros(n, dim, dtype=torch.float64)
    correction = algo.init_correction(n, dim, torch.float64) if tracking else None
    steps = np.full(n, local_steps)
    for _ in range(rounds):
        extra = algo.local_objective(correction).correction if tracking else 0.0
        z = x.clone()
        for _ in range(local_steps):                            # full-batch local gradients
            z = z - lr * (a * (z - b) + extra)
        if tracking:
            y = algo.directions(x, z, steps, lr, correction)
            algo.remove_directions(correction, y)
            algo.add_mixed(correction, algo.mix(w, y.clone()))
        x = algo.mix(w, z)
    return x, correction


@pytest.mark.parametrize("local_steps", [1, 3])
def test_gradient_tracking_reaches_the_exact_optimum_where_dpsgd_is_biased(local_steps):
    a, b, optimum, w = _quadratic_problem()
    lr, rounds = 0.1, 600
    gt, correction = _run(GradientTracking(), a, b, w, lr, local_steps, rounds, tracking=True)
    assert float((gt - optimum).abs().max()) < 1e-9
    assert float(correction.sum(0).abs().max()) < 1e-12       # the trackers' invariant
    plain, _ = _run(DPSGD(), a, b, w, lr, local_steps, rounds, tracking=False)
    assert float((plain - optimum).abs().max()) > 1e-2        # a fixed point, but not the optimum
    again, _ = _run(DPSGD(), a, b, w, lr, local_steps, rounds + 100, tracking=False)
    assert torch.allclose(again, plain, atol=1e-9)             # converged: the bias is not slowness


def test_one_step_gradient_tracking_is_the_classic_recursion():
    """K = 1: x+ = W (x - lr y), y+ = W y + g(x+) - g(x), y_0 = g(x_0)."""
    a, b, _, w = _quadratic_problem()
    algo, lr = GradientTracking(), 0.2
    x = torch.randn(b.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    grad = lambda v: a * (v - b)                                         # noqa: E731
    ref_x, ref_y = x.clone(), grad(x)
    for _ in range(5):
        new_x = w @ (ref_x - lr * ref_y)
        ref_y, ref_x = w @ ref_y + grad(new_x) - grad(ref_x), new_x
    assert torch.allclose(_run_from(algo, a, b, w, lr, x, 5), ref_x, atol=1e-12)


def _run_from(algo, a, b, w, lr, x, rounds):
    correction = algo.init_correction(*b.shape, torch.float64)
    steps = np.ones(len(b), dtype=np.int64)
    for _ in range(rounds):
        z = x - lr * (a * (x - b) + correction)
        y = algo.directions(x, z, steps, lr, correction)
        algo.remove_directions(correction, y)
        algo.add_mixed(correction, algo.mix(w, y.clone()))
        x = algo.mix(w, z)
    return x


def test_idle_nodes_keep_their_tracker_direction():
    algo = GradientTracking()
    start, trained = torch.ones(3, 2), torch.tensor([[0.5, 0.5], [1.0, 1.0], [0.0, 1.0]])
    correction = torch.tensor([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]])
    y = algo.directions(start, trained, np.array([2, 0, 1]), 0.5, correction)
    assert torch.allclose(y, torch.tensor([[0.5, 0.5], [0.3, 0.4], [2.0, 0.0]]))


def test_gradient_tracking_refuses_robust_merges():
    with pytest.raises(config.ConfigError, match="aggregator: mean"):
        config.validate({"algorithm": {"name": "gradient_tracking", "params": {"aggregator": "median"}},
                         "topology": {"name": "ring"}})
