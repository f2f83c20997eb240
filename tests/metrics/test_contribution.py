"""Contribution scores (metrics/contribution.py) on a utility known in closed form, and in a
FedAvg run with free-riders and label-flippers (the scores rank them below honest clients)."""

import itertools
import json
import math

import numpy as np
import pytest
import torch

from gossamer.metrics.contribution import (
    Contribution,
    auc,
    cosine_to_others,
    leave_one_out,
    monte_carlo_shapley,
)

TARGET = torch.tensor([1.0, -2.0, 0.5])


def utility(models: torch.Tensor) -> torch.Tensor:
    return -((models - TARGET) ** 2).sum(1)


def _setup():
    rows = torch.tensor([[1.0, -2.0, 0.5], [0.8, -1.5, 0.4], [0.0, 0.0, 0.0], [-1.0, 2.0, -0.5]])
    weights = torch.tensor([0.4, 0.3, 0.2, 0.1])
    return rows, weights, torch.zeros(3)


def _value(rows, weights, start, coalition, partial=True):
    """U(S) written out: the partial aggregate start + sum_S w_i (x_i - start), or the mean."""
    if not coalition:
        return float(utility(start[None])[0])
    members = list(coalition)
    if partial:
        model = start + sum(weights[i] * (rows[i] - start) for i in members)
    else:
        model = sum(weights[i] * rows[i] for i in members) / sum(weights[i] for i in members)
    return float(utility(model[None])[0])


@pytest.mark.parametrize("partial", [True, False])
def test_leave_one_out_is_the_utility_lost_without_each_client(partial):
    rows, weights, start = _setup()
    loo = leave_one_out(rows, weights, start, utility, partial)
    everyone = set(range(4))
    for i in range(4):
        expected = (_value(rows, weights, start, everyone, partial)
                    - _value(rows, weights, start, everyone - {i}, partial))
        assert loo[i].item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert loo[3] < 0 < loo[0]                     # the opposite client hurts, the exact one helps
    if partial:
        assert loo[2].item() == 0.0                # a free-rider adds nothing to any coalition


@pytest.mark.parametrize("partial", [True, False])
def test_shapley_over_every_order_is_the_exact_shapley_value(partial):
    rows, weights, start = _setup()
    orders = np.array(list(itertools.permutations(range(4))))
    values, used = monte_carlo_shapley(rows, weights, start, utility, orders, partial=partial)
    n = 4
    for i in range(n):
        exact = 0.0
        others = [j for j in range(n) if j != i]
        for size in range(n):
            for subset in itertools.combinations(others, size):
                weight = math.factorial(size) * math.factorial(n - size - 1) / math.factorial(n)
                exact += weight * (_value(rows, weights, start, set(subset) | {i}, partial)
                                   - _value(rows, weights, start, set(subset), partial))
        assert values[i].item() == pytest.approx(exact, rel=1e-5, abs=1e-6)
    total = _value(rows, weights, start, set(range(n))) - _value(rows, weights, start, set())
    assert values.sum().item() == pytest.approx(total, rel=1e-5)        # efficiency
    assert used == 2 + len(orders) * n


def test_truncation_skips_coalitions_and_keeps_most_of_the_value():
    rows, weights, start = _setup()
    rows = torch.cat([rows[:2], rows[3:], start.expand(12, -1)])       # 12 free-riders
    weights = torch.full((15,), 1 / 15)
    orders = np.stack([np.random.default_rng(i).permutation(15) for i in range(6)])
    full, n_full = monte_carlo_shapley(rows, weights, start, utility, orders)
    cut, n_cut = monte_carlo_shapley(rows, weights, start, utility, orders, truncation=0.05)
    assert n_cut < n_full
    total = _value(rows, weights, start, set(range(15))) - _value(rows, weights, start, set())
    assert full.sum().item() == pytest.approx(total, rel=1e-5)
    assert abs(cut.sum().item() - total) <= 0.05 * abs(total) + 1e-6


def test_cosine_is_zero_for_a_free_rider_and_negative_against_the_others():
    rows, weights, start = _setup()
    cos = cosine_to_others(rows, weights, start)
    assert cos[2].item() == 0.0                                         # uploads the start model
    assert cos[3] < 0 < cos[0]


def test_auc_and_totals():
    assert auc(np.array([3.0, 2.0]), np.array([1.0, 2.0])) == pytest.approx(0.875)
    assert auc(np.array([]), np.array([1.0])) is None
    scorer = Contribution(["loo", "cosine", "shapley"], 6, 0, utility, permutations=4)
    rows, weights, start = _setup()
    first = scorer.observe(1, np.array([0, 1, 2, 3]), rows, weights, start)
    scorer.observe(2, np.array([0, 1, 2, 5]), rows, weights, start)
    means = scorer.means()
    assert np.isnan(means["loo"][4]) and scorer.counts.tolist() == [2, 2, 2, 1, 0, 1]
    assert means["loo"][3] == pytest.approx(first["loo"][3].item())
    again = Contribution(["loo", "cosine", "shapley"], 6, 0, utility, permutations=4)
    again.load_state_dict(scorer.state_dict())
    assert again.table() == scorer.table()
    with pytest.raises(ValueError, match="unknown contribution methods"):
        Contribution(["banzhaf"], 6, 0, utility)


def _run_config(attack, seed=0):
    from tests.conftest import small_config

    cfg = small_config("fedavg", stop={"rounds": 5}, seed=seed)
    cfg["partition"] = {"name": "iid", "num_nodes": 10}
    cfg["local"] = {"epochs": 1, "batch_size": 16, "lr": 0.1}
    cfg["adversary"] = {"attack": attack, "nodes": [2, 7]}
    cfg["contribution"] = {"methods": ["loo", "cosine", "shapley"], "permutations": 6,
                           "validation": 200}
    cfg["output"] = {"progress": False, "checkpoint_every": 1}
    return cfg


@pytest.mark.parametrize("attack", ["free_rider", "label_flip"])
def test_a_fedavg_run_ranks_free_riders_and_label_flippers_lowest(tmp_path, attack):
    from gossamer.api import run

    result = run(_run_config(attack), out=tmp_path / attack)
    summary = json.loads((tmp_path / attack / "summary.json").read_text())
    scores = summary["contribution"]
    assert scores["rounds_scored"] == 5 and scores["evaluations_per_round"] > 10
    table = (tmp_path / attack / "contributions.csv").read_text().splitlines()
    assert table[0] == "client,rounds,flagged,loo,cosine,shapley" and len(table) == 11
    assert [line.split(",")[2] for line in table[1:]] == ["0", "0", "1", "0", "0", "0", "0", "1", "0", "0"]
    assert scores["auc_flagged_below_others"]["shapley"] == 1.0
    assert scores["auc_flagged_below_others"]["loo"] == 1.0
    assert result.summary["contribution"] == scores


def test_scores_resume_bit_identically(tmp_path):
    from tests.conftest import run_split

    rest = run_split(_run_config("free_rider"), tmp_path, split=2, total=5)
    rest.run()
    assert (tmp_path / "a/contributions.csv").read_bytes() == (tmp_path / "b/contributions.csv").read_bytes()


def test_contribution_is_refused_outside_synchronous_fl():
    from gossamer import config
    from gossamer.config import ConfigError
    from gossamer.sim.experiment import build_experiment
    from tests.conftest import small_config

    cfg = small_config("dpsgd", contribution={"methods": ["loo"]})
    with pytest.raises(ConfigError, match="contribution"):
        build_experiment(config.validate(cfg))
