"""Experiment trackers: the runner's metric rows sent to TensorBoard, MLflow or W&B as well.

A tracker is a :class:`RunCallback`: ``on_start`` once the run directory exists (also on
resume), ``on_row`` with every metrics row (the row of ``metrics.csv``: round, simulated
seconds, bytes, accuracies), ``on_end`` with the summary. Trackers are selected with
``output.trackers: [{name: tensorboard}, {name: mlflow, params: {...}}]``, registered by name in
``TRACKERS`` (``gossamer.register_tracker`` for your own), and write only under the run
directory unless told otherwise: TensorBoard event files in ``RUN_DIR/tensorboard``, an MLflow
file store in ``RUN_DIR/mlruns``, a W&B offline run in ``RUN_DIR/wandb``. They never change
``metrics.csv``. The packages are optional: ``pip install "gossamer[tracking]"``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Protocol

from gossamer.registry import Registry


class RunCallback(Protocol):
    def on_start(self, run_dir: Path, config: dict[str, Any], resumed: bool) -> None: ...

    def on_row(self, row: dict[str, Any]) -> None: ...

    def on_end(self, summary: dict[str, Any]) -> None: ...


TRACKERS: Registry[type] = Registry("tracker")


def replay(trackers: list[RunCallback], run_dir: Path, config: dict[str, Any],
           rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    """Send a finished run's rows to ``trackers`` (runs whose rows exist only at their end:
    decentralized peers' merged metrics); numbers written as text are sent as numbers."""
    for tracker in trackers:
        tracker.on_start(run_dir, config, resumed=False)
    for row in rows:
        parsed = {key: _number(value) for key, value in row.items()}
        for tracker in trackers:
            tracker.on_row(parsed)
    for tracker in trackers:
        tracker.on_end(summary)


def _number(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            try:
                return float(value)
            except ValueError:
                return value
    return value


def _scalars(row: dict[str, Any]) -> dict[str, float]:
    """The row's numeric, finite values (``round`` is the step, not a metric)."""
    out = {}
    for key, value in row.items():
        if key == "round" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(float(value)):
            out[key] = float(value)
    return out


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"local.lr": "0.05", ...}``: a config as flat string parameters."""
    out: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)
    return out


def _need(module: str, tracker: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(f"tracker {tracker} needs the {module.split('.')[0]} package: "
                         'pip install "gossamer[tracking]"') from None


@TRACKERS.register("tensorboard")
class TensorBoardTracker:
    """Scalars per round in TensorBoard event files (``log_dir``, default RUN_DIR/tensorboard)."""

    def __init__(self, log_dir: str | None = None) -> None:
        self.log_dir = log_dir
        _need("tensorboard", "tensorboard")
        self.writer: Any = None

    def on_start(self, run_dir: Path, config: dict[str, Any], resumed: bool) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=self.log_dir or str(Path(run_dir) / "tensorboard"))
        if not resumed:
            self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in _flat(config).items()))

    def on_row(self, row: dict[str, Any]) -> None:
        for key, value in _scalars(row).items():
            self.writer.add_scalar(key, value, global_step=int(row["round"]))
        self.writer.flush()

    def on_end(self, summary: dict[str, Any]) -> None:
        self.writer.close()


@TRACKERS.register("mlflow")
class MLflowTracker:
    """One MLflow run per run directory (kept across ``--resume``): the flattened config as
    parameters, every row's scalars at step = round. ``tracking_uri`` defaults to a local SQLite
    store, RUN_DIR/mlflow.db (``mlflow ui --backend-store-uri sqlite:///RUN_DIR/mlflow.db``);
    ``experiment`` to the config's name."""

    def __init__(self, tracking_uri: str | None = None, experiment: str | None = None) -> None:
        self.mlflow = _need("mlflow", "mlflow")
        self.tracking_uri, self.experiment = tracking_uri, experiment
        self.client: Any = None
        self.run_id = ""

    def on_start(self, run_dir: Path, config: dict[str, Any], resumed: bool) -> None:
        from mlflow.tracking import MlflowClient

        run_dir = Path(run_dir)
        uri = self.tracking_uri or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
        self.client = MlflowClient(tracking_uri=uri)
        name = self.experiment or str(config.get("name", "gossamer"))
        found = self.client.get_experiment_by_name(name)
        experiment_id = found.experiment_id if found else self.client.create_experiment(name)
        id_file = run_dir / "mlflow_run_id"
        if resumed and id_file.exists():
            self.run_id = id_file.read_text().strip()
            return
        run = self.client.create_run(experiment_id, run_name=run_dir.name,
                                     tags={"gossamer.run_dir": str(run_dir.resolve())})
        self.run_id = run.info.run_id
        from gossamer.metrics.runstore import atomic_write_text

        atomic_write_text(id_file, self.run_id)
        params = _flat(config)
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):                # MLflow's batch limit
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def on_row(self, row: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        step = int(row["round"])
        metrics = [Metric(k, v, 0, step) for k, v in _scalars(row).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def on_end(self, summary: dict[str, Any]) -> None:
        self.client.set_terminated(self.run_id, "FINISHED")


@TRACKERS.register("wandb")
class WandbTracker:
    """A Weights & Biases run, offline by default (``mode``: offline, online or disabled;
    offline runs are synced later with ``wandb sync RUN_DIR/wandb/offline-run-*``)."""

    def __init__(self, mode: str = "offline", project: str | None = None) -> None:
        if mode not in ("offline", "online", "disabled"):
            raise ValueError(f"tracker wandb: mode must be offline, online or disabled, got {mode!r}")
        self.wandb = _need("wandb", "wandb")
        self.mode, self.project = mode, project
        self.run: Any = None

    def on_start(self, run_dir: Path, config: dict[str, Any], resumed: bool) -> None:
        run_dir = Path(run_dir)
        self.run = self.wandb.init(mode=self.mode, dir=str(run_dir), config=config,
                                   project=self.project or str(config.get("name", "gossamer")),
                                   name=run_dir.name, reinit="create_new",
                                   settings=self.wandb.Settings(silent=True))

    def on_row(self, row: dict[str, Any]) -> None:
        self.run.log(_scalars(row), step=int(row["round"]))

    def on_end(self, summary: dict[str, Any]) -> None:
        self.run.summary.update(_scalars(summary))
        self.run.finish()
