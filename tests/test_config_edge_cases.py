"""Config problems users ran into: each exits with code 2 and one line naming the field,
never a traceback, a hang, an allocation failure or a silent NaN run."""

import gzip

import pytest
import yaml

from gossamer import checks, config, experiment
from gossamer.algorithms import ALGORITHMS
from gossamer.cli import main
from tests.conftest import ROOT

BASE = {
    "name": "t", "data": {"dataset": "digits"}, "partition": {"name": "iid", "num_nodes": 4},
    "model": {"name": "logreg"}, "algorithm": {"name": "fedavg"}, "stop": {"rounds": 1},
    "output": {"progress": False, "checkpoint_every": 0},
}
GB = 10**9


def _validate(tmp_path, capsys, raw=None, *, text=None, data=None, overrides=()):
    path = tmp_path / "c.yaml"
    if data is not None:
        path.write_bytes(data)
    else:
        path.write_text(text if text is not None else yaml.safe_dump(raw or BASE))
    code = main(["validate", str(path), *[a for o in overrides for a in ("--set", o)]])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("gossamer: config error: "), err
    return err.removeprefix("gossamer: config error: ")


@pytest.fixture
def memory(monkeypatch):
    """Pretend the machine has 16 GB available, so the estimates do not depend on this one."""
    monkeypatch.setattr(checks, "available_memory_bytes", lambda: 16 * GB)


# 1. files that are not UTF-8 YAML text
@pytest.mark.parametrize("data, expected", [
    (bytes(range(256)) * 4, "not a UTF-8 text file (byte 0x80 at offset 128)"),
    (yaml.safe_dump(BASE).encode("utf-16"), "the file is UTF-16 encoded; save the config as UTF-8"),
    (b"name: t\x00\n", "holds NUL bytes"),
    (gzip.compress(yaml.safe_dump(BASE).encode()), "not a UTF-8 text file"),
])
def test_binary_and_utf16_files(tmp_path, capsys, data, expected):
    assert expected in _validate(tmp_path, capsys, data=data)


def test_utf8_with_bom_is_read():
    assert config.parse_yaml("\ufeffname: t\n".encode("utf-8-sig").decode("utf-8-sig")) == {"name": "t"}


# 7. duplicate keys
@pytest.mark.parametrize("text, expected", [
    ("name: a\nname: b\n", "name: duplicate key at line 2 of"),
    ("local:\n  lr: 0.1\n  epochs: 1\n  lr: 0.2\n", "local.lr: duplicate key at line 4"),
    ("faults:\n  events:\n  - {at_s: 1, action: remove, at_s: 2, count: 1}\n",
     "faults.events.0.at_s: duplicate key at line 3"),
])
def test_duplicate_keys_are_refused_with_their_line(tmp_path, capsys, text, expected):
    rest = yaml.safe_dump({k: v for k, v in BASE.items() if k != "name"})
    message = _validate(tmp_path, capsys, text=text + rest)
    assert message.startswith(expected) and "(first at line" in message


def test_merge_keys_still_override():
    text = "base: &b {lr: 0.1, epochs: 1}\nlocal:\n  <<: *b\n  lr: 0.2\n"
    assert config.parse_yaml(text)["local"] == {"lr": 0.2, "epochs": 1}


# 2. and 3. infinite and NaN numbers, absurd budgets
@pytest.mark.parametrize("override, expected", [
    ("local.epochs=.inf", "local.epochs: Input should be a finite number"),
    ("local.epochs=1e12", "local.epochs: 1e+12 epochs means over 1e+07 local steps per node per round"),
    ("local.steps=100000000000", "local.steps: 1e+11 steps means over 1e+07 local steps"),
    ("local.lr=.inf", "local.lr: Input should be a finite number"),
    ("local.lr=.nan", "local.lr: Input should be a finite number"),
    ("algorithm.params.server_lr=.nan", "algorithm.params: server_lr: Input should be a finite number"),
    ("algorithm.params.server_lr=.inf", "algorithm.params: server_lr: Input should be a finite number"),
    ("system.latency_s.value=.inf", "system.latency_s.value: Input should be a finite number"),
    ("system.latency_s={dist: per_node, values: [1, .nan, 1, 1]}", "system.latency_s.values.1: Input"),
    ("system.bandwidth_up_Bps={dist: uniform, low: 1, high: .inf}", "system.bandwidth_up_Bps.high"),
    ("stop.max_sim_time_s=.inf", "stop.max_sim_time_s: Input should be a finite number"),
])
def test_non_finite_numbers_and_absurd_budgets(tmp_path, capsys, override, expected):
    assert expected in _validate(tmp_path, capsys, overrides=[override])


def test_every_algorithm_refuses_non_finite_params():
    for name in ALGORITHMS.names():
        algo = ALGORITHMS.get(name)
        fields = getattr(algo, "__dataclass_fields__", {})
        floats = [f for f, spec in fields.items() if str(spec.type) in ("float", "float | None")]
        for field in floats:
            with pytest.raises(ValueError, match="finite"):
                algo.from_params({field: float("nan")})


def test_local_step_budget_uses_the_largest_shard(tmp_path, capsys):
    message = _validate(tmp_path, capsys, overrides=["local.epochs=100000", "local.batch_size=1"])
    assert message.startswith("local.epochs: 100,000 epochs x 360 batches of the largest shard "
                              "(360 samples, batch_size 1) = 36,000,000 local steps")


# 4. corrupt IDX files: see tests/data/test_vision_files.py

# 5. model sizes
@pytest.mark.parametrize("hidden, expected", [
    ([-5], "model.params: hidden[0] must be an int >= 1, got -5"),
    ([0], "model.params: hidden[0] must be an int >= 1, got 0"),
    ([1.5], "model.params: hidden[0] must be an int, got 1.5"),
    (64, "model.params: hidden must be a list of layer widths"),
    ([100000000], "model.params: mlp with hidden [100000000] (7,500,000,010 parameters) needs about "
                  "30.0 GB, more than the 16.0 GB of memory available"),
])
def test_mlp_hidden_sizes(tmp_path, capsys, memory, hidden, expected):
    raw = {**BASE, "model": {"name": "mlp", "params": {"hidden": hidden}}}
    assert _validate(tmp_path, capsys, raw).startswith(expected)


# 6. secure aggregation
@pytest.mark.parametrize("algorithm, threshold, most", [
    ({"name": "fedavg"}, 10, 4),
    ({"name": "fedavg", "params": {"client_fraction": 0.5}}, 3, 2),
    ({"name": "fedavg", "params": {"client_fraction": 0.25}}, 0.5, 1),    # max(2, ...) > 1 client
])
def test_secure_aggregation_threshold_above_the_clients_per_round(tmp_path, capsys, algorithm,
                                                                 threshold, most):
    raw = {**BASE, "algorithm": algorithm, "privacy": {"secure_aggregation": {"threshold": threshold}}}
    message = _validate(tmp_path, capsys, raw)
    assert message.startswith("privacy.secure_aggregation.threshold: ")
    assert f"a round has at most {most} clients" in message


def test_secure_aggregation_threshold_that_fits_is_accepted(tmp_path, capsys):
    raw = {**BASE, "privacy": {"secure_aggregation": {"threshold": 4}}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["validate", str(path)]) == 0


# 8. populations that cannot fit in memory, refused before the graph is built
def test_million_node_dpsgd_is_refused_before_building_the_graph(tmp_path, capsys, memory, monkeypatch):
    def no_graph(*args, **kwargs):
        raise AssertionError("the graph was built")

    monkeypatch.setattr("gossamer.topology.make_topology", no_graph)
    raw = {**BASE, "partition": {"name": "iid", "num_nodes": 1_000_000, "params": {"relay_fraction": 0.999}},
           "model": {"name": "mlp", "params": {"hidden": [64]}}, "algorithm": {"name": "dpsgd"},
           "topology": {"name": "random_regular", "params": {"degree": 4}}}
    message = _validate(tmp_path, capsys, raw)
    assert message == ("partition.num_nodes: 1,000,000 nodes x 4,810 parameters x 2 model copies "
                       "(sync_dl, 38.5 GB) + a random_regular graph of ~2,000,000 edges (1.0 GB) needs "
                       "about 39.5 GB, more than the 16.0 GB of memory available; use fewer nodes or a "
                       "smaller model")


def test_a_runtime_process_holding_one_model_is_not_refused_for_the_population(memory):
    cfg = config.validate({**BASE, "partition": {"name": "iid", "num_nodes": 1_000_000},
                           "model": {"name": "mlp", "params": {"hidden": [64]}},
                           "algorithm": {"name": "dpsgd"}, "topology": {"name": "ring"}})
    algorithm = ALGORITHMS.get("dpsgd").from_params({})
    with pytest.raises(config.ConfigError, match="x 2 model copies"):
        experiment._check_population_memory(cfg, algorithm, 4810)
    experiment._check_population_memory(cfg, algorithm, 4810, population=False)


def test_complete_graph_too_large_is_refused(tmp_path, capsys, memory):
    raw = {**BASE, "partition": {"name": "iid", "num_nodes": 100_000, "params": {"relay_fraction": 0.99}},
           "algorithm": {"name": "dpsgd"}, "topology": {"name": "complete"}}
    message = _validate(tmp_path, capsys, raw)
    assert message.startswith("partition.num_nodes: ") and "complete graph of ~4,999,950,000 edges" in message


@pytest.mark.parametrize("path, nodes", [
    ("examples/dpsgd_1000.yaml", 2000),                  # benchmarks/dpsgd_scale.py's largest
    ("benchmarks/configs/gossip_10k.yaml", 10_000),
    ("examples/gossip.yaml", None),
    ("examples/quickstart.yaml", None),
])
def test_configs_that_run_today_are_not_refused(monkeypatch, path, nodes):
    monkeypatch.setattr(checks, "available_memory_bytes", lambda: 4 * GB)   # a small laptop
    overrides = [f"partition.num_nodes={nodes}"] if nodes else []
    cfg = config.load(ROOT / path, overrides)
    algorithm = ALGORITHMS.get(cfg.algorithm.name).from_params(cfg.algorithm.params)
    experiment._check_population_memory(cfg, algorithm, 50_890)        # MNIST MLP [64]


def test_available_memory_is_known_here():
    have = checks.available_memory_bytes()
    assert have is None or have > 0


# other one-line gaps
@pytest.mark.parametrize("override, expected", [
    ("data.dataset.x=1", "data.dataset.x: dataset is not a section"),
    ("=1", "--set: expected key=value"),
    ("partition.num_nodes=1e6", "partition.num_nodes"),
    ("local=5", "local:"),
])
def test_bad_overrides(tmp_path, capsys, override, expected):
    assert expected in _validate(tmp_path, capsys, overrides=[override])


def test_deeply_nested_yaml(tmp_path, capsys):
    assert "YAML nested too deeply" in _validate(tmp_path, capsys, text="[" * 100_000)
