"""Each class of config error exits with code 2 and one line naming the field."""

import pytest
import yaml

from gossamer import config
from gossamer.cli import main

BASE = {
    "name": "t", "data": {"dataset": "digits"}, "partition": {"name": "iid", "num_nodes": 4},
    "model": {"name": "logreg"}, "algorithm": {"name": "fedavg"}, "stop": {"rounds": 1},
    "output": {"progress": False, "checkpoint_every": 0},
}


def _write(tmp_path, raw):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _with(**sections):
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in BASE.items()}
    for key, value in sections.items():
        raw[key] = value
    return raw


CASES = [
    (_with(extra_section={}), "extra_section: unknown field"),
    (_with(partition={"name": "iid", "num_nodes": "many"}), "partition.num_nodes"),
    (_with(partition={"name": "iid", "num_nodes": 0}), "partition.num_nodes"),
    (_with(algorithm={"name": "fedsomething"}), "algorithm.name: unknown algorithm 'fedsomething'"),
    (_with(data={"dataset": "imagenet"}), "data.dataset: unknown dataset"),
    (_with(algorithm={"name": "fedavg", "params": {"client_fraction": 2}}), "algorithm.params"),
    (_with(algorithm={"name": "dpsgd"}), "topology: algorithm dpsgd needs a topology"),
    (_with(algorithm={"name": "dpsgd"}, topology={"name": "moebius"}), "topology.name: unknown topology"),
    (_with(local={"lr": -1}), "local.lr"),
    (_with(system={"sample_time_s": {"dist": "uniform", "low": 1}}), "system.sample_time_s"),
    (_with(stop={"rounds": 1, "target_accuracy": 1.5}), "stop.target_accuracy"),
]


@pytest.mark.parametrize("raw,expected", CASES)
def test_schema_errors_name_the_field(tmp_path, capsys, raw, expected):
    code = main(["validate", str(_write(tmp_path, raw))])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert expected in err and "\n" not in err and "Traceback" not in err


SEMANTIC = [
    (_with(partition={"name": "iid", "num_nodes": 5000}), "partition.num_nodes: 5000 clients but only"),
    (_with(algorithm={"name": "dpsgd"}, topology={"name": "edge_list", "params": {"path": "EDGES"}}),
     "topology: edge_list graph with 4 nodes is disconnected"),
    (_with(model={"name": "cnn"}), "model.params"),
    (_with(data={"dataset": "mnist", "params": {"root": "/no/such/dir"}}), "data.params"),
]


@pytest.mark.parametrize("raw,expected", SEMANTIC)
def test_semantic_errors_name_the_field(tmp_path, capsys, raw, expected):
    edges = tmp_path / "edges.txt"
    edges.write_text("0 1\n2 3\n")
    if raw.get("topology", {}).get("params", {}).get("path") == "EDGES":
        raw["topology"]["params"]["path"] = str(edges)
    code = main(["validate", str(_write(tmp_path, raw))])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert expected in err and "\n" not in err


def test_overrides_and_yaml_errors(tmp_path, capsys):
    cfg = config.load(_write(tmp_path, BASE), ["partition.num_nodes=8", "local.shuffle=false"])
    assert cfg.partition.num_nodes == 8 and cfg.local.shuffle is False
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    assert main(["validate", str(bad)]) == 2
    assert "invalid YAML" in capsys.readouterr().err
    assert main(["validate", str(tmp_path / "missing.yaml")]) == 2
    assert main(["validate", str(_write(tmp_path, BASE)), "--set", "nokey"]) == 2


def test_resolved_config_round_trips():
    cfg = config.validate(BASE)
    again = config.validate(yaml.safe_load(config.dump(cfg)))
    assert again == cfg
