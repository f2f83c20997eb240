"""The Python API: run a config, read a run back, register your own parts (docs/api.md).

>>> import gossamer                                                    # doctest: +SKIP
>>> result = gossamer.run("examples/quickstart.yaml", overrides={"stop.rounds": 3})
>>> result.metrics[["round", "test_accuracy"]]
>>> result.summary["final_test_accuracy"]

A run made here is the run ``gossamer run`` makes: the same run directory (resolved
``config.yaml``, ``metrics.csv``, ``summary.json``, checkpoints, ``run.json``), byte-identical
metrics, and ``gossamer run --resume DIR`` continues it. Errors in the config raise
:class:`~gossamer.config.ConfigError` (one line naming the field); other user errors (paths)
raise :class:`~gossamer.errors.UserError`.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from gossamer.config import ConfigError, ExperimentConfig
from gossamer.errors import UserError
from gossamer.registry import PluginError, load_plugins

if TYPE_CHECKING:
    import pandas
    from torch import nn

T = TypeVar("T")
ConfigLike = ExperimentConfig | str | Path | Mapping[str, Any]
Overrides = Mapping[str, Any] | Sequence[str] | None

__all__ = ["RunResult", "load_config", "load_run", "run"]


# ---------------------------------------------------------------- results


@dataclass(frozen=True)
class RunResult:
    """A finished (or resumed-and-finished) run: its directory, config, summary and metrics.

    ``metrics`` is ``metrics.csv`` as a pandas DataFrame (one row per evaluation; numeric
    columns are numbers, empty cells NaN), read on first use. ``rows`` is the same table as a
    list of dicts of strings, without pandas.
    """

    run_dir: Path
    config: ExperimentConfig
    summary: dict[str, Any] = field(repr=False)

    def __repr__(self) -> str:
        acc = self.summary.get("final_test_accuracy")
        acc_text = f"{acc:.4f}" if isinstance(acc, (int, float)) else acc
        return (f"RunResult(run_dir={str(self.run_dir)!r}, algorithm={self.config.algorithm.name!r}, "
                f"rounds={self.summary.get('rounds')}, final_test_accuracy={acc_text})")

    @functools.cached_property
    def metrics(self) -> pandas.DataFrame:
        try:
            import pandas
        except ImportError:
            raise ImportError("RunResult.metrics needs pandas (pip install pandas); "
                              "RunResult.rows has the same table without it") from None
        return pandas.read_csv(self.run_dir / "metrics.csv")

    @property
    def rows(self) -> list[dict[str, str]]:
        import csv

        with (self.run_dir / "metrics.csv").open(newline="") as f:
            return list(csv.DictReader(f))

    def model(self) -> nn.Module:
        """The final model (``model.pt``) in a freshly built ``nn.Module`` of the config's model."""
        from gossamer.algorithms import ALGORITHMS
        from gossamer.data import load_dataset
        from gossamer.metrics.runstore import load_checkpoint
        from gossamer.models import build_model

        path = self.run_dir / "model.pt"
        if not path.exists():
            raise UserError(f"{self.run_dir} holds no model.pt (the run has not finished)")
        cfg = self.config
        try:
            data = load_dataset(cfg.data.dataset, **cfg.data.params)
            model = build_model(cfg.model.name, data.input_shape, data.num_classes, cfg.seed,
                                **cfg.model.params)
            algorithm = ALGORITHMS.get(cfg.algorithm.name).from_params(cfg.algorithm.params)
            if getattr(algorithm, "wraps_model", False):     # FedIns: the pool and its backbone
                model = algorithm.wrap_model(model, cfg.seed)
        except ValueError as exc:
            raise ConfigError("model", str(exc).splitlines()[0]) from None
        model.load_state_dict(load_checkpoint(path))
        return model


def load_run(run_dir: str | Path) -> RunResult:
    """A run directory written by :func:`run` or ``gossamer run``, read back."""
    from gossamer import config as config_mod

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise UserError(f"{run_dir} holds no config.yaml; is it a run directory?")
    if not (run_dir / "metrics.csv").exists():
        raise UserError(f"{run_dir} holds no metrics.csv; the run never recorded a row")
    _plugins()
    cfg = config_mod.load(run_dir / "config.yaml")
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    return RunResult(run_dir, cfg, summary)


# ---------------------------------------------------------------- running


def _plugins() -> None:
    """Load the installed plugins; a broken one is a one-line warning (its parts are then
    unknown names), so that runs using other parts go on."""
    try:
        load_plugins()
    except PluginError as exc:
        import warnings

        warnings.warn(str(exc), RuntimeWarning, stacklevel=3)


def _override_list(overrides: Overrides) -> list[str]:
    """``{"stop.rounds": 3}`` or ``["stop.rounds=3"]`` as ``--set`` strings."""
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        import yaml

        out = []
        for key, value in overrides.items():
            if not isinstance(key, str) or not key:
                raise ConfigError("overrides", f"keys are dotted field names, got {key!r}")
            # YAML text that the --set parser reads back as the same value
            out.append(f"{key}={yaml.safe_dump(value, default_flow_style=True)}")
        return out
    if isinstance(overrides, str) or not all(isinstance(s, str) for s in overrides):
        raise ConfigError("overrides", "give a dict {'stop.rounds': 3} or a list of 'key=value' strings")
    return list(overrides)


def load_config(config: ConfigLike, overrides: Overrides = None) -> ExperimentConfig:
    """A validated config from a path, a mapping (a parsed YAML file) or a config object,
    with ``overrides`` applied (a dict of dotted keys, or ``key=value`` strings)."""
    from gossamer import config as config_mod

    _plugins()
    sets = _override_list(overrides)
    if isinstance(config, ExperimentConfig):
        return config_mod.validate(config_mod.apply_overrides(config.to_dict(), sets))
    if isinstance(config, Mapping):
        return config_mod.validate(config_mod.apply_overrides(dict(config), sets))
    if isinstance(config, (str, Path)):
        return config_mod.load(config, sets)
    raise ConfigError("", f"config must be a path, a dict or an ExperimentConfig, not "
                      f"{type(config).__name__}")


_RESUME_OVERRIDABLE = ("stop.", "output.progress", "device=")


def _resume_config(run_dir: Path, config: ConfigLike | None, sets: list[str]) -> ExperimentConfig:
    """The stored config of ``run_dir`` (the CLI's ``--resume`` rules: only ``stop.*``,
    ``output.progress`` and ``device`` may change; a given config must equal the stored one)."""
    from gossamer import config as config_mod
    from gossamer.metrics.rundir import check_resume

    try:
        check_resume(run_dir, "gossamer.run(resume=True)", ("simulator",))
    except ValueError as exc:
        raise UserError(str(exc)) from None
    stored = run_dir / "config.yaml"
    if not stored.exists():
        raise UserError(f"resume: {run_dir} holds no config.yaml; is it a run directory?")
    bad = [s for s in sets if not s.startswith(_RESUME_OVERRIDABLE)]
    if bad:
        raise UserError(f"resume: override {bad[0].partition('=')[0]!r}: only stop.*, "
                        "output.progress and device may change on resume")
    cfg = config_mod.load(stored, sets)
    if config is not None:
        given = load_config(config, sets)
        if config_mod.dump(given) != config_mod.dump(cfg):
            raise UserError(f"resume: the given config differs from the one stored in {run_dir}")
    return cfg


def _fresh_dir(cfg: ExperimentConfig, out: str | Path | None) -> Path:
    if out is not None:
        path = Path(out)
        if (path / "metrics.csv").exists():
            raise UserError(f"out: {path} already holds a run; pass resume=True to continue it, "
                            "or another directory")
        return path
    from gossamer.metrics.rundir import new_run_dir

    return new_run_dir(cfg.output.dir, cfg.name)


def run(config: ConfigLike | None = None, *, out: str | Path | None = None,
        overrides: Overrides = None, resume: bool = False, progress: bool = False) -> RunResult:
    """Run an experiment in the simulator, as ``gossamer run`` does, and return its result.

    Args:
        config: a YAML path, a mapping with the same sections, or an ``ExperimentConfig``.
            May be left out with ``resume=True`` (the run directory holds its config).
        out: the run directory; ``None`` makes a fresh ``{output.dir}/{name}-{time}``.
        overrides: ``{"stop.rounds": 3, "local.lr": 0.1}`` or ``["stop.rounds=3"]``, applied
            like ``--set``.
        resume: continue the run in ``out`` from its last checkpoint (only ``stop.*`` and
            ``output.progress`` may be overridden), like ``gossamer run --resume``.
        progress: show a progress bar on stderr (off by default; nothing else is printed).
    """
    start = time.perf_counter()
    sets = _override_list(overrides)
    _plugins()
    if resume:
        if out is None:
            raise UserError("resume=True needs out=RUN_DIR, the run directory to continue")
        run_dir = Path(out)
        cfg = _resume_config(run_dir, config, sets)
    else:
        if config is None:
            raise UserError("give a config (a path, a dict or an ExperimentConfig)")
        cfg = load_config(config, sets)
        run_dir = _fresh_dir(cfg, out)
    from gossamer.sim.runner import run_simulation

    summary = run_simulation(cfg, run_dir, resume=resume, progress=progress, start_time=start)
    return RunResult(run_dir, cfg, summary)


# ---------------------------------------------------------------- registering parts


def _registrar(registry_of: Callable[[], Any], doc: str) -> Callable[..., Callable[[T], T]]:
    def register(name: str, *, replace: bool = False) -> Callable[[T], T]:
        return registry_of().register(name, replace=replace)

    register.__doc__ = doc
    return register


def _algorithms():
    from gossamer.algorithms import ALGORITHMS
    return ALGORITHMS


def _models():
    from gossamer.models import MODELS
    return MODELS


def _datasets():
    from gossamer.data import DATASETS
    return DATASETS


def _partitioners():
    from gossamer.data import PARTITIONERS
    return PARTITIONERS


def _compressors():
    from gossamer.compression import COMPRESSORS
    return COMPRESSORS


def _topologies():
    from gossamer.topology import TOPOLOGIES
    return TOPOLOGIES


def _trackers():
    from gossamer.metrics.trackers import TRACKERS
    return TRACKERS


register_algorithm = _registrar(_algorithms, """Register an algorithm class as ``name``.

    A frozen dataclass subclassing :class:`gossamer.algorithms.Algorithm` (in practice a
    built-in algorithm such as ``FedAvg``) with ``family`` (``fl``/``dl``) and ``pattern``
    (which simulator driver runs it); ``from_params`` validates ``algorithm.params``.""")
register_model = _registrar(_models, """Register a model factory as ``name``:
    ``fn(input_shape, num_classes, **model.params) -> nn.Module``.""")
register_dataset = _registrar(_datasets, """Register a dataset loader as ``name``:
    ``fn(**data.params) -> gossamer.data.Dataset``.""")
register_partitioner = _registrar(_partitioners, """Register a partitioner as ``name``:
    ``fn(labels, num_nodes, seed, **partition.params) -> list of int64 index arrays``.""")
register_compressor = _registrar(_compressors, """Register a compressor class as ``name``:
    a :class:`gossamer.compression.Compressor` subclass built as ``cls(**params)``.""")
register_topology = _registrar(_topologies, """Register a topology generator as ``name``:
    ``fn(num_nodes, seed, **topology.params) -> gossamer.topology.Topology``.""")
register_tracker = _registrar(_trackers, """Register an experiment tracker class as ``name``:
    built as ``cls(**params)`` from ``output.trackers``; it has ``on_start(run_dir, config,
    resumed)``, ``on_row(row)`` and ``on_end(summary)`` (gossamer.metrics.trackers.RunCallback).""")


def _any_size(n: int) -> None:
    """The default requirement of a user aggregator: it runs on any number of inputs."""


def register_aggregator(name: str, *, check: Callable[..., None] | None = None,
                        replace: bool = False) -> Callable[[T], T]:
    """Register an aggregation rule as ``name``:
    ``fn(updates [B, P] | [G, B, P], weights=None, *, f=0, **params) -> [P] | [G, P]``.

    ``check(n, **params)`` raises a one-line ``ValueError`` when the rule cannot run on ``n``
    inputs; it is asked once, when the experiment is built (default: any ``n``)."""
    from gossamer.aggregators import AGGREGATORS

    def decorator(fn: T) -> T:
        fn.check = check or _any_size  # type: ignore[attr-defined]
        return AGGREGATORS.register(name, replace=replace)(fn)

    return decorator


def register_attack(name: str, *, replace: bool = False, draws: bool = False, **checks: Any) -> Callable[[T], T]:
    """Register a model attack as ``name``:
    ``fn(updates [G, B, P], byzantine [G, B], *, generator, **params) -> [K, P]``.

    ``checks`` map each parameter to ``(predicate, "what it must be")``, e.g.
    ``scale=(lambda v: v > 0, "a number > 0")``; parameters without a check are refused.
    ``draws=True`` for an attack that draws from ``generator``: in decentralized runs each
    receiver's crafted models then come from a stream of its own, so they do not depend on
    which receivers share a call (nor on the number of ranks)."""
    from gossamer.attacks import core

    return core.register(name, replace=replace, draws=draws, **checks)
