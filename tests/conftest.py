import os
import signal
import sys
import tempfile
from pathlib import Path

# The tests train tiny models: one intra-op thread per process is 2-3x faster on a small CI
# machine than threads competing for its cores (runtime processes set their own count).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# the layer-by-layer executor keeps its timed conv choices per machine: not in the home
# directory of whoever runs the tests (a fresh folder per test process)
os.environ.setdefault("GOSSAMER_CACHE_DIR", tempfile.mkdtemp(prefix="gossamer-test-cache-"))

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def small_config(algorithm: str = "fedavg", **overrides) -> dict:
    """A tiny, fast experiment on scikit-learn digits."""
    cfg = {
        "name": f"tiny-{algorithm}", "seed": 0,
        "data": {"dataset": "digits"},
        "partition": {"name": "iid", "num_nodes": 8},
        "model": {"name": "mlp", "params": {"hidden": [16]}},
        "algorithm": {"name": algorithm},
        "local": {"epochs": 1, "batch_size": 16, "lr": 0.1},
        "stop": {"rounds": 6},
        "output": {"progress": False, "checkpoint_every": 2},
    }
    if algorithm in ("dpsgd", "gossip"):
        cfg["topology"] = {"name": "ring"}
    if algorithm == "gossip":
        cfg["algorithm"]["params"] = {"mode": "push_pull", "period_s": 1.0}
        cfg["local"] = {"steps": 2, "batch_size": 16, "lr": 0.1}
        cfg["system"] = {"sample_time_s": {"dist": "uniform", "low": 0.001, "high": 0.01}}
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def pytest_collection_modifyitems(config, items):
    """Slow tests first (a stable sort: the order is otherwise unchanged, and the same on every
    xdist worker): with load scheduling the long runtime tests then overlap the short ones
    instead of starting last and forming the run's tail. The other real-process tests
    (tests/runtime/) come next."""
    items.sort(key=lambda item: (item.get_closest_marker("slow") is None,
                                 "tests/runtime/" not in item.nodeid.replace("\\", "/")))


@pytest.fixture
def write_config(tmp_path):
    def _write(cfg: dict, name: str = "config.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(cfg))
        return path
    return _write


def gossamer_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "gossamer", *args]


def interruptible() -> None:
    """``preexec_fn`` of a child a test interrupts with SIGINT: Python's default handler for it,
    even where the tests themselves run with SIGINT ignored (started with ``&`` or nohup)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def subprocess_env(**extra: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def run_split(cfg: dict, tmp_path: Path, *, split: int, total: int):
    """Run ``cfg`` for ``total`` rounds uninterrupted into ``tmp_path/a``, and into
    ``tmp_path/b`` first for ``split`` rounds, then a new runner resumed from that checkpoint
    up to ``total``. Returns that resumed runner prepared but not run, so a test can inspect
    what it restored before ``rest.run()``; compare ``a/`` and ``b/`` afterwards."""
    from gossamer import config
    from gossamer.sim.runner import Runner

    for out, rounds in ((tmp_path / "a", total), (tmp_path / "b", split)):
        runner = Runner(config.validate({**cfg, "stop": {**cfg.get("stop", {}), "rounds": rounds}}), out)
        runner.prepare(resume=False)
        runner.run()
    rest = Runner(config.validate({**cfg, "stop": {**cfg.get("stop", {}), "rounds": total}}), tmp_path / "b")
    rest.prepare(resume=True)
    return rest


@pytest.fixture
def registries_restored():
    """Every registry as it was before the test: parts a test registers do not leak into the
    contract tests over every registered part that may run later in the same process."""
    from gossamer.aggregators import AGGREGATORS
    from gossamer.algorithms import ALGORITHMS
    from gossamer.attacks import ATTACKS
    from gossamer.compression import COMPRESSORS
    from gossamer.data import DATASETS, PARTITIONERS
    from gossamer.metrics.trackers import TRACKERS
    from gossamer.models import MODELS
    from gossamer.topology import TOPOLOGIES

    registries = [AGGREGATORS, ALGORITHMS, ATTACKS, COMPRESSORS, DATASETS, PARTITIONERS, TRACKERS,
                  MODELS, TOPOLOGIES]
    saved = [dict(r._items) for r in registries]
    yield
    for registry, items in zip(registries, saved, strict=True):
        registry._items.clear()
        registry._items.update(items)
