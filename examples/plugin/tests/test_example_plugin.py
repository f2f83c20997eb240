"""The example plugin: its parts run from a config, and its entry point reaches the CLI.

Nothing is installed: the entry point is simulated by a ``*.dist-info`` directory (what pip
would write) on a temporary ``PYTHONPATH``.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gossamer

PLUGIN_ROOT = Path(__file__).resolve().parents[1]
SRC = PLUGIN_ROOT.parents[1] / "src"


def config(**changes) -> dict:
    cfg = {"name": "plugin", "seed": 0,
           "data": {"dataset": "digits"},
           "partition": {"name": "iid", "num_nodes": 8},
           "model": {"name": "example_mlp", "params": {"hidden": 16}},
           "algorithm": {"name": "fedavg",
                         "params": {"aggregator": "example_clipped_mean",
                                    "aggregator_params": {"tau": 5.0}}},
           "local": {"epochs": 1, "batch_size": 16, "lr": 0.1},
           "stop": {"rounds": 4},
           "output": {"progress": False, "checkpoint_every": 0}}
    cfg.update(changes)
    return cfg


def test_clipped_mean_clips_then_averages(plugin):
    x = torch.tensor([[3.0, 4.0], [0.3, 0.4]])                  # norms 5 and 0.5
    out = plugin.clipped_mean(x, tau=1.0)
    assert torch.allclose(out, torch.tensor([(0.6 + 0.3) / 2, (0.8 + 0.4) / 2]))
    groups = torch.stack([x, 2 * x])                            # [G, B, P] -> [G, P]
    assert torch.allclose(plugin.clipped_mean(groups, tau=1.0)[0], out)


def test_parts_run_from_a_config(tmp_path, plugin):
    result = gossamer.run(config(), out=tmp_path / "run")
    assert result.summary["rounds"] == 4
    assert result.metrics["test_accuracy"].iloc[-1] > 0.3       # it learns
    assert isinstance(result.model(), plugin.SmallMLP)


def test_bad_parameter_is_one_line(tmp_path, plugin):
    bad = config(algorithm={"name": "fedavg", "params": {"aggregator": "example_clipped_mean",
                                                         "aggregator_params": {"tau": -1}}})
    with pytest.raises(gossamer.ConfigError, match="tau must be > 0"):
        gossamer.run(bad, out=tmp_path / "bad")


def test_installed_entry_point_reaches_the_cli(tmp_path):
    tomllib = pytest.importorskip("tomllib")                   # Python 3.11+
    dist = tmp_path / "site" / "gossamer_example_plugin-0.1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: gossamer-example-plugin\n"
                                   "Version: 0.1.0\n")
    project = tomllib.loads((PLUGIN_ROOT / "pyproject.toml").read_text())["project"]
    entries = project["entry-points"]["gossamer.plugins"]       # what pip would write
    (dist / "entry_points.txt").write_text(
        "[gossamer.plugins]\n" + "".join(f"{k} = {v}\n" for k, v in entries.items()))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(SRC), str(tmp_path / "site"), str(PLUGIN_ROOT)]))
    out = subprocess.run([sys.executable, "-m", "gossamer", "list"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "example_mlp" in out.stdout and "example_clipped_mean" in out.stdout
    assert "plugins: example" in out.stdout
    assert out.stderr == ""
