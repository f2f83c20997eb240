"""Runs over registered populations: what they compute, that they resume, what they refuse."""

import json

import numpy as np
import pytest
import torch

from gossamer import config
from gossamer.algorithms import ALGORITHMS
from gossamer.config import ConfigError
from gossamer.protocols.async_fl import AsyncFLProtocol
from gossamer.sim.experiment import build_experiment
from gossamer.sim.runner import Runner
from gossamer.training.cohort import LazySizes
from gossamer.training.trainer import BatchedTrainer
from tests.conftest import run_split


def _cfg(algorithm="fedbuff", params=None, n=10**8, rounds=12, **extra):
    cfg = {
        "name": "registered", "seed": 0,
        "data": {"dataset": "synthetic", "params": {"alpha": 1.0, "beta": 1.0, "dim": 20}},
        "partition": {"name": "natural", "num_nodes": n},
        "population": {"lazy": True, "max_samples": 60, "eval_clients": 50},
        "model": {"name": "logreg"},
        "algorithm": {"name": algorithm, "params": params or {"concurrency": 40, "buffer_size": 5}},
        "local": {"steps": 3, "batch_size": 8, "lr": 0.05},
        "system": {"sample_time_s": {"dist": "lognormal", "median": 0.01, "sigma": 0.5}},
        "stop": {"rounds": rounds},
        "output": {"progress": False, "checkpoint_every": 4},
    }
    cfg.update(extra)
    return cfg


def test_a_cohort_trains_each_client_as_a_materialized_population_would():
    exp = build_experiment(config.validate(_cfg()))
    ids = np.array([77, 12_345_678, 99_999_999])
    x, y, sizes = exp.population.data(ids)
    ends = np.cumsum(sizes)
    shards = [np.arange(e - s, e) for s, e in zip(sizes, ends, strict=True)]
    inner = exp.trainer.inner
    dense = BatchedTrainer(inner.forward, exp.spec, x, y, shards, inner.schedule, inner.optimizer, 0,
                           inner.kernel)
    dense.ids = ids
    start = exp.init_params.expand(3, -1)
    keys = np.array([2, 0, 5])
    want = dense.train(start, np.arange(3), keys).params
    got = exp.trainer.train(start, ids, keys).params
    assert torch.equal(got, want)
    alone = exp.trainer.train(start[:1], ids[2:], keys[2:]).params   # another cohort, same client
    assert torch.equal(alone[0], got[2])
    assert exp.trainer.samples(ids, keys).tolist() == [24, 24, 24]


def test_the_protocol_draws_distinct_idle_clients_without_listing_the_population():
    algo = ALGORITHMS.get("fedbuff").from_params({"concurrency": 30, "buffer_size": 5})
    exp = build_experiment(config.validate(_cfg()))
    p = AsyncFLProtocol(algo, LazySizes(exp.population), 0, 0.05, exp.init_params)
    first = p.dispatch(None, 0.0)
    clients = [t.client for t in first]
    assert len(clients) == 30 == len(set(clients)) and all(0 <= c < 10**8 for c in clients)
    p.arrival(clients[0], 1.0, torch.zeros_like(exp.init_params))
    again = [t.client for t in p.dispatch(None, 1.0)]
    assert len(again) == 1 and again[0] not in set(clients[1:])
    small = AsyncFLProtocol(algo, LazySizes(type(exp.population)(32, dim=20)), 0, 0.05, exp.init_params)
    assert sorted(t.client for t in small.dispatch(None, 0.0)) != []    # 30 of 32 ids, by rejection
    assert len(small.dispatch(None, 0.0)) == 0                          # every slot taken


def test_fedbuff_over_1e8_registered_clients_runs_and_resumes_exactly(tmp_path):
    rest = run_split(_cfg(), tmp_path, split=4, total=12)
    rest.run()
    a, b = (tmp_path / d / "metrics.csv" for d in ("a", "b"))
    assert a.read_text() == b.read_text()
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["registered_clients"] == 10**8
    assert summary["accepted_updates"] == 60 and summary["participants"] == 60
    in_flight = int(a.read_text().splitlines()[-1].split(",")[9])
    assert summary["clients_reached"] == 60 + in_flight        # every task went to a new client
    assert "participation" not in summary                  # nothing of length N is reported


def test_scaffold_state_spilled_to_disk_gives_the_same_run_as_holding_it_all(tmp_path):
    params = {"client_fraction": 0.01}
    base = _cfg("scaffold", params, n=2000, rounds=6, model={"name": "mlp", "params": {"hidden": [8]}})
    numel = (20 + 1) * 8 + (8 + 1) * 10
    tight = {**base, "population": {**base["population"], "state_budget_mb": 5 * numel * 4 / 2**20,
                                    "spill_dir": str(tmp_path / "spill")}}
    for name, cfg in (("all", base), ("tight", tight)):
        runner = Runner(config.validate(cfg), tmp_path / name)
        runner.prepare(resume=False)
        runner.run()
        if name == "tight":
            store = runner.driver.client_state
            trained = json.loads((tmp_path / name / "summary.json").read_text())["participants"]
            assert len(store) == trained > 100 and store.memory_bytes <= 5 * numel * 4
            assert store.disk_bytes > 0
    assert (tmp_path / "all" / "metrics.csv").read_text() == (tmp_path / "tight" / "metrics.csv").read_text()


@pytest.mark.parametrize("change, field", [
    ({"algorithm": {"name": "dpsgd"}, "topology": {"name": "ring"}}, "population.lazy"),
    ({"algorithm": {"name": "fedfix", "params": {}}}, "population.lazy"),
    ({"adversary": {"attack": "sign_flip", "fraction": 0.1}}, "adversary"),
    ({"system": {"availability": {"model": "markov"}}}, "system.availability.model"),
    ({"system": {"sample_time_s": {"dist": "per_node", "values": [0.1]}}}, "system.sample_time_s"),
    ({"partition": {"name": "dirichlet", "num_nodes": 100}}, "partition.name"),
    ({"compression": {"uplink": {"name": "topk", "params": {"density": 0.1}}, "feedback": "ef"}},
     "compression.feedback"),
    ({"compression": {"uplink": {"name": "topk", "params": {"density": 0.1}}},
      "algorithm": {"name": "fedavg", "params": {"client_fraction": 1e-6}}}, "compression"),
])
def test_what_a_registered_population_cannot_run_is_refused_naming_the_field(change, field):
    with pytest.raises(ConfigError) as err:
        build_experiment(config.validate({**_cfg(), **change}))
    assert err.value.field == field


def test_fedbuff_over_1e8_registered_clients_uploads_compressed_bytes(tmp_path):
    """Papaya-style FedBuff with top-k uploads and no feedback: nothing is kept per client,
    every upload costs the header and the compressor's payload, and the run learns."""
    from gossamer import wire
    from gossamer.compression import build_compressor

    cfg = _cfg(rounds=12, compression={"uplink": {"name": "topk", "params": {"density": 0.1}}})
    runner = Runner(config.validate(cfg), tmp_path / "run")
    runner.prepare(resume=False)
    runner.run()
    d, numel = runner.driver, runner.exp.spec.numel
    assert d.stage_state == {}
    assert d.up_bytes == wire.HEADER_BYTES + build_compressor("topk", {"density": 0.1}).nominal_bytes(numel)
    assert d.bytes_up > 0 and d.bytes_up % d.up_bytes == 0        # whole compressed uploads
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    first, last = rows[1].split(","), rows[-1].split(",")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["server_updates"] == 12
    accuracy = rows[0].split(",").index("test_accuracy")
    assert float(last[accuracy]) > float(first[accuracy])                   # it learns


def test_a_dataset_partitioned_on_demand_over_1e7_clients_learns(tmp_path):
    cfg = {
        "name": "digits-registered", "seed": 0,
        "data": {"dataset": "digits"},
        "partition": {"name": "dirichlet", "num_nodes": 10**7, "params": {"alpha": 1.0}},
        "population": {"lazy": True, "samples": {"dist": "uniform", "low": 10, "high": 40}},
        "model": {"name": "mlp", "params": {"hidden": [32]}},
        "algorithm": {"name": "fedavg", "params": {"client_fraction": 3e-6}},
        "local": {"epochs": 2, "batch_size": 10, "lr": 0.1},
        "stop": {"rounds": 15},
        "output": {"progress": False, "checkpoint_every": 0},
    }
    runner = Runner(config.validate(cfg), tmp_path)
    runner.prepare(resume=False)
    runner.run()
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    acc = [float(r.split(",")[header.index("test_accuracy")]) for r in rows[1:]]
    loss = [float(r.split(",")[header.index("test_loss")]) for r in rows[1:]]
    assert acc[0] < 0.1 and max(acc[-4:]) > 0.75            # 30 clients a round of 10^7
    assert loss[-1] < 0.7 * loss[0]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["participants"] == 15 * 30


def test_in_epoch_mode_a_client_trains_the_same_alone_or_beside_bigger_clients():
    cfg = _cfg(local={"epochs": 2, "batch_size": 64, "lr": 0.05})
    exp = build_experiment(config.validate(cfg))
    ids = np.array([99_999_999, 3, 12_345_678])         # 42, 48 and 48 rows: batches of 64
    assert exp.population.sizes(ids).max() > exp.population.sizes(ids[:1])[0]
    start = exp.init_params.expand(3, -1)
    together = exp.trainer.train(start, ids, 4).params
    alone = exp.trainer.train(start[:1], ids[:1], 4).params
    assert torch.equal(alone[0], together[0])
