"""Config composition: ``extends`` (a base file, or a list), deep merge, errors naming field and file."""

import json

import pytest
import yaml

from gossamer import config
from gossamer.cli import main

BASE = {
    "name": "base", "seed": 3, "data": {"dataset": "digits"},
    "partition": {"name": "iid", "num_nodes": 4},
    "model": {"name": "mlp", "params": {"hidden": [16, 8]}},
    "algorithm": {"name": "fedavg", "params": {"client_fraction": 0.5, "weighting": "samples"}},
    "local": {"epochs": 1, "batch_size": 10, "lr": 0.05},
    "stop": {"rounds": 2}, "output": {"progress": False, "checkpoint_every": 0},
}


def _put(path, raw):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw, sort_keys=False))
    return path


def _error(path, overrides=None) -> config.ConfigError:
    with pytest.raises(config.ConfigError) as info:
        config.load(path, overrides)
    assert "\n" not in str(info.value)
    return info.value


def test_field_level_merge(tmp_path):
    _put(tmp_path / "base.yaml", BASE)
    child = _put(tmp_path / "child.yaml", {
        "extends": "base.yaml", "name": "child",
        "algorithm": {"params": {"client_fraction": 1.0}},      # merged: weighting kept
        "model": {"params": {"hidden": [4]}},                   # a list replaces, not appends
        "local": {"lr": 0.1},
    })
    cfg = config.load(child)
    assert cfg.name == "child" and cfg.seed == 3
    assert cfg.algorithm.params == {"client_fraction": 1.0, "weighting": "samples"}
    assert cfg.model.params == {"hidden": [4]}
    assert (cfg.local.epochs, cfg.local.batch_size, cfg.local.lr) == (1, 10, 0.1)
    # equal to writing the merged config out by hand
    by_hand = dict(BASE, name="child", algorithm={"name": "fedavg", "params": {
        "client_fraction": 1.0, "weighting": "samples"}}, model={"name": "mlp", "params": {"hidden": [4]}},
        local={"epochs": 1, "batch_size": 10, "lr": 0.1})
    assert config.dump(cfg) == config.dump(config.validate(by_hand))


def test_null_replaces_the_base_value(tmp_path):
    _put(tmp_path / "base.yaml", dict(BASE, algorithm={"name": "dpsgd"},
                                      topology={"name": "ring"}))
    child = _put(tmp_path / "child.yaml", "extends: base.yaml\nalgorithm: {name: fedavg}\ntopology: null\n")
    assert config.load(child).topology is None
    required = _put(tmp_path / "required.yaml", "extends: base.yaml\nlocal: null\n")
    assert _error(required).field == "local"


def test_paths_are_relative_to_the_including_file(tmp_path, monkeypatch):
    _put(tmp_path / "family/shared/base.yaml", BASE)
    _put(tmp_path / "family/shared/mid.yaml", {"extends": "base.yaml", "seed": 7})
    child = _put(tmp_path / "family/runs/child.yaml", {"extends": "../shared/mid.yaml", "name": "c"})
    monkeypatch.chdir(tmp_path)                  # neither the working directory ...
    cfg = config.load("family/runs/child.yaml")
    monkeypatch.chdir(tmp_path / "family")       # ... nor how the file is named matters
    assert config.dump(config.load(child)) == config.dump(cfg)
    assert (cfg.name, cfg.seed, cfg.partition.num_nodes) == ("c", 7, 4)


def test_a_list_of_bases_applies_in_order(tmp_path):
    _put(tmp_path / "base.yaml", BASE)
    _put(tmp_path / "big.yaml", {"partition": {"num_nodes": 8}, "seed": 1})
    _put(tmp_path / "lr.yaml", {"local": {"lr": 0.2}, "seed": 2})
    child = _put(tmp_path / "child.yaml", {"extends": ["base.yaml", "big.yaml", "lr.yaml"]})
    cfg = config.load(child)
    assert (cfg.partition.name, cfg.partition.num_nodes, cfg.local.lr, cfg.seed) == ("iid", 8, 0.2, 2)
    _put(tmp_path / "child2.yaml", {"extends": ["base.yaml", "lr.yaml", "big.yaml"]})
    assert config.load(tmp_path / "child2.yaml").seed == 1


def test_overrides_apply_after_composition(tmp_path):
    _put(tmp_path / "base.yaml", BASE)
    child = _put(tmp_path / "child.yaml", {"extends": "base.yaml", "local": {"lr": 0.1}})
    assert config.load(child, ["local.lr=0.3", "seed=9"]).local.lr == 0.3
    err = _error(child, ["local.lr=-1"])
    assert err.field == "local.lr" and str(err).endswith("(set by --set)")


@pytest.mark.parametrize("layout, cycle", [
    ({"a.yaml": "extends: a.yaml\n"}, ["a.yaml", "a.yaml"]),
    ({"a.yaml": "extends: b.yaml\n", "b.yaml": "extends: [base.yaml, a.yaml]\n"},
     ["a.yaml", "b.yaml", "a.yaml"]),
    ({"a.yaml": "extends: sub/b.yaml\n", "sub/b.yaml": "extends: ../a.yaml\n"},
     ["a.yaml", "sub/b.yaml", "sub/../a.yaml"]),
])
def test_cycles_are_refused_naming_the_chain(tmp_path, layout, cycle):
    _put(tmp_path / "base.yaml", BASE)
    for name, text in layout.items():
        _put(tmp_path / name, text)
    err = _error(tmp_path / "a.yaml")
    assert err.field == "extends" and "configs extend each other in a cycle: " in str(err)
    chain = str(err).split("cycle: ")[1].split(" -> ")
    assert chain == [str(tmp_path / name) for name in cycle]


def test_a_repeated_base_is_not_a_cycle(tmp_path):
    _put(tmp_path / "base.yaml", BASE)
    _put(tmp_path / "x.yaml", {"extends": "base.yaml", "seed": 1})
    _put(tmp_path / "y.yaml", {"extends": "base.yaml", "stop": {"rounds": 3}})
    cfg = config.load(_put(tmp_path / "c.yaml", {"extends": ["x.yaml", "y.yaml"]}))
    # each base is composed in full before the next is merged over it: y's copy of base.yaml
    # sets the seed back to 3
    assert (cfg.seed, cfg.stop.rounds) == (3, 3)


def test_depth_is_bounded(tmp_path):
    _put(tmp_path / "c0.yaml", BASE)
    for i in range(1, config.MAX_EXTENDS_DEPTH + 2):
        _put(tmp_path / f"c{i}.yaml", {"extends": f"c{i - 1}.yaml"})
    config.load(tmp_path / f"c{config.MAX_EXTENDS_DEPTH - 1}.yaml")
    err = _error(tmp_path / f"c{config.MAX_EXTENDS_DEPTH + 1}.yaml")
    assert err.field == "extends" and "levels of extends" in str(err)


def test_missing_base_names_the_field_and_the_including_file(tmp_path):
    child = _put(tmp_path / "child.yaml", "extends: nowhere.yaml\nname: c\n")
    err = _error(child)
    assert err.field == "extends" and str(child) in str(err) and "nowhere.yaml" in str(err)
    assert "No such file" in str(err)


@pytest.mark.parametrize("value", ["3", "[]", "[base.yaml, 4]", "{a: 1}", "''"])
def test_extends_must_be_paths(tmp_path, value):
    _put(tmp_path / "base.yaml", BASE)
    err = _error(_put(tmp_path / "child.yaml", f"extends: {value}\n"))
    assert err.field == "extends" and "expected a config path" in str(err)


def test_bases_are_checked_like_any_config(tmp_path):
    """Non-UTF-8 bytes, duplicate keys, bad YAML and non-mappings in a base are refused too."""
    child = _put(tmp_path / "child.yaml", "extends: base.yaml\n")
    (tmp_path / "base.yaml").write_bytes(bytes(range(256)))
    err = _error(child)
    assert err.field == "extends" and "not a UTF-8 text file" in str(err) and str(child) in str(err)
    _put(tmp_path / "base.yaml", "name: a\nseed: 1\nname: b\n")
    err = _error(child)
    assert err.field == "name" and "duplicate key at line 3 of" in str(err) and "base.yaml" in str(err)
    _put(tmp_path / "base.yaml", "data: [unclosed\n")
    assert "invalid YAML" in str(_error(child))
    _put(tmp_path / "base.yaml", "- a list\n")
    assert "must be a YAML mapping" in str(_error(child))


def test_schema_errors_name_the_field_and_the_file_that_set_it(tmp_path):
    _put(tmp_path / "base.yaml", dict(BASE, local={"epochs": 1, "batch_size": 10, "lr": 0.05, "epohcs": 2}))
    child = _put(tmp_path / "child.yaml", {"extends": "base.yaml", "local": {"lr": 0.1}})
    err = _error(child)
    assert err.field == "local.epohcs" and "unknown field" in str(err)
    assert str(err).endswith(f"(set in {tmp_path / 'base.yaml'})")
    _put(tmp_path / "base.yaml", BASE)
    _put(tmp_path / "child.yaml", {"extends": "base.yaml", "local": {"lr": -1.0}})
    err = _error(child)
    assert err.field == "local.lr" and str(err).endswith(f"(set in {child})")
    # a field the including file replaces wholesale no longer blames the base
    _put(tmp_path / "child.yaml", {"extends": "base.yaml", "algorithm": {"params": {"bogus": 1}}})
    assert str(_error(child)).startswith("algorithm.params:") and str(child) in str(_error(child))
    # an error on a field that no file set names the including file and its bases
    _put(tmp_path / "base.yaml", dict(BASE, algorithm={"name": "fedavg"}))
    _put(tmp_path / "child.yaml", {"extends": "base.yaml", "algorithm": {"name": "dpsgd"}})
    err = _error(child)
    assert err.field == "topology" and str(err).endswith(f"(in {child}, composed with {tmp_path / 'base.yaml'})")


def test_errors_of_plain_files_are_unchanged(tmp_path):
    path = _put(tmp_path / "c.yaml", dict(BASE, local={"lr": -1}))
    err = _error(path)
    assert err.field == "local.lr" and str(err) == "local.lr: Input should be greater than 0"


def test_cli_validate_reports_one_line(tmp_path, capsys):
    _put(tmp_path / "base.yaml", BASE)
    child = _put(tmp_path / "child.yaml", "extends: missing.yaml\n")
    assert main(["validate", str(child)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "extends" in err and "Traceback" not in err


def test_run_directory_holds_the_resolved_config_and_resumes(tmp_path):
    _put(tmp_path / "base.yaml", BASE)
    child = _put(tmp_path / "child.yaml", {"extends": "base.yaml", "name": "child", "stop": {"rounds": 3}})
    out = tmp_path / "run"
    assert main(["run", str(child), "--out", str(out), "--quiet", "--set", "stop.rounds=2"]) == 0
    stored = (out / "config.yaml").read_text()
    assert "extends" not in stored
    assert stored == config.dump(config.load(child, ["stop.rounds=2"]))
    assert yaml.safe_load(stored)["name"] == "child"
    # the composed file still matches the run on --resume (stop.* may change)
    assert main(["run", "--resume", str(out), str(child), "--set", "stop.rounds=3", "--quiet"]) == 0
    assert json.loads((out / "summary.json").read_text())["rounds"] == 3
