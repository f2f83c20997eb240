"""DiLoCo (Douillard et al. 2023, Algorithm 1): equal, round by round, to a hand-written loop
of per-worker torch.optim.AdamW kept across outer steps and an outer torch.optim.SGD with
Nesterov momentum on the pseudo-gradient."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from gossamer import config
from gossamer.algorithms.fl.server_opt import ServerOptimizer
from gossamer.config import ConfigError
from gossamer.sim.drivers.sync_fl import SyncFLDriver
from gossamer.sim.experiment import build_experiment
from tests.conftest import run_split, small_config

INNER = {"optimizer": "adamw", "lr": 0.01, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8,
         "weight_decay": 0.1, "steps": 4, "batch_size": 8}


def _config():
    return small_config("diloco", local=dict(INNER), stop={"rounds": 3},
                        partition={"name": "iid", "num_nodes": 4})


@pytest.mark.parametrize("name", ["nesterov", "adamw"])
def test_server_steps_are_torch_optimizers_on_the_pseudo_gradient(name):
    """nesterov: torch.optim.SGD(nesterov=True); adamw: torch.optim.AdamW, both stepping with
    the gradient ``-delta``."""
    if name == "nesterov":
        opt = ServerOptimizer("nesterov", lr=0.7, beta1=0.9)
        make = lambda p: torch.optim.SGD(p, lr=0.7, momentum=0.9, nesterov=True)      # noqa: E731
    else:
        opt = ServerOptimizer("adamw", lr=0.01, beta1=0.9, beta2=0.95, tau=1e-8, weight_decay=0.1)
        make = lambda p: torch.optim.AdamW(p, lr=0.01, betas=(0.9, 0.95), eps=1e-8,   # noqa: E731
                                           weight_decay=0.1)
    x = torch.randn(5)
    ref = nn.Parameter(x.clone())
    torch_opt = make([ref])
    buffers: dict = {}
    for _ in range(5):
        delta = torch.randn(5)
        x, buffers = opt.step(x, delta, buffers)
        ref.grad = -delta
        torch_opt.step()
        assert torch.allclose(x, ref.detach(), atol=1e-6)


def test_server_weight_decay_is_adamw_only():
    with pytest.raises(ValueError, match="server_weight_decay"):
        ServerOptimizer("sgd", weight_decay=0.1)


def test_diloco_equals_a_hand_written_reference_over_outer_steps():
    exp = build_experiment(config.validate(_config()))
    driver = SyncFLDriver(exp)
    trainer, spec, model = exp.trainer, exp.spec, exp.model
    workers = np.arange(exp.num_nodes)
    global_model = nn.Parameter(driver.state.params.clone())
    outer = torch.optim.SGD([global_model], lr=0.7, momentum=0.9, nesterov=True)
    replicas = [copy.deepcopy(model) for _ in workers]
    inner = [torch.optim.AdamW(m.parameters(), lr=INNER["lr"], betas=(INNER["beta1"], INNER["beta2"]),
                               eps=INNER["eps"], weight_decay=INNER["weight_decay"]) for m in replicas]
    for r in range(1, 4):
        driver.run_round()
        idx, valid = trainer.batches(workers, np.full(len(workers), r))
        trained = []
        for b, (m, adam) in enumerate(zip(replicas, inner, strict=True)):
            spec.load_into(m, global_model.detach())
            for t in range(idx.shape[1]):
                take = idx[b, t][valid[b, t]]
                adam.zero_grad()
                nn.functional.cross_entropy(m(trainer.x[take]), trainer.y[take]).backward()
                adam.step()
            trained.append(spec.flatten(m))
        global_model.grad = global_model.detach() - torch.stack(trained).mean(0)   # uniform
        outer.step()
        assert torch.allclose(driver.state.params, global_model.detach(), atol=1e-5), r
    # the inner state stays on the workers: steps counted, nothing of it uploaded
    assert driver.client_state.get(np.arange(len(workers)))[:, -1].tolist() == [12.0] * len(workers)
    assert driver.bytes_up == 3 * len(workers) * exp.message_bytes


def test_diloco_requires_adamw_and_resumes_bit_identically(tmp_path):
    cfg = _config()
    cfg["local"] = {**INNER, "optimizer": "sgd"}
    with pytest.raises(ConfigError, match="local.optimizer"):
        build_experiment(config.validate(cfg))
    cfg = _config()
    cfg["output"] = {"progress": False, "checkpoint_every": 1}
    rest = run_split(cfg, tmp_path, split=2, total=3)
    assert rest.driver.client_state.get(np.arange(4))[:, -1].tolist() == [8.0] * 4      # the inner state came back
    rest.run()
    assert (tmp_path / "a/metrics.csv").read_bytes() == (tmp_path / "b/metrics.csv").read_bytes()
