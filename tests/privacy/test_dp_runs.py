"""DP in runs: DP-FedAvg and DP-SGD against their plain counterparts, epsilon in the metrics,
determinism and resume, one-line refusals."""

import csv
import json

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant

from gossamer import config
from gossamer.cli import main
from gossamer.sim.experiment import build_experiment
from gossamer.sim.runner import Runner
from tests.conftest import run_split, small_config

CLIENT = {"level": "client", "clip_norm": 1.0, "noise_multiplier": 1.0}
SAMPLE = {"level": "sample", "clip_norm": 1.0, "noise_multiplier": 1.0}
TARGET = {"level": "client", "clip_norm": 1.0, "target_epsilon": 4.0}


def _run(cfg, out):
    runner = Runner(config.validate(cfg), out)
    runner.prepare(resume=False)
    runner.run()
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    return json.loads((out / "summary.json").read_text()), rows, runner.driver.global_params()


def _fedavg(rounds=3, **params):
    cfg = small_config("fedavg", stop={"rounds": rounds})
    cfg["algorithm"]["params"] = params
    return cfg


def test_client_dp_without_noise_or_clipping_is_uniform_fedavg(tmp_path):
    # every client delivers, so the fixed denominator equals the number of updates averaged
    cfg = _fedavg(weighting="uniform")
    _, _, plain = _run(cfg, tmp_path / "plain")
    cfg["privacy"] = {"dp": {**CLIENT, "clip_norm": 1e6, "noise_multiplier": 0.0}}
    summary, rows, dp = _run(cfg, tmp_path / "dp")
    assert torch.allclose(plain, dp, atol=1e-5)
    assert summary["dp_epsilon"] == float("inf") and rows[-1]["epsilon"] == "inf"


def test_client_dp_divides_by_the_selected_clients_when_uploads_are_lost(tmp_path):
    from gossamer.protocols.upload import Uploads
    from gossamer.sim.drivers.sync_fl import SyncFLDriver

    cfg = _fedavg(rounds=1)
    cfg["privacy"] = {"dp": {**CLIENT, "clip_norm": 1e6, "noise_multiplier": 0.0}}
    exp = build_experiment(config.validate(cfg))
    driver = SyncFLDriver(exp)
    start = driver.state.params.clone()
    trained = np.arange(8)
    delivered = np.array([True, False] * 4)
    driver.selection = (8, 8)
    uploads = start + torch.randn(8, start.numel()) * 0.01
    up, _ = driver._through_pipeline(Uploads.of(1, trained, start, uploads), delivered,
                                     np.ones(8, dtype=np.int64))
    rows = up.rows()
    expected = (uploads[torch.from_numpy(delivered)] - start).sum(0) / 8
    assert torch.allclose(rows[0] - start, expected, atol=1e-6)


def test_client_dp_update_norm_is_bounded_by_clip_norm(tmp_path):
    cfg = _fedavg(rounds=1)
    _, _, plain = _run(cfg, tmp_path / "plain")
    exp_init = build_experiment(config.validate(cfg)).init_params
    cfg["privacy"] = {"dp": {**CLIENT, "clip_norm": 0.01, "noise_multiplier": 0.0}}
    _, _, dp = _run(cfg, tmp_path / "dp")
    assert float((plain - exp_init).norm()) > 0.1
    assert float((dp - exp_init).norm()) <= 0.01 + 1e-6


def test_dp_sgd_without_noise_or_clipping_is_sgd():
    cfg = small_config("fedavg", local={"epochs": 1, "batch_size": 16, "lr": 0.1, "momentum": 0.5})
    plain = build_experiment(config.validate(cfg))
    cfg["privacy"] = {"dp": {**SAMPLE, "clip_norm": 1e6, "noise_multiplier": 0.0}}
    dp = build_experiment(config.validate(cfg))
    rows, nodes = plain.init_params.expand(8, -1), np.arange(8)
    a, b = plain.trainer.train(rows, nodes, 1), dp.trainer.train(rows, nodes, 1)
    assert torch.allclose(a.params, b.params, atol=1e-5)
    assert torch.allclose(a.loss, b.loss, atol=1e-5) and np.array_equal(a.steps, b.steps)


def test_dp_sgd_clips_every_per_sample_gradient():
    """One step, one node, no noise: the update is lr times the mean of clipped per-sample
    gradients, computed here one sample at a time with the plain module."""
    cfg = small_config("fedavg", local={"steps": 1, "batch_size": 6, "lr": 1.0, "shuffle": False})
    cfg["privacy"] = {"dp": {**SAMPLE, "clip_norm": 0.05, "noise_multiplier": 0.0}}
    exp = build_experiment(config.validate(cfg))
    start = exp.init_params
    out = exp.trainer.train(start.unsqueeze(0), np.array([3]), 1).params[0]
    idx, _ = exp.trainer.batches(np.array([3]), np.array([1]))
    model, spec = exp.model, exp.spec
    clipped = []
    for i in idx[0, 0]:
        spec.load_into(model, start)
        model.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(exp.trainer.x[i: i + 1]), exp.trainer.y[i: i + 1])
        loss.backward()
        g = torch.cat([p.grad.flatten() for _, p in model.named_parameters()])
        assert float(g.norm()) > 0.05                                    # clipping is active
        clipped.append(g * min(1.0, 0.05 / float(g.norm())))
    assert torch.allclose(start - out, torch.stack(clipped).mean(0), atol=1e-6)


@pytest.mark.parametrize("algorithm", ["fedavg", "dpsgd"])
def test_dp_sgd_noise_has_the_configured_std(algorithm):
    # lr 1, zero-effect clipping (tiny clip): the step is almost pure noise, std z C / batch
    cfg = small_config(algorithm, local={"steps": 1, "batch_size": 16, "lr": 1.0})
    cfg["privacy"] = {"dp": {**SAMPLE, "clip_norm": 1e-3, "noise_multiplier": 50.0}}
    exp = build_experiment(config.validate(cfg))
    start = exp.init_params.reshape(-1, exp.spec.numel)[:1].expand(8, -1)
    step = start - exp.trainer.train(start, np.arange(8), 1).params
    std = float(step.double().std())
    target = 50.0 * 1e-3 / 16
    assert abs(std - target) < 0.02 * target


def test_epsilon_is_the_accountants_value(tmp_path):
    cfg = _fedavg(rounds=5, client_fraction=0.25)
    cfg["privacy"] = {"dp": {**CLIENT, "noise_multiplier": 1.3, "delta": 1e-4}}
    summary, rows, _ = _run(cfg, tmp_path / "client")
    acc = RDPAccountant()
    acc.history = [(1.3, 2 / 8, 5)]
    assert summary["dp_epsilon"] == acc.get_epsilon(1e-4) and summary["dp_delta"] == 1e-4
    assert float(rows[-1]["epsilon"]) == pytest.approx(acc.get_epsilon(1e-4), rel=1e-6)
    acc.history = [(1.3, 2 / 8, 2)]
    assert float(rows[2]["epsilon"]) == pytest.approx(acc.get_epsilon(1e-4), rel=1e-6)

    cfg = small_config("fedavg", stop={"rounds": 2})
    cfg["privacy"] = {"dp": SAMPLE}
    summary, _, _ = _run(cfg, tmp_path / "sample")
    exp = build_experiment(config.validate(cfg))
    sizes = exp.trainer.sizes
    expected = []
    for size in np.unique(sizes):
        acc = RDPAccountant()
        acc.history = [(1.0, 16 / size, 2 * -(-int(size) // 16))]
        expected.append(acc.get_epsilon(1e-5))
    assert summary["dp_epsilon"] == pytest.approx(max(expected), rel=1e-9)


@pytest.mark.parametrize("dp", [{**CLIENT, "noise": "clients"}, SAMPLE])
def test_dp_runs_are_deterministic_and_resume_exactly(tmp_path, dp):
    cfg = _fedavg(rounds=4, client_fraction=0.5)
    cfg["privacy"] = {"dp": dp}
    rest = run_split(cfg, tmp_path, split=2, total=4)
    assert rest.driver.dp_ledger.epsilon() > 0
    rest.run()
    a, b = (tmp_path / "a/metrics.csv").read_bytes(), (tmp_path / "b/metrics.csv").read_bytes()
    assert a == b and b"epsilon" in a


def test_dp_sgd_trains_decentralized_algorithms(tmp_path):
    cfg = small_config("dpsgd", stop={"rounds": 2})
    _, _, plain = _run(cfg, tmp_path / "plain")
    cfg["privacy"] = {"dp": {**SAMPLE, "clip_norm": 1e6, "noise_multiplier": 0.0}}
    _, _, same = _run(cfg, tmp_path / "same")
    cfg["privacy"] = {"dp": SAMPLE}
    _, _, noisy = _run(cfg, tmp_path / "noisy")
    assert torch.allclose(plain, same, atol=1e-4) and not torch.allclose(plain, noisy, atol=1e-3)


def test_epsilon_reuses_each_rates_curve_and_equals_opacus_bit_for_bit():
    from gossamer.privacy import epsilon

    rng = np.random.default_rng(0)
    for _ in range(12):
        history = [(float(rng.choice([0.6, 1.0, 1.3])), float(rng.choice([0.02, 0.25, 16 / 37, 1.0])),
                    int(rng.integers(1, 400))) for _ in range(int(rng.integers(1, 4)))]
        acc = RDPAccountant()
        acc.history = history
        assert epsilon(history, 1e-5) == acc.get_epsilon(1e-5)


def test_the_most_exposed_nodes_epsilon_is_found_from_bounds_with_the_same_bits():
    """Many sampling rates (a Dirichlet split): the ledger computes full curves only for rates
    whose integer-order bound could beat the largest so far, and reports opacus' maximum."""
    from gossamer.privacy import DPLedger

    sizes = np.array([7, 23, 40, 64, 97, 150, 233, 310])
    steps = 3 * -(-sizes // 16)                      # three epochs each: q and steps anti-monotone
    ledger = DPLedger("sample", 0.9, 1e-5, "rdp", sizes, 16).with_steps(steps)
    want = []
    for size, n in zip(sizes.tolist(), steps.tolist(), strict=True):
        acc = RDPAccountant()
        acc.history = [(0.9, min(1.0, 16 / size), n)]
        want.append(acc.get_epsilon(1e-5))
    assert ledger.epsilon() == max(want)


def _sample_epsilon(sizes, steps, z=1.0, batch=16, delta=1e-5) -> float:
    """The sample-level bound: per sampling rate, the most-trained node's steps composed."""
    rates = np.minimum(1.0, batch / np.maximum(sizes, 1))
    best = 0.0
    for q in np.unique(rates[steps > 0]):
        acc = RDPAccountant()
        acc.history = [(z, float(q), int(steps[rates == q].max()))]
        best = max(best, acc.get_epsilon(delta))
    return best


def test_epsilon_of_dp_sgd_outside_synchronous_fl_composes_each_nodes_own_steps(tmp_path):
    """D-PSGD: every node takes an epoch a round, so after r rounds node i has taken r times
    its epoch's steps; gossip: a node's steps are its own wake-ups'. The row's epsilon is the
    accountant's bound over those steps (the most exposed node), and grows with them."""
    from gossamer.training.trainer import local_steps

    cfg = small_config("dpsgd", stop={"rounds": 3})
    cfg["privacy"] = {"dp": SAMPLE}
    summary, rows, _ = _run(cfg, tmp_path / "dpsgd")
    assert summary["dp_epsilon"] == pytest.approx(float(rows[-1]["epsilon"]), rel=1e-6) and summary["dp_delta"] == 1e-5
    exp = build_experiment(config.validate(cfg))
    sizes = exp.trainer.sizes
    per_round = local_steps(exp.trainer.schedule, sizes)
    for r, row in enumerate(rows):
        want = _sample_epsilon(sizes, int(row["round"]) * per_round)
        assert float(row["epsilon"]) == pytest.approx(want, rel=1e-6), r
    assert float(rows[0]["epsilon"]) == 0 < float(rows[1]["epsilon"]) < float(rows[-1]["epsilon"])

    cfg = small_config("gossip", stop={"rounds": 3})
    cfg["privacy"] = {"dp": SAMPLE}
    runner = Runner(config.validate(cfg), tmp_path / "gossip")
    runner.prepare(resume=False)
    runner.run()
    rows = list(csv.DictReader((tmp_path / "gossip" / "metrics.csv").open()))
    ledger = runner.driver.steps_ledger
    assert ledger.steps.sum() > 0 and len(set(ledger.steps.tolist())) > 1     # wake-ups differ
    assert float(rows[-1]["epsilon"]) == pytest.approx(_sample_epsilon(runner.exp.trainer.sizes, ledger.steps),
                                                       rel=1e-6)
    cfg["stop"] = {"rounds": 4}                     # and a resumed run accounts the same steps
    rest = run_split(cfg, tmp_path / "split", split=2, total=4)
    rest.run()
    assert (tmp_path / "split/a/metrics.csv").read_bytes() == (tmp_path / "split/b/metrics.csv").read_bytes()


@pytest.mark.parametrize("change,field", [
    ({"privacy": {"dp": {**CLIENT, "clip_norm": -1.0}}}, "privacy.dp.clip_norm"),
    ({"privacy": {"dp": {**CLIENT, "delta": 1.0}}}, "privacy.dp.delta"),
    ({"privacy": {"dp": {**SAMPLE, "noise": "clients"}}}, "privacy.dp"),
    ({"privacy": {"dp": CLIENT}, "algorithm": {"name": "scaffold"}}, "privacy.dp.level"),
    ({"privacy": {"dp": CLIENT},
      "algorithm": {"name": "fedavg", "params": {"aggregator": "median"}}}, "privacy.dp.level"),
    ({"privacy": {"dp": CLIENT}, "algorithm": {"name": "dpsgd"}, "topology": {"name": "ring"}},
     "privacy.dp.level"),
    ({"privacy": {"dp": SAMPLE}, "local": {"epochs": 1, "batch_size": 16, "lr": 0.1, "sam_rho": 0.05}},
     "privacy.dp"),
    # asynchronous FL: noise on a buffer's sum of a fixed number of updates (fedbuff), Gaussian
    ({"privacy": {"dp": CLIENT}, "algorithm": {"name": "fedasync"}}, "privacy.dp.level"),
    ({"privacy": {"dp": {**CLIENT, "mechanism": "rqm", "noise_multiplier": None}},
      "algorithm": {"name": "fedbuff"}}, "privacy.dp.mechanism"),
    ({"privacy": {"dp": CLIENT}, "algorithm": {"name": "fedbuff"},
      "compression": {"uplink": {"name": "topk", "params": {"density": 0.1}}}}, "privacy.dp.level"),
    # target_epsilon: instead of the noise; only where the plan bounds the run from above
    ({"privacy": {"dp": {**CLIENT, "target_epsilon": 4.0}}}, "privacy.dp"),
    ({"privacy": {"dp": {**TARGET, "mechanism": "rqm"}}}, "privacy.dp"),
    ({"privacy": {"dp": TARGET}, "algorithm": {"name": "fedbuff"}}, "privacy.dp.target_epsilon"),
    ({"privacy": {"dp": TARGET}, "system": {"availability": {"model": "markov"}}}, "privacy.dp.target_epsilon"),
    ({"privacy": {"dp": {**TARGET, "level": "sample"}}, "algorithm": {"name": "fedasync"}},
     "privacy.dp.target_epsilon"),
])
def test_bad_dp_configs_are_one_line_exit_2(write_config, tmp_path, capsys, change, field):
    cfg = small_config("fedavg", stop={"rounds": 1})
    cfg.update(change)
    code = main(["run", str(write_config(cfg)), "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"{field}:" in err[0], err




def test_validate_prints_the_epsilon_a_run_will_spend(write_config, tmp_path, capsys):
    """``gossamer validate``: synchronous DP-FedAvg's epsilon after ``stop.rounds`` rounds is
    what the run's last row reports (every client available every round), and so is D-PSGD's
    sample-level one; DP-FedBuff's is a lower bound the run meets (its exposure follows the
    schedule), sample-level FL's an upper bound (a client trains only when selected)."""
    import re

    def planned(cfg) -> float:
        assert main(["validate", str(write_config(cfg))]) == 0
        line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("privacy: ")]
        assert len(line) == 1, line
        return float(re.search(r"epsilon (?:at least |at most )?([0-9.e+-]+)", line[0]).group(1))

    sync = _fedavg(rounds=6, client_fraction=0.5)
    sync["privacy"] = {"dp": CLIENT}
    buffered = small_config("fedbuff", stop={"rounds": 6}, output={"progress": False})
    buffered["algorithm"]["params"] = {"concurrency": 4, "buffer_size": 3}
    buffered["privacy"] = {"dp": CLIENT}
    dl = small_config("dpsgd", stop={"rounds": 4}, output={"progress": False}, privacy={"dp": SAMPLE})
    sampled = _fedavg(rounds=4, client_fraction=0.5)
    sampled["privacy"] = {"dp": SAMPLE}
    for name, cfg in (("sync", sync), ("buffered", buffered), ("dl", dl), ("sampled", sampled)):
        want = planned(cfg)
        assert main(["run", str(write_config(cfg)), "--out", str(tmp_path / name), "--quiet"]) == 0
        spent = float(list(csv.DictReader((tmp_path / name / "metrics.csv").open()))[-1]["epsilon"])
        if name in ("sync", "dl"):         # every client a round's rate / every node every round
            assert spent == pytest.approx(want, rel=1e-5) and want > 0
        elif name == "buffered":           # a lower bound (printed to 6 digits)
            assert spent >= want * (1 - 1e-5) and want > 0
        else:                              # an upper bound: half the clients train a round
            assert 0 < spent < want


def test_target_epsilon_plans_the_smallest_noise_that_spends_at_most_it(write_config, tmp_path, capsys):
    """``privacy.dp.target_epsilon``: DP-FedAvg's run (every client available) and D-PSGD's
    sample-level one end at most at the target and within 0.5% of it; the noise is the
    smallest to 0.1% (0.2% less spends more), is recorded in summary.json and printed by
    ``gossamer validate``, and a run given that noise is the same run, byte for byte."""
    from gossamer.privacy.plan import planned

    sync = _fedavg(rounds=5, client_fraction=0.5)
    sync["privacy"] = {"dp": TARGET}
    dl = small_config("dpsgd", stop={"rounds": 3}, output={"progress": False},
                      privacy={"dp": {**TARGET, "level": "sample", "target_epsilon": 2.0}})
    for name, cfg in (("sync", sync), ("dl", dl)):
        target = cfg["privacy"]["dp"]["target_epsilon"]
        assert main(["validate", str(write_config(cfg))]) == 0
        line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("privacy: ")]
        assert len(line) == 1 and f"target_epsilon {target:g}" in line[0], line
        summary, rows, _ = _run(cfg, tmp_path / name)
        z, spent = summary["dp_noise_multiplier"], float(rows[-1]["epsilon"])
        assert target * 0.995 <= spent <= target and f"noise multiplier {z:.6g}" in line[0]
        exp = build_experiment(config.validate(cfg))
        sizes, schedule = exp.trainer.sizes, exp.trainer.schedule
        assert planned(exp.cfg, exp.algorithm, z * 0.998, sizes, schedule).epsilon > target
        given = dict(cfg, privacy={"dp": {k: v for k, v in cfg["privacy"]["dp"].items() if k != "target_epsilon"}
                                   | {"noise_multiplier": z}})
        _run(given, tmp_path / f"{name}-given")
        assert (tmp_path / name / "metrics.csv").read_bytes() == (tmp_path / f"{name}-given" / "metrics.csv").read_bytes()
