import pytest
import torch

from gossamer.algorithms import GossipLearning
from gossamer.algorithms.dl.gossip import variance_corrected_average
from gossamer.models import ParamSpec


def _spec() -> ParamSpec:
    shapes = ((16, 8), (16,), (1,), (4, 16), (4,))
    offsets, total = [], 0
    for s in shapes:
        offsets.append(total)
        total += torch.Size(s).numel()
    return ParamSpec(tuple(f"p{i}" for i in range(len(shapes))), shapes, tuple(offsets), total)


def test_variance_corrected_merge_keeps_mean_and_restores_mean_variance_per_tensor():
    spec, gen = _spec(), torch.Generator().manual_seed(0)
    b = 64
    scale = torch.rand(b, spec.numel, generator=gen) * 3 + 0.1     # every tensor its own spread
    own = torch.randn(b, spec.numel, generator=gen) * scale + 1.0
    recv = torch.randn(b, spec.numel, generator=gen) * 0.2 - 0.5
    merged, age = GossipLearning(merge="variance_corrected").merge_models(
        own, torch.full((b,), 2.0), recv, torch.full((b,), 5.0), spec=spec)
    plain = (own + recv) / 2
    assert torch.equal(age, torch.full((b,), 5.0))
    for off, shape in zip(spec.offsets, spec.shapes, strict=True):
        n = torch.Size(shape).numel()
        got, base = merged[:, off:off + n], plain[:, off:off + n]
        if n == 1:                                  # no variance to restore: plain average
            assert torch.allclose(got, base)
            continue
        promised = (own[:, off:off + n].var(dim=1) + recv[:, off:off + n].var(dim=1)) / 2
        assert torch.allclose(got.var(dim=1), promised, rtol=1e-4)
        assert torch.allclose(got.mean(dim=1), base.mean(dim=1), atol=1e-5)
        assert (base.var(dim=1) < 0.9 * promised).all()       # plain averaging lost variance


def test_variance_corrected_average_of_k_independent_models_keeps_their_spread():
    gen = torch.Generator().manual_seed(1)
    models = [torch.randn(3, 1000, generator=gen) * 0.05 for _ in range(8)]
    out = variance_corrected_average(models, [(0, 600), (600, 400)])
    plain = torch.stack(models).mean(0)
    assert plain[:, :600].std(dim=1).mean() == pytest.approx(0.05 / 8 ** 0.5, rel=0.05)
    assert torch.allclose(out[:, :600].std(dim=1), torch.full((3,), 0.05), rtol=0.03)
    assert torch.allclose(out.mean(dim=1), plain.mean(dim=1), atol=1e-6)


def test_variance_corrected_merge_needs_the_layout_and_leaves_constants_alone():
    own, recv = torch.tensor([[1.0, -1.0, 3.0]]), torch.tensor([[-1.0, 1.0, 5.0]])
    algo = GossipLearning(merge="variance_corrected")
    with pytest.raises(ValueError, match="ParamSpec"):
        algo.merge_models(own, torch.zeros(1), recv, torch.zeros(1))
    out = variance_corrected_average([own, recv], [(0, 2), (2, 1)])
    assert torch.equal(out, torch.tensor([[0.0, 0.0, 4.0]]))   # a constant average cannot be rescaled
    with pytest.raises(ValueError, match="tile"):
        variance_corrected_average([own, recv], [(0, 2)])


def test_gossip_clock_fields_are_validated():
    assert GossipLearning().clocks == "single"
    with pytest.raises(ValueError, match="compute_period_s"):
        GossipLearning(clocks="dual", compute_period_s=0.0)
