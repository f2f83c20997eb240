"""The Python API (gossamer.run, load_run, register_*) and plugins (docs/api.md)."""

import subprocess
import sys
import textwrap

import pytest
import torch

import gossamer
from gossamer import cli, registry
from gossamer.metrics.rundir import mode_of
from tests.conftest import ROOT, small_config, subprocess_env

pytestmark = pytest.mark.usefixtures("registries_restored")


def tiny(**changes) -> dict:
    cfg = small_config(stop={"rounds": 3}, output={"progress": False, "checkpoint_every": 1})
    cfg.update(changes)
    return cfg


@pytest.fixture
def plugins_reset():
    """Plugins are loaded once per process: forget them before and after the test."""
    registry.reset_plugins()
    yield
    registry.reset_plugins()


def fake_distribution(site, name: str, entry_points: dict[str, str], modules: dict[str, str]):
    """What ``pip install`` leaves on sys.path: modules and a dist-info with entry_points.txt."""
    dist = site / f"{name}-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[gossamer.plugins]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items()))
    for module, text in modules.items():
        (site / f"{module}.py").write_text(textwrap.dedent(text))


def test_import_gossamer_is_cheap():
    code = "import sys, gossamer; print(sorted(m for m in ('torch', 'pydantic', 'gossamer.api') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_run_writes_the_run_the_cli_writes(tmp_path, write_config):
    path = write_config(tiny())
    assert cli.main(["run", str(path), "--out", str(tmp_path / "cli"), "--set", "stop.rounds=2",
                     "--quiet"]) == 0
    result = gossamer.run(path, out=tmp_path / "api", overrides={"stop.rounds": 2})
    for name in ("metrics.csv", "config.yaml", "run.json"):
        assert (tmp_path / "api" / name).read_bytes() == (tmp_path / "cli" / name).read_bytes(), name
    assert result.run_dir == tmp_path / "api"
    assert result.summary["rounds"] == 2 and result.config.stop.rounds == 2
    table = result.metrics
    assert list(table["round"]) == [0, 1, 2]
    assert table["test_accuracy"].dtype.kind == "f" and table["bytes_up"].dtype.kind == "i"
    assert result.rows[-1]["round"] == "2"
    assert "rounds=2" in repr(result)


def test_config_forms_and_override_forms_agree(tmp_path, write_config):
    from gossamer.config import dump

    raw = tiny()
    as_dict = gossamer.load_config(raw, {"stop.rounds": 5, "model.params.hidden": [8],
                                         "data.dataset": "digits", "local.lr": 0.2})
    as_list = gossamer.load_config(write_config(raw), ["stop.rounds=5", "model.params.hidden=[8]",
                                                       "local.lr=0.2"])
    as_object = gossamer.load_config(gossamer.load_config(raw), {"stop.rounds": 5,
                                                                 "model.params.hidden": [8],
                                                                 "local.lr": 0.2})
    assert dump(as_dict) == dump(as_list) == dump(as_object)
    assert as_dict.model.params == {"hidden": [8]} and as_dict.local.lr == 0.2
    assert raw["stop"]["rounds"] == 3                        # the caller's dict is not changed


def test_config_errors_are_one_line(tmp_path):
    with pytest.raises(gossamer.ConfigError, match=r"^local.lrr: unknown field$"):
        gossamer.run(tiny(), out=tmp_path / "x", overrides={"local.lrr": 1})
    with pytest.raises(gossamer.ConfigError, match="unknown model 'nope'"):
        gossamer.run(tiny(model={"name": "nope"}), out=tmp_path / "x")
    with pytest.raises(gossamer.ConfigError, match="overrides"):
        gossamer.run(tiny(), overrides="stop.rounds=3")
    with pytest.raises(gossamer.ConfigError, match="cannot read config"):
        gossamer.run(tmp_path / "missing.yaml")
    assert not (tmp_path / "x").exists()


def test_load_run_round_trips(tmp_path):
    result = gossamer.run(tiny(), out=tmp_path / "run")
    again = gossamer.load_run(tmp_path / "run")
    assert again.summary == result.summary
    assert again.config == result.config
    assert again.metrics.equals(result.metrics)
    model = again.model()
    with torch.no_grad():
        assert model(torch.zeros(2, 64)).shape == (2, 10)
    with pytest.raises(gossamer.UserError, match="no config.yaml"):
        gossamer.load_run(tmp_path)


def test_out_holding_a_run_is_refused_and_resume_continues(tmp_path):
    straight = gossamer.run(tiny(stop={"rounds": 4}), out=tmp_path / "a")
    gossamer.run(tiny(stop={"rounds": 2}), out=tmp_path / "b")
    with pytest.raises(gossamer.UserError, match="already holds a run; pass resume=True"):
        gossamer.run(tiny(), out=tmp_path / "b")
    with pytest.raises(gossamer.UserError, match="only stop.*, output.progress and device"):
        gossamer.run(out=tmp_path / "b", resume=True, overrides={"local.lr": 1.0})
    resumed = gossamer.run(out=tmp_path / "b", resume=True, overrides={"stop.rounds": 3})
    assert resumed.summary["rounds"] == 3
    assert mode_of(tmp_path / "b") == "simulator"
    # the CLI resumes a run the API made, and ends where the straight run did
    assert cli.main(["run", "--resume", str(tmp_path / "b"), "--set", "stop.rounds=4", "--quiet"]) == 0
    assert (tmp_path / "b" / "metrics.csv").read_bytes() == straight.run_dir.joinpath(
        "metrics.csv").read_bytes()


def test_user_aggregator_and_model_from_a_config_dict(tmp_path):
    calls = []

    @gossamer.register_aggregator("test_api_coordinate_max_abs_min")
    def smallest_update(updates, weights=None, *, f=0):
        calls.append(tuple(updates.shape))
        index = updates.norm(dim=-1).argmin(dim=-1, keepdim=True)      # [G] or [1]
        return torch.take_along_dim(updates, index.unsqueeze(-1), dim=-2).squeeze(-2)

    @gossamer.register_model("test_api_linear")
    def linear(input_shape, num_classes, bias=True):
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, num_classes, bias=bias))

    cfg = tiny(model={"name": "test_api_linear", "params": {"bias": False}},
               algorithm={"name": "fedavg",
                          "params": {"aggregator": "test_api_coordinate_max_abs_min"}})
    result = gossamer.run(cfg, out=tmp_path / "run")
    assert calls and calls[0][0] == 8                       # 8 client updates per round
    assert result.summary["num_params"] == 64 * 10
    assert result.metrics["test_accuracy"].notna().all()
    assert isinstance(result.model()[1], torch.nn.Linear)


def test_user_algorithm_and_partitioner(tmp_path):
    from dataclasses import dataclass

    import numpy as np

    from gossamer.algorithms import FedAvg

    @gossamer.register_algorithm("test_api_fedavg_half")
    @dataclass(frozen=True)
    class HalfFedAvg(FedAvg):
        client_fraction: float = 0.5

    @gossamer.register_partitioner("test_api_round_robin")
    def round_robin(labels, num_nodes, seed):
        return [np.arange(i, len(labels), num_nodes) for i in range(num_nodes)]

    result = gossamer.run(tiny(algorithm={"name": "test_api_fedavg_half"},
                               partition={"name": "test_api_round_robin", "num_nodes": 8}),
                          out=tmp_path / "run")
    assert set(result.metrics["participants"].iloc[1:]) == {4}


def test_duplicate_registration_is_a_clear_error():
    with pytest.raises(ValueError, match=r"^model 'mlp' is already registered \(by gossamer.models.zoo\); "
                                         r"choose another name, or pass replace=True"):
        gossamer.register_model("mlp")(lambda input_shape, num_classes: None)

    def first(input_shape, num_classes):
        return torch.nn.Flatten()

    def second(input_shape, num_classes):
        return torch.nn.Identity()

    gossamer.register_model("test_api_twice")(first)
    with pytest.raises(ValueError, match="already registered"):
        gossamer.register_model("test_api_twice")(second)
    gossamer.register_model("test_api_twice", replace=True)(second)      # a notebook cell rerun
    from gossamer.models import MODELS

    assert MODELS.get("test_api_twice") is second


def test_plugin_entry_points_register_parts(tmp_path, monkeypatch, plugins_reset, capsys):
    site = tmp_path / "site"
    site.mkdir()
    fake_distribution(site, "test_api_plugin", {"mod": "test_api_plugin_mod",
                                                "fn": "test_api_plugin_fn:register"}, {
        "test_api_plugin_mod": """
            import gossamer

            @gossamer.register_aggregator("test_api_plugin_mean")
            def mean(updates, weights=None, *, f=0):
                return updates.mean(dim=-2)
            """,
        "test_api_plugin_fn": """
            import numpy as np
            import gossamer

            def register():
                @gossamer.register_partitioner("test_api_plugin_halves")
                def halves(labels, num_nodes, seed):
                    return np.array_split(np.arange(len(labels)), num_nodes)
            """})
    monkeypatch.syspath_prepend(str(site))
    assert registry.load_plugins() == ["fn", "mod"]
    from gossamer.aggregators import AGGREGATORS
    from gossamer.data import PARTITIONERS

    assert "test_api_plugin_mean" in AGGREGATORS and "test_api_plugin_halves" in PARTITIONERS
    assert registry.load_plugins() == ["fn", "mod"]                     # once per process
    assert cli.main(["list"]) == 0
    assert "plugins: fn, mod" in capsys.readouterr().out


def test_plugin_loads_on_a_registry_miss(tmp_path, monkeypatch, plugins_reset):
    site = tmp_path / "site"
    site.mkdir()
    fake_distribution(site, "test_api_lazy", {"lazy": "test_api_lazy_mod"}, {
        "test_api_lazy_mod": """
            import gossamer

            @gossamer.register_dataset("test_api_lazy_data")
            def data():
                raise NotImplementedError
            """})
    monkeypatch.syspath_prepend(str(site))
    from gossamer.data import DATASETS

    assert DATASETS.get("test_api_lazy_data").__module__ == "test_api_lazy_mod"


def test_broken_plugin_is_one_line(tmp_path, monkeypatch, plugins_reset, capsys):
    site = tmp_path / "site"
    site.mkdir()
    fake_distribution(site, "test_api_broken", {"broken": "test_api_broken_mod"}, {
        "test_api_broken_mod": "import no_such_module_anywhere\n"})
    monkeypatch.syspath_prepend(str(site))
    line = ("plugin 'broken' (test_api_broken_mod) failed to load: ModuleNotFoundError: "
            "No module named 'no_such_module_anywhere'")
    with pytest.raises(gossamer.PluginError) as err:
        registry.load_plugins()
    assert str(err.value) == line
    with pytest.raises(gossamer.PluginError):                            # the same, not re-imported
        registry.load_plugins()
    from gossamer.models import MODELS

    with pytest.raises(KeyError, match="failed to load"):               # the miss says why
        MODELS.get("test_api_from_broken")
    # the CLI warns in one line and goes on; the API warns and runs
    assert cli.main(["list"]) == 0
    captured = capsys.readouterr()
    assert captured.err == f"gossamer: warning: {line}\n" and "model: " in captured.out
    with pytest.warns(RuntimeWarning, match="plugin 'broken'"):
        gossamer.load_config(tiny())


def test_broken_plugin_in_a_fresh_cli_process(tmp_path, write_config):
    site = tmp_path / "site"
    site.mkdir()
    fake_distribution(site, "test_api_raises", {"raises": "test_api_raises_mod:register"}, {
        "test_api_raises_mod": """
            def register():
                raise RuntimeError("the plugin\\nis broken")
            """})
    env = subprocess_env()
    env["PYTHONPATH"] = f"{env['PYTHONPATH']}{site}"
    path = write_config(tiny())
    out = subprocess.run([sys.executable, "-m", "gossamer", "validate", str(path)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("ok: ")
    assert out.stderr == ("gossamer: warning: plugin 'raises' (test_api_raises_mod:register) "
                          "failed to load: RuntimeError: the plugin is broken\n")


def test_quickstart_api_example_runs():
    script = ROOT / "examples" / "api" / "quickstart_api.py"
    out = subprocess.run([sys.executable, str(script)], env=subprocess_env(), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "test_accuracy" in out.stdout and "final accuracy" in out.stdout
    assert "with api_coordinate_median" in out.stdout and out.stderr == ""
