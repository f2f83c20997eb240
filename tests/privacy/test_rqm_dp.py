"""RQM's Renyi DP (Youn et al. 2023, arXiv:2306.11913): the exact pmf and the supremum over
inputs against brute force on tiny grids, opacus' conversion, and RQM as client-level DP."""

import math

import numpy as np
import pytest
from opacus.accountants.analysis.rdp import get_privacy_spent

from gossamer import config
from gossamer.privacy.rqm import (
    RQMLedger,
    default_orders,
    rqm_breakpoints,
    rqm_epsilon,
    rqm_pmf,
    rqm_rdp,
)
from tests.compression.test_rqm import enumerated_pmf
from tests.privacy.test_dp_runs import _fedavg, _run

TINY = [(1.0, 1.0, 2, 0.5), (1.0, 1.0, 5, 0.4), (0.5, 0.3, 6, 0.2), (1.0, 0.2, 7, 0.7),
        (1.0, 3.0, 4, 0.05)]


def renyi(p, q, alpha):
    return math.log(sum(pk**alpha * qk ** (1 - alpha) for pk, qk in zip(p, q, strict=True) if pk > 0)) / (
        alpha - 1)


@pytest.mark.parametrize("c,extension,m,q", TINY)
def test_pmf_equals_enumeration_of_every_kept_set(c, extension, m, q):
    grid = np.concatenate([np.linspace(-c, c, 41), rqm_breakpoints(c, extension, m)])
    for x in grid:
        got = rqm_pmf(x, c=c, extension=extension, levels=m, q=q)
        assert np.allclose(got, enumerated_pmf(x, c, extension, m, q), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("c,extension,m,q", TINY)
def test_rdp_is_the_supremum_over_a_brute_force_grid_of_input_pairs(c, extension, m, q):
    orders = [1.5, 2.0, 8.0, 32.0]
    got = rqm_rdp(orders, c=c, extension=extension, levels=m, q=q)
    grid = np.unique(np.concatenate([np.linspace(-c, c, 25), rqm_breakpoints(c, extension, m)]))
    pmfs = [enumerated_pmf(x, c, extension, m, q) for x in grid]
    for a, rdp in zip(orders, got, strict=True):
        brute = max(renyi(p, p2, a) for p in pmfs for p2 in pmfs)
        assert rdp == pytest.approx(brute, rel=1e-9)     # attained on the grid, never exceeded


def test_two_levels_is_a_closed_form_binary_mechanism():
    # m = 2: output 1 with probability (x + c + D) / (2 (c + D)); worst pair x = c, x' = -c
    c, d, a = 1.0, 2.0, 3.0
    p, p2 = (2 * c + d) / (2 * (c + d)), d / (2 * (c + d))
    want = renyi([p, 1 - p], [p2, 1 - p2], a)
    assert rqm_rdp(a, c=c, extension=d, levels=2, q=0.3)[0] == pytest.approx(want, rel=1e-12)


def test_rdp_falls_with_extension_and_fewer_kept_levels_and_q_one_is_not_private():
    kw = {"c": 1.0, "levels": 8}
    base = rqm_rdp(4.0, extension=1.0, q=0.5, **kw)[0]
    assert rqm_rdp(4.0, extension=3.0, q=0.5, **kw)[0] < base
    assert rqm_rdp(4.0, extension=1.0, q=0.2, **kw)[0] < base
    assert rqm_rdp(4.0, extension=1.0, q=1.0, **kw)[0] == math.inf   # disjoint supports
    assert rqm_epsilon(extension=1.0, q=1.0, coordinates=1, releases=1, delta=1e-5, **kw) \
        == math.inf


def test_epsilon_composes_rdp_and_converts_with_opacus():
    kw = {"c": 1.0, "extension": 4.0, "levels": 4, "q": 0.5}
    orders = default_orders()
    rdp = rqm_rdp(orders, **kw)
    want, _ = get_privacy_spent(orders=orders, rdp=3 * 10 * rdp, delta=1e-5)
    got = rqm_epsilon(coordinates=10, releases=3, delta=1e-5, **kw)
    assert got == pytest.approx(want, rel=1e-12)
    assert rqm_epsilon(coordinates=30, releases=1, delta=1e-5, **kw) == pytest.approx(got)
    assert rqm_epsilon(coordinates=10, releases=0, delta=1e-5, **kw) == 0.0


def test_ledger_bounds_the_most_released_client_and_round_trips():
    kw = {"c": 1.0, "extension": 4.0, "levels": 4, "q": 0.5}
    ledger = RQMLedger(coordinates=5, delta=1e-5, num_clients=4, **kw)
    assert ledger.epsilon() == 0.0
    ledger.released(np.array([0, 2]))
    ledger.released(np.array([2, 3]))
    want = rqm_epsilon(coordinates=5, releases=2, delta=1e-5, **kw)
    assert ledger.epsilon() == pytest.approx(want)
    other = RQMLedger(coordinates=5, delta=1e-5, num_clients=4, **kw)
    other.load_state_dict(ledger.state_dict())
    assert other.epsilon() == pytest.approx(want)


RQM_DP = {"level": "client", "mechanism": "rqm", "clip_norm": 0.05, "levels": 4, "q": 0.5,
          "extension": 0.5, "delta": 1e-3}


def test_rqm_run_reports_epsilon_bytes_and_is_deterministic(tmp_path):
    cfg = _fedavg(rounds=2)
    cfg["privacy"] = {"dp": RQM_DP}
    summary, rows, params = _run(cfg, tmp_path / "a")
    exp_numel = params.numel()
    clients = cfg["partition"]["num_nodes"]
    want = rqm_epsilon(c=0.05, extension=0.5, levels=4, q=0.5, coordinates=exp_numel,
                       releases=2, delta=1e-3)
    assert summary["dp_epsilon"] == pytest.approx(want)
    assert float(rows[-1]["epsilon"]) == pytest.approx(want)
    # 2-bit level indices: ceil(P / 4) bytes plus the 28-byte header per upload
    assert int(rows[-1]["bytes_up"]) == 2 * clients * (28 + (exp_numel * 2 + 7) // 8)
    _, _, again = _run(cfg, tmp_path / "b")
    assert np.array_equal(params.numpy(), again.numpy())


def test_rqm_config_errors_are_one_line():
    cfg = _fedavg()
    cfg["privacy"] = {"dp": {**RQM_DP, "level": "sample"}}
    with pytest.raises(config.ConfigError, match="mechanism rqm is client level"):
        config.validate(cfg)
    cfg["privacy"] = {"dp": {"level": "client", "clip_norm": 1.0}}
    with pytest.raises(config.ConfigError, match="takes noise_multiplier or target_epsilon"):
        config.validate(cfg)
