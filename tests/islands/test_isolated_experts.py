"""Isolated experts with a router (after McAllister et al., Decentralized Diffusion Models):
islands by label clusters, each expert FedAvg over its own nodes only, routing at inference."""

import numpy as np
import pytest
import torch

from gossamer import config
from gossamer.algorithms.fl.isolated_experts import IsolatedExperts, label_clusters, route
from gossamer.sim.drivers.experts import ExpertsDriver
from gossamer.sim.experiment import build_experiment
from tests.conftest import run_split, small_config


def _config(**params):
    cfg = small_config("isolated_experts", stop={"rounds": 4},
                       partition={"name": "shards", "num_nodes": 10, "params": {"shards_per_node": 1}})
    cfg["algorithm"] = {"name": "isolated_experts", "params": {"islands": 2, **params}}
    return cfg


def test_label_clusters_group_nodes_with_alike_labels():
    hist = np.array([[9, 1, 0, 0], [0, 0, 8, 2], [8, 2, 0, 0], [0, 0, 1, 9], [7, 3, 0, 0]])
    island = label_clusters(hist, 2, seed=0)
    assert island[0] == island[2] == island[4] and island[1] == island[3] and island[0] != island[1]
    assert IsolatedExperts(islands=2, assign="blocks").island_of(hist, 0).tolist() == [0, 0, 0, 1, 1]
    # label_blocks: main labels 0, 2, 0, 3, 0 -> order 0, 2, 4 | 1, 3 -> cut into 3 + 2
    assert IsolatedExperts(islands=2).island_of(hist, 0).tolist() == [0, 1, 0, 1, 0]
    with pytest.raises(ValueError, match="at most the 5 nodes"):
        IsolatedExperts(islands=6).island_of(hist, 0)


def test_routing_takes_the_chosen_experts():
    experts = torch.randn(3, 5, 4)                               # [K, T, C]
    sure = torch.full((5, 3), -30.0)
    sure[:, 1] = 30.0                                            # the router is sure: expert 1
    top1, mix = route(sure, experts, 2)
    assert torch.allclose(top1, torch.log_softmax(experts[1], -1))
    assert torch.allclose(mix, torch.log_softmax(experts[1], -1), atol=1e-5)
    even = torch.zeros(5, 3)
    even[:, 2] = -30.0                                           # experts 0 and 1 alike, 2 never
    _, mix = route(even, experts, 2)
    probs = torch.softmax(experts[:2], -1).mean(0)
    assert torch.allclose(mix.exp(), probs, atol=1e-5)


def test_each_expert_is_fedavg_over_its_island_only():
    exp = build_experiment(config.validate(_config(router=False)))
    driver = ExpertsDriver(exp)
    start = driver.experts[0].clone()
    driver.run_round()
    nodes = driver.nodes
    trained = exp.trainer.train(start.expand(len(nodes), -1), nodes, 1).params
    sizes = torch.from_numpy(exp.trainer.sizes[nodes].astype(np.float32))
    for k in range(2):
        mine = torch.from_numpy(driver.island == k)
        want = (sizes[mine] / sizes[mine].sum()) @ trained[mine]
        assert torch.allclose(driver.experts[k], want, atol=1e-6)
    assert set(driver.island.tolist()) == {0, 1}


def test_the_routed_ensemble_beats_every_single_expert(tmp_path):
    cfg = _config()
    cfg["stop"] = {"rounds": 12}
    cfg["output"] = {"progress": False, "checkpoint_every": 6}
    rest = run_split(cfg, tmp_path, split=6, total=12)
    rest.run()
    a, b = (tmp_path / "a/metrics.csv").read_bytes(), (tmp_path / "b/metrics.csv").read_bytes()
    assert a == b                                                # resume is byte-identical
    header, *rows = [line.split(",") for line in a.decode().splitlines()]
    last = dict(zip(header, rows[-1], strict=True))
    assert float(last["test_accuracy"]) > float(last["best_expert_accuracy"]) + 0.1
    assert float(last["topk_accuracy"]) >= float(last["best_expert_accuracy"])


def test_bad_parameters_are_one_line():
    with pytest.raises(ValueError, match="top_k"):
        IsolatedExperts(islands=2, top_k=3)
