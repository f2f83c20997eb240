"""``model.compile``: training forwards through torch.compile, or one line saying why not."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gossamer import config
from gossamer.experiment import build
from gossamer.models import ParamSpec, functional, make_stacked_forward


def _cfg(**model) -> dict:
    return {"seed": 3,
            "data": {"dataset": "random", "params": {"shape": [6], "num_classes": 3, "train": 80, "test": 20}},
            "model": {"name": "mlp", "params": {"hidden": [8]}, "forward": "vmap", **model},
            "partition": {"num_nodes": 8}, "algorithm": {"name": "fedavg", "params": {"client_fraction": 0.5}},
            "local": {"batch_size": 5, "lr": 0.1}, "stop": {"rounds": 2}, "output": {"progress": False}}


def test_compile_is_a_config_choice_and_names_itself_in_the_path():
    exp = build(config.validate(_cfg(compile=True)))    # (torch.compile is lazy: nothing compiles yet)
    forward = exp.trainer.forward
    assert forward.path == {"forward": "vmap", "compile": "inductor"}
    assert forward.compiled is not None and forward.linears == {}     # no low-rank weights
    assert build(config.validate(_cfg())).trainer.forward.compiled is None


def test_compiled_training_matches_eager(monkeypatch):
    """One compilation (one shape): the training forward and its gradient through the
    compiled graph equal eager's up to float rounding; evaluation (no autograd) stays eager.
    Traced by dynamo and AOTAutograd as inductor's are, then run by aot_eager: inductor's C++
    build of even this model takes ~10 s on a fresh machine, which this suite cannot spend
    (benchmarks/compile.py runs inductor)."""
    monkeypatch.setattr(functional, "COMPILE_BACKEND", "aot_eager")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    spec = ParamSpec.from_module(model)
    eager = make_stacked_forward(model, spec, torch.zeros(6), "vmap")
    compiled = make_stacked_forward(model, spec, torch.zeros(6), "vmap", compile=True)
    rows = spec.flatten(model).reshape(1, -1).repeat(4, 1) + 0.01 * torch.randn(4, spec.numel)
    x, y = torch.randn(4, 5, 6), torch.randint(0, 3, (4, 5))

    def step(forward):
        p = rows.clone().requires_grad_(True)
        loss = F.cross_entropy(forward(spec.views(p), x).reshape(-1, 3), y.reshape(-1))
        loss.backward()
        return loss.detach(), p.grad

    (la, ga), (lb, gb) = step(eager), step(compiled)
    assert torch.allclose(la, lb, atol=1e-6) and torch.allclose(ga, gb, atol=1e-6)
    with torch.no_grad():                                # evaluation: the eager forward, same bits
        assert torch.equal(compiled(spec.views(rows), x), eager(spec.views(rows), x))


def test_compile_needs_a_cpp_compiler_on_the_cpu(monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(config.ConfigError, match="model.compile on the CPU needs a C\\+\\+ compiler"):
        build(config.validate(_cfg(compile=True)))


def test_a_model_run_layer_by_layer_is_refused_in_one_line():
    cfg = _cfg(compile=True)
    cfg["model"] = {"name": "cnn", "compile": True}
    cfg["data"]["params"]["shape"] = [1, 12, 12]
    with pytest.raises(config.ConfigError, match="model.compile: this model runs layer by layer"):
        build(config.validate(cfg))


def test_the_sharded_simulator_refuses_compile():
    from gossamer.sim.sharded import check_config

    with pytest.raises(config.ConfigError, match="model.compile: not with the sharded simulator"):
        check_config(config.validate(_cfg(compile=True)))
