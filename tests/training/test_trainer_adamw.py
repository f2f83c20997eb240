"""The trainer's AdamW: per node exactly torch.optim.AdamW, with state that persists across
activations when the algorithm keeps it (DiLoCo's inner optimizer)."""

import numpy as np
import pytest
import torch
from torch import nn

from gossamer.algorithms.local import LocalObjective
from gossamer.training.trainer import AdamW, LocalSchedule
from tests.training.test_trainer import _setup as setup


def _setup(sizes, schedule, opt):
    return setup(sizes, schedule, opt, fused=True)       # a fused kernel exists; AdamW declines it


def _reference(trainer, model, spec, x, y, rows, nodes, keys, opt):
    """Each node alone with one torch.optim.AdamW kept across the calls ``keys``."""
    out = []
    for b, node in enumerate(nodes):
        spec.load_into(model, rows[b])
        adam = torch.optim.AdamW(model.parameters(), lr=opt.lr, betas=(opt.beta1, opt.beta2),
                                 eps=opt.eps, weight_decay=opt.weight_decay)
        for key in keys:
            idx, valid = trainer.batches(np.array([node]), np.array([key]))
            for t in range(idx.shape[1]):
                take = idx[0, t][valid[0, t]]
                if len(take) == 0:
                    continue
                adam.zero_grad()
                nn.functional.cross_entropy(model(x[take]), y[take]).backward()
                adam.step()
        out.append(spec.flatten(model))
    return torch.stack(out)


@pytest.mark.parametrize("schedule", [LocalSchedule(3, epochs=2, shuffle=True),
                                      LocalSchedule(4, epochs=None, steps=5, shuffle=True)])
def test_adamw_equals_torch_and_its_state_persists_across_activations(schedule):
    opt = AdamW(0.01, beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=0.1)
    sizes = [8, 5, 11, 0, 3]
    trainer, model, spec, x, y = _setup(sizes, schedule, opt)
    assert trainer.kernel is None                        # AdamW takes the autograd path
    nodes = np.arange(len(sizes))
    rows = torch.randn(len(sizes), spec.numel) * 0.3
    state = torch.zeros(len(sizes), AdamW.state_width(spec.numel))
    first = trainer.train(rows, nodes, keys=1, objective=LocalObjective(optimizer_state=state))
    assert torch.allclose(first.params, _reference(trainer, model, spec, x, y, rows, nodes, [1], opt),
                          atol=1e-5)
    steps = state[:, -1].clone()
    assert steps.tolist() == first.steps.tolist()        # t counts each node's own steps
    second = trainer.train(first.params, nodes, keys=2, objective=LocalObjective(optimizer_state=state))
    ref = _reference(trainer, model, spec, x, y, rows, nodes, [1, 2], opt)
    assert torch.allclose(second.params, ref, atol=1e-5)
    assert torch.equal(second.params[3], rows[3]) and torch.equal(state[3], torch.zeros_like(state[3]))
    # without kept state every activation starts fresh: not the two-call reference
    fresh = trainer.train(first.params, nodes, keys=2)
    assert not torch.allclose(fresh.params[0], ref[0], atol=1e-5)


def test_adamw_state_rows_of_the_wrong_width_are_refused():
    opt = AdamW(0.01)
    trainer, _, spec, *_ = _setup([4, 4], LocalSchedule(2, epochs=1), opt)
    bad = torch.zeros(2, spec.numel)
    with pytest.raises(ValueError, match="optimizer_state must be"):
        trainer.train(torch.zeros(2, spec.numel), np.arange(2), 1, objective=LocalObjective(optimizer_state=bad))
