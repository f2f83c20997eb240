import pytest
import torch

from gossamer.compression import dgc_density, dgc_nominal_bytes, dgc_step


def test_warmup_schedule_is_the_papers():
    # Lin et al.: 75%, 93.75%, 98.4375%, 99.6%, 99.9% sparsity (a factor 4 per warm-up epoch).
    got = [dgc_density(t, 0.25 / 4**4, warmup_rounds=4) for t in range(6)]
    assert got == pytest.approx([0.25, 0.0625, 0.015625, 0.00390625, 0.25 / 256, 0.25 / 256])
    got = [dgc_density(t, 0.001, warmup_rounds=4) for t in range(5)]
    assert got == pytest.approx([0.25, 0.0625, 0.015625, 0.004, 0.001], rel=0.02)
    assert dgc_density(0, 0.01) == 0.01                       # no warm-up
    assert dgc_density(0, 0.5, warmup_rounds=3) == 0.5        # target above the start
    assert dgc_nominal_bytes(1000, round=0, density=0.001, warmup_rounds=4) == 4 + 125 + 1000


def test_momentum_correction_and_factor_masking():
    m = 0.5
    g1 = torch.tensor([[1.0, -4.0, 0.5, 0.0]])
    s1 = dgc_step(g1, None, None, round=0, density=0.25, momentum_factor=m)
    assert torch.equal(s1.decoded, torch.tensor([[0.0, -4.0, 0.0, 0.0]]))
    assert torch.equal(s1.momentum, torch.tensor([[1.0, 0.0, 0.5, 0.0]]))      # masked
    assert torch.equal(s1.accumulation, torch.tensor([[1.0, 0.0, 0.5, 0.0]]))
    g2 = torch.tensor([[1.0, 1.0, 2.0, 0.0]])
    s2 = dgc_step(g2, s1.momentum, s1.accumulation, round=1, density=0.25, momentum_factor=m)
    # u = 0.5 u + g = [1.5, 1, 2.25, 0]; v = v + u = [2.5, 1, 2.75, 0]: send entry 2.
    assert torch.equal(s2.decoded, torch.tensor([[0.0, 0.0, 2.75, 0.0]]))
    assert torch.equal(s2.momentum, torch.tensor([[1.5, 1.0, 0.0, 0.0]]))
    assert torch.equal(s2.accumulation, torch.tensor([[2.5, 1.0, 0.0, 0.0]]))
    data = s2.compressor.to_bytes(s2.encoded, 0)
    assert torch.equal(s2.compressor.from_bytes(data, 4), s2.decoded[0])


def test_nothing_is_lost_without_momentum():
    gen = torch.Generator().manual_seed(0)
    u = v = None
    sent = torch.zeros(3, 40)
    total = torch.zeros(3, 40)
    for t in range(8):
        g = torch.randn(3, 40, generator=gen)
        step = dgc_step(g, u, v, round=t, density=0.05, momentum_factor=0.0, warmup_rounds=3)
        u, v = step.momentum, step.accumulation
        sent += step.decoded
        total += g
        assert (step.decoded != 0).sum(dim=1).tolist() == [step.compressor.k_for(40)] * 3
    assert torch.allclose(sent + v, total, atol=1e-5)


def test_local_clipping_bounds_the_gradient_norm():
    g = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    step = dgc_step(g, None, None, round=0, density=1.0, clip_norm=1.0)
    assert torch.allclose(step.decoded, torch.tensor([[0.6, 0.8], [0.3, 0.4]]))
