import numpy as np
import pytest
import torch

from gossamer.compression import PowerSGD
from tests.compression.cases import SPEC, make_spec


def test_plan_factors_matrices_that_gain_and_sends_the_rest_raw():
    # (8,6) (8,) (3,8) (3,) () (3,2,3,3): rank 2 factors 8x6 (28 < 48), 3x8 (22 < 24) and
    # 3x18 (42 < 54); rank 3 still factors 8x6 (42 < 48) but sends 3x8 (33 >= 24) and
    # 3x18 (63 >= 54) raw.
    assert [r for *_, r in PowerSGD(SPEC, rank=2).plan] == [2, 0, 2, 0, 0, 2]
    assert [r for *_, r in PowerSGD(SPEC, rank=3).plan] == [3, 0, 0, 0, 0, 0]
    floats = (8 + 6) * 2 + 8 + (3 + 8) * 2 + 3 + 1 + (3 + 18) * 2
    assert PowerSGD(SPEC, rank=2).nominal_bytes(SPEC.numel) == 4 * floats


def test_low_rank_matrices_are_rebuilt_and_vectors_pass_unchanged():
    spec = make_spec([(20, 12), (12,), (6, 2, 5)])
    gen = torch.Generator().manual_seed(0)
    rows = 4
    w1 = torch.randn(rows, 20, 2, generator=gen) @ torch.randn(rows, 2, 12, generator=gen)
    bias = torch.randn(rows, 12, generator=gen)
    w2 = torch.randn(rows, 6, 1, generator=gen) @ torch.randn(rows, 1, 10, generator=gen)
    x = torch.cat([w1.reshape(rows, -1), bias, w2.reshape(rows, -1)], dim=1)
    out = PowerSGD(spec, rank=2).roundtrip(x, seed=1, keys=np.arange(rows))[0]
    assert torch.equal(out[:, 240:252], bias)
    assert torch.allclose(out, x, atol=1e-4, rtol=1e-4)


def test_one_power_iteration_is_a_projection_onto_m_q0():
    spec = make_spec([(10, 7)])
    x = torch.randn(3, 70, generator=torch.Generator().manual_seed(2))
    c = PowerSGD(spec, rank=2)
    enc = c.compress(x, seed=4, keys=np.array([1, 2, 3]))
    p_factor = enc.parts["p0"]
    assert torch.allclose(p_factor.transpose(1, 2) @ p_factor, torch.eye(2).expand(3, 2, 2),
                          atol=1e-5)
    m = x.reshape(3, 10, 7)
    residual = m - c.decompress(enc).reshape(3, 10, 7)
    assert torch.allclose(p_factor.transpose(1, 2) @ residual, torch.zeros(3, 2, 7), atol=1e-4)
    other = c.decompress(c.compress(x, seed=4, keys=np.array([5, 6, 7])))
    assert not torch.allclose(other, c.decompress(enc))  # Q0 comes from (seed, key)


def test_size_mismatch_is_refused():
    c = PowerSGD(SPEC, rank=1)
    with pytest.raises(ValueError, match="built for 138 parameters"):
        c.compress(torch.zeros(2, 10))
    with pytest.raises(ValueError, match="built for 138 parameters"):
        c.from_bytes(bytes(c.nominal_bytes(SPEC.numel)), 10)
