"""Dense layers trained as a shared start plus each node's low-rank steps (``model.dense``;
models/layerwise.py ``LowRankWeight``, the trainer's ``_low_rank``): the same SGD as stepping
every node's weight, taken only where it is that SGD."""

import numpy as np
import pytest
import torch
from torch import nn

from gossamer import config
from gossamer.algorithms.local import LocalObjective
from gossamer.models import ParamSpec, build_model, make_stacked_forward
from gossamer.training.trainer import SGD, BatchedTrainer, LocalSchedule
from tests.training.test_trainer import _sequential  # the per-node torch.optim.SGD reference

SIZES = [8, 5, 11, 0, 3]


def _setup(schedule, opt, shape=(1, 12, 12), hidden=64, channels=(2, 4)):
    g = torch.Generator().manual_seed(0)
    total = sum(SIZES)
    x = torch.randn(total, *shape, generator=g)
    y = torch.randint(0, 5, (total,), generator=g)
    model = build_model("cnn_fedavg", shape, 5, seed=1, channels=list(channels), hidden=hidden)
    spec = ParamSpec.from_module(model)
    forward = make_stacked_forward(model, spec, x[0], "layerwise", "grouped")     # (no timing probe)
    assert forward.path["forward"] == "layerwise"
    bounds = np.cumsum([0, *SIZES])
    shards = [np.arange(bounds[i], bounds[i + 1]) for i in range(len(SIZES))]
    return BatchedTrainer(forward, spec, x, y, shards, schedule, opt, seed=3), model, spec, x, y


def _start(spec, model):
    """The model's own initialization, moved a little (seeded: the same start on every run)."""
    noise = torch.randn(spec.numel, generator=torch.Generator().manual_seed(5))
    return spec.flatten(model) + 0.01 * noise


@pytest.mark.parametrize("schedule", [LocalSchedule(4, epochs=1, shuffle=False),
                                      LocalSchedule(3, epochs=2, shuffle=True)])
def test_low_rank_dense_layers_train_as_torch_does(schedule):
    trainer, model, spec, x, y = _setup(schedule, SGD(0.1))
    trainer.dense = "low_rank"
    nodes = np.arange(len(SIZES))
    start = _start(spec, model)
    shared = start.expand(len(nodes), -1)
    idx, _ = trainer.batches(nodes, np.full(len(nodes), 7))
    chosen = trainer._low_rank(shared, LocalObjective(), idx.shape)
    assert [spec.names[k] for k in chosen] == ["classifier.0.weight", "classifier.2.weight"]
    result = trainer.train(shared, nodes, keys=7)
    ref = _sequential(trainer, model, spec, x, y, shared, nodes, 7, SGD(0.1))
    assert torch.allclose(result.params, ref, atol=1e-5)
    assert not torch.allclose(result.params, shared, atol=1e-3)        # it trained
    assert torch.equal(result.params[3], start)            # a node without data does not move
    trainer.dense = "stacked"
    stacked = trainer.train(shared, nodes, keys=7)
    assert torch.allclose(result.params, stacked.params, atol=1e-6)
    assert torch.allclose(result.loss, stacked.loss, atol=1e-6)


def test_low_rank_means_need_no_node_weight_and_a_group_is_its_own():
    """FedAvg's mean (and the sharded simulator's group sums) from the factors: equal to the
    weighted rows, and a group's sum has the same bits whatever else its call trains."""
    trainer, model, spec, *_ = _setup(LocalSchedule(4, epochs=1, shuffle=True), SGD(0.1))
    trainer.dense = "low_rank"
    nodes = np.arange(len(SIZES))
    start = _start(spec, model)
    weights = torch.tensor([0.1, 0.3, 0.2, 0.0, 0.4])
    rows = trainer.train(start.expand(5, -1), nodes, keys=2).params
    mean = trainer.train(start.expand(5, -1), nodes, keys=2, mean_weights=weights).mean
    assert torch.allclose(mean, weights @ rows, atol=1e-6)
    groups = trainer.train(start.expand(5, -1), nodes, keys=2, mean_weights=weights,
                           mean_groups=np.array([0, 2, 5])).mean
    alone = trainer.train(start.expand(3, -1), nodes[2:], keys=2, mean_weights=weights[2:],
                          mean_groups=np.array([0, 3])).mean
    assert torch.equal(groups[1], alone[0])
    assert torch.allclose(groups.sum(0), mean, atol=1e-6)


def test_auto_takes_low_rank_only_where_the_factors_are_small():
    """``4 r (in + out) <= in * out``: FedAvg's CNN's 3136 x 512 layer with 5 steps of 10
    samples, not its 512 x 10 output layer, and neither after 200 steps."""
    trainer, _, spec, *_ = _setup(LocalSchedule(10, epochs=1), SGD(0.1), shape=(1, 28, 28), hidden=512,
                                  channels=(32, 64))
    shared = torch.zeros(spec.numel).expand(4, -1)
    chosen = trainer._low_rank(shared, LocalObjective(), (4, 5, 10))
    assert {spec.names[k]: r for k, r in chosen.items()} == {"classifier.0.weight": 50}
    assert trainer._low_rank(shared, LocalObjective(), (4, 200, 10)) == {}
    trainer.dense = "stacked"
    assert trainer._low_rank(shared, LocalObjective(), (4, 5, 10)) == {}


@pytest.mark.parametrize("opt, prox", [(SGD(0.1, weight_decay=0.05), 0.0), (SGD(0.1), 0.3),
                                       (SGD(0.1, weight_decay=0.05), 0.3)], ids=["decay", "fedprox", "both"])
def test_weight_decay_and_a_pull_toward_the_start_keep_the_low_rank_form(opt, prox):
    """Weight decay and FedProx's proximal term toward the start (the global model) scale
    the past steps and the start's coefficient; nodes without a batch at a step do not move
    (unequal shards). Equal to stepping every node's weight, rows and mean."""
    trainer, model, spec, *_ = _setup(LocalSchedule(3, epochs=2, shuffle=True), opt)
    nodes = np.arange(len(SIZES))
    start = _start(spec, model)
    objective = LocalObjective(prox, start) if prox else LocalObjective()
    shared = start.expand(5, -1)
    idx, _ = trainer.batches(nodes, np.full(5, 4))
    trainer.dense = "low_rank"
    assert len(trainer._low_rank(shared, objective, idx.shape)) == 2
    weights = torch.tensor([0.1, 0.3, 0.2, 0.0, 0.4])
    low = trainer.train(shared, nodes, keys=4, objective=objective)
    low_mean = trainer.train(shared, nodes, keys=4, objective=objective, mean_weights=weights).mean
    trainer.dense = "stacked"
    stacked = trainer.train(shared, nodes, keys=4, objective=objective)
    assert torch.allclose(low.params, stacked.params, atol=1e-6)
    assert torch.allclose(low_mean, weights @ stacked.params, atol=1e-6)
    assert torch.equal(low.params[3], start)               # no data: no step, no decay
    plain, *_ = _setup(LocalSchedule(3, epochs=2, shuffle=True), SGD(0.1))
    assert not torch.allclose(low.params, plain.train(shared, nodes, keys=4).params, atol=1e-4)   # the terms act


@pytest.mark.parametrize("change", ["momentum", "own_starts", "prox_elsewhere", "own_anchors", "correction",
                                    "frozen"])
def test_low_rank_is_not_taken_where_it_would_not_be_plain_sgd_from_one_start(change):
    opt = SGD(0.1, momentum=0.9) if change == "momentum" else SGD(0.1)
    trainer, _, spec, *_ = _setup(LocalSchedule(4, epochs=1), opt)
    trainer.dense = "low_rank"
    start = torch.zeros(spec.numel)
    rows = torch.zeros(5, spec.numel) if change == "own_starts" else start.expand(5, -1)
    objective = {"prox_elsewhere": LocalObjective(0.1, torch.ones(spec.numel)),
                 "own_anchors": LocalObjective(0.1, torch.zeros(5, spec.numel)),
                 "correction": LocalObjective(correction=start),
                 "frozen": LocalObjective(frozen=("features.0.weight",))}.get(change, LocalObjective())
    assert trainer._low_rank(rows, objective, (5, 3, 4)) == {}
    # one node is its own shared start (a runtime client trains one row)
    if change == "own_starts":
        assert trainer._low_rank(rows[:1], objective, (1, 3, 4)) != {}


def test_model_dense_is_a_config_choice():
    cfg = config.validate({"model": {"name": "cnn", "dense": "low_rank"}})
    assert cfg.model.dense == "low_rank"
    with pytest.raises(config.ConfigError, match="model.dense"):
        config.validate({"model": {"name": "cnn", "dense": "sparse"}})


class _Twice(nn.Module):
    """One dense layer applied twice: its weight is not trained as low-rank factors."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(72, 72)
        self.out = nn.Linear(72, 5)

    def forward(self, x):
        h = torch.flatten(torch.relu(self.conv(x)), 1)             # [n, 2 * 6 * 6]
        return self.out(self.fc(torch.relu(self.fc(h))))


def test_a_dense_layer_that_runs_twice_keeps_stacked_weights():
    from gossamer.models.layerwise import layerwise_forward

    forward, why = layerwise_forward(_Twice(), torch.randn(1, 8, 8), conv="grouped")
    assert forward is not None, why
    assert set(forward.linears) == {"out.weight"}


def test_low_rank_training_names_the_device_of_every_tensor_it_makes():
    """With torch's default device set to ``meta``, a tensor made without naming its device
    would land there and fail the call (tests/test_devices.py does this for whole runs)."""
    trainer, model, spec, *_ = _setup(LocalSchedule(4, epochs=1), SGD(0.1))
    trainer.dense = "low_rank"
    start = _start(spec, model)
    want = trainer.train(start.expand(5, -1), np.arange(5), keys=1, mean_weights=torch.full((5,), 0.2))
    with torch.device("meta"):
        got = trainer.train(start.expand(5, -1), np.arange(5), keys=1, mean_weights=torch.full((5,), 0.2, device="cpu"))
    assert got.mean.device.type == "cpu" and torch.equal(got.mean, want.mean)


def test_summary_names_the_layers_trained_low_rank(tmp_path):
    from gossamer import api

    cfg = {"data": {"dataset": "random", "params": {"shape": [1, 12, 12], "num_classes": 5,
                                                    "train": 60, "test": 20}},
           "model": {"name": "cnn_fedavg", "params": {"channels": [2, 4], "hidden": 64},
                     "conv": "grouped", "dense": "low_rank"},
           "partition": {"num_nodes": 6}, "algorithm": {"name": "fedavg", "params": {"client_fraction": 0.5}},
           "stop": {"rounds": 2}, "output": {"progress": False}}
    low = api.run(cfg, out=tmp_path / "low").summary
    assert low["low_rank_layers"] == ["classifier.0.weight", "classifier.2.weight"]
    cfg["model"]["dense"] = "stacked"
    assert "low_rank_layers" not in api.run(cfg, out=tmp_path / "stacked").summary
