"""Several groups of attackers in one run (adversary.groups): disjoint nodes drawn along the
single-attack order, one model attack crafting only its own rows, data attacks on their own
shards, and contribution scores separating each kind."""

import json

import numpy as np
import pytest
import torch

from gossamer import config
from gossamer.attacks.adversary import Adversary
from gossamer.config import ConfigError
from gossamer.sim.experiment import build_experiment
from tests.conftest import small_config


def _cfg(**adversary):
    cfg = small_config("fedavg", stop={"rounds": 4})
    cfg["partition"] = {"name": "iid", "num_nodes": 20}
    cfg["adversary"] = adversary
    return cfg


def test_groups_are_disjoint_and_the_first_is_the_single_attacks_draw():
    single = Adversary.from_config(config.validate(_cfg(attack="free_rider", fraction=0.1)), 20)
    outside = int(np.flatnonzero(~single.byzantine)[-1])     # explicit nodes are set aside first
    mixed = Adversary.from_config(config.validate(_cfg(
        attack="free_rider", fraction=0.1,
        groups=[{"attack": "label_noise", "fraction": 0.15, "params": {"rate": 0.5}},
                {"attack": "label_flip", "nodes": [outside]}])), 20)
    first, noise, flip = (g.mask for g in mixed.groups)
    assert np.array_equal(first, single.byzantine) and first.sum() == 2
    assert noise.sum() == 3 and np.flatnonzero(flip).tolist() == [outside]
    assert not (first & noise).any() and not (first & flip).any() and not (noise & flip).any()
    assert np.array_equal(mixed.byzantine, first | noise | flip)
    assert np.array_equal(mixed.crafting, first)              # only the free-riders are crafted
    assert mixed.model_attack and mixed.data_attack and mixed.attack == "free_rider"


def test_data_groups_poison_only_their_own_shards():
    exp = build_experiment(config.validate(_cfg(
        attack="label_flip", nodes=[0], groups=[{"attack": "label_noise", "nodes": [1], "params": {"rate": 1.0}}])))
    y, clean = exp.trainer.y, exp.dataset.y_train
    own = [exp.trainer.shards[i, : exp.trainer.sizes[i]] for i in range(3)]
    assert torch.equal(y[own[0]], 9 - clean[own[0]])
    assert not torch.equal(y[own[1]], clean[own[1]])             # noisy (some stay by chance)
    assert torch.equal(y[own[2]], clean[own[2]])                 # honest


@pytest.mark.parametrize("adversary, field", [
    ({"attack": "sign_flip", "fraction": 0.1, "groups": [{"attack": "free_rider", "fraction": 0.1}]},
     "adversary.groups"),
    ({"attack": "label_flip", "nodes": [3], "groups": [{"attack": "label_noise", "nodes": [3]}]},
     "adversary.groups.0.nodes")])
def test_impossible_groups_are_refused_in_one_line(adversary, field):
    with pytest.raises(ConfigError, match=field):
        build_experiment(config.validate(_cfg(**adversary)))
    cfg = small_config("dpsgd")
    cfg["adversary"] = {"attack": "label_flip", "nodes": [0], "groups": [{"attack": "label_noise", "nodes": [1]}]}
    with pytest.raises(ConfigError, match="adversary.groups"):
        build_experiment(config.validate(cfg))


def test_contribution_scores_rank_each_kind_of_attacker(tmp_path):
    from gossamer.api import run

    cfg = _cfg(attack="free_rider", nodes=[2, 11],
               groups=[{"attack": "label_flip", "nodes": [5, 17]}])
    cfg["contribution"] = {"methods": ["loo", "cosine"], "validation": 200}
    cfg["output"] = {"progress": False, "checkpoint_every": 0}
    run(cfg, out=tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())["contribution"]
    assert set(summary["auc_by_attack"]) == {"free_rider", "label_flip"}
    assert summary["auc_by_attack"]["free_rider"]["cosine"] == 1.0
    assert summary["auc_by_attack"]["label_flip"]["cosine"] == 1.0


def test_a_noise_rate_above_one_is_refused_naming_its_group():
    cfg = small_config("fedavg", adversary={"attack": "label_flip", "nodes": [0],
                                            "groups": [{"attack": "label_noise", "nodes": [1],
                                                        "params": {"rate": 1.5}}]})
    with pytest.raises(ConfigError) as err:
        build_experiment(config.validate(cfg))
    assert err.value.field == "adversary.groups.0.params" and "[0, 1]" in str(err.value)
