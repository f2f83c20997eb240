"""SAM as the local optimizer: the batched trainer against a per-node torch loop."""

import numpy as np
import pytest
import torch
from torch import nn

from gossamer.algorithms.local import LocalObjective
from gossamer.models import ParamSpec, build_model, make_stacked_forward
from gossamer.training.trainer import SGD, BatchedTrainer, LocalSchedule

SIZES = [8, 5, 11, 0, 3]


def _setup(schedule, opt, fused=True):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(sum(SIZES), 6, generator=g)
    y = torch.randint(0, 3, (sum(SIZES),), generator=g)
    model = build_model("mlp", (6,), 3, seed=0, hidden=[5])
    spec = ParamSpec.from_module(model)
    bounds = np.cumsum([0, *SIZES])
    shards = [np.arange(bounds[i], bounds[i + 1]) for i in range(len(SIZES))]
    trainer = BatchedTrainer(make_stacked_forward(model, spec, x[0]), spec, x, y, shards, schedule, opt,
                             seed=3, kernel=model.stacked_kernel if fused else None)
    return trainer, model, spec, x, y


def _flat_grad(model, spec, w, x, y):
    spec.load_into(model, w)
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def _sam_reference(trainer, model, spec, x, y, rows, key, opt, correction=None):
    """Per node: g = grad(w); e = rho g / (||g|| + 1e-12); step with grad(w + e) through
    torch.optim.SGD (momentum, weight decay), plus an optional constant correction."""
    nodes = np.arange(len(SIZES))
    idx, valid = trainer.batches(nodes, np.full(len(nodes), key))
    out = []
    for b in nodes:
        spec.load_into(model, rows[b])
        sgd = torch.optim.SGD(model.parameters(), lr=opt.lr, momentum=opt.momentum,
                              weight_decay=opt.weight_decay)
        for t in range(idx.shape[1]):
            take = idx[b, t][valid[b, t]]
            if len(take) == 0:
                continue
            w = spec.flatten(model).detach().clone()
            g = _flat_grad(model, spec, w, x[take], y[take])
            g_sam = _flat_grad(model, spec, w + opt.sam_rho * g / (g.norm() + 1e-12), x[take], y[take])
            if correction is not None:
                g_sam = g_sam + correction[b]
            spec.load_into(model, w)
            offset = 0
            for p in model.parameters():
                p.grad = g_sam[offset: offset + p.numel()].view_as(p).clone()
                offset += p.numel()
            sgd.step()
        out.append(spec.flatten(model).detach())
    return torch.stack(out)


@pytest.mark.parametrize("fused", [False, True], ids=["autograd", "fused"])
@pytest.mark.parametrize("schedule", [LocalSchedule(3, epochs=2), LocalSchedule(4, epochs=None, steps=5),
                                      LocalSchedule(4, epochs=None, steps=2)])
@pytest.mark.parametrize("opt", [SGD(0.1, sam_rho=0.05), SGD(0.05, weight_decay=1e-2, sam_rho=0.2),
                                 SGD(0.05, momentum=0.9, weight_decay=1e-3, sam_rho=0.2)])
def test_sam_training_equals_per_node_torch_loop(schedule, opt, fused):
    trainer, model, spec, x, y = _setup(schedule, opt, fused=fused)
    assert (trainer.kernel is not None) == (fused and opt.momentum == 0)
    rows = torch.randn(len(SIZES), spec.numel, generator=torch.Generator().manual_seed(1)) * 0.3
    result = trainer.train(rows, np.arange(len(SIZES)), keys=7)
    ref = _sam_reference(trainer, model, spec, x, y, rows, 7, opt)
    assert torch.allclose(result.params, ref, atol=1e-5)
    assert torch.equal(result.params[3], rows[3])       # no data: no step
    plain, *_ = _setup(schedule, SGD(opt.lr, opt.momentum, opt.weight_decay))
    assert not torch.allclose(plain.train(rows, np.arange(len(SIZES)), keys=7).params, ref, atol=1e-4)


@pytest.mark.parametrize("fused", [False, True], ids=["autograd", "fused"])
def test_sam_with_a_correction_term_equals_reference(fused):
    opt = SGD(0.1, sam_rho=0.1)
    trainer, model, spec, x, y = _setup(LocalSchedule(4, epochs=1), opt, fused=fused)
    g = torch.Generator().manual_seed(2)
    rows = torch.randn(len(SIZES), spec.numel, generator=g) * 0.3
    corr = torch.randn(len(SIZES), spec.numel, generator=g) * 0.1
    result = trainer.train(rows, np.arange(len(SIZES)), keys=1, objective=LocalObjective(correction=corr))
    ref = _sam_reference(trainer, model, spec, x, y, rows, 1, opt, correction=corr)
    assert torch.allclose(result.params, ref, atol=1e-5)


@pytest.mark.parametrize("fused", [False, True], ids=["autograd", "fused"])
def test_sam_rho_zero_is_plain_sgd(fused):
    trainer, _, spec, *_ = _setup(LocalSchedule(3, epochs=1), SGD(0.1, sam_rho=0.0), fused=fused)
    assert (trainer.kernel is not None) == fused        # the fused kernel is kept
    plain, *_ = _setup(LocalSchedule(3, epochs=1), SGD(0.1), fused=fused)
    rows = torch.randn(len(SIZES), spec.numel) * 0.3
    nodes = np.arange(len(SIZES))
    assert torch.equal(trainer.train(rows, nodes, keys=4).params, plain.train(rows, nodes, keys=4).params)


def test_sam_refuses_a_recursive_direction():
    trainer, _, spec, *_ = _setup(LocalSchedule(3, epochs=1), SGD(0.1, sam_rho=0.1), fused=False)
    objective = LocalObjective(recursive_direction=torch.zeros(spec.numel))
    with pytest.raises(ValueError, match="local.sam_rho"):
        trainer.train(torch.zeros(len(SIZES), spec.numel), np.arange(len(SIZES)), 0, objective=objective)
