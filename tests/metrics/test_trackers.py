"""Trackers write every metrics row to TensorBoard, MLflow and W&B (offline), read back here."""

import csv
import struct

import pytest

from gossamer import config
from gossamer.cli import main
from tests.conftest import small_config

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")
pytest.importorskip("wandb")


def _run(tmp_path, trackers):
    cfg = small_config("fedavg", stop={"rounds": 3})
    cfg["output"]["trackers"] = trackers
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "c.yaml"
    path.write_text(config.dump(config.validate(cfg)))
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out), "--quiet"]) == 0
    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    return out, [int(r["round"]) for r in rows], [float(r["test_accuracy"]) for r in rows]


def _wandb_records(path):
    """The protobuf records of a W&B run file (LevelDB log format after a 7-byte header)."""
    data, pos, block, out, part = path.read_bytes(), 7, 32768, [], b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:                      # block trailer: padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        payload, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            out.append(payload)
        elif kind == 2:
            part = payload
        elif kind == 3:
            part += payload
        elif kind == 4:
            out.append(part + payload)
    return out


def test_every_row_reaches_tensorboard_mlflow_and_wandb(tmp_path):
    out, rounds, accuracy = _run(tmp_path, [{"name": "tensorboard"}, {"name": "mlflow"},
                                            {"name": "wandb"}])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("test_accuracy")
    assert [s.step for s in scalars] == rounds
    assert [s.value for s in scalars] == pytest.approx(accuracy, abs=1e-6)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    run_id = (out / "mlflow_run_id").read_text().strip()
    history = client.get_metric_history(run_id, "test_accuracy")
    assert [m.step for m in history] == rounds
    assert [m.value for m in history] == pytest.approx(accuracy, abs=1e-6)
    run = client.get_run(run_id)
    assert run.data.params["local.lr"] == "0.1" and run.info.status == "FINISHED"

    import json

    from wandb.proto import wandb_internal_pb2 as pb

    [path] = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    logged = []
    for data in _wandb_records(path):
        record = pb.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            items = {i.key or ".".join(i.nested_key): json.loads(i.value_json)
                     for i in record.history.item}
            logged.append((items["_step"], items["test_accuracy"]))
    assert [s for s, _ in logged] == rounds
    assert [a for _, a in logged] == pytest.approx(accuracy, abs=1e-6)


def test_trackers_leave_the_metrics_unchanged_and_bad_ones_are_one_line(tmp_path, capsys):
    with_tb, _, _ = _run(tmp_path / "a", [{"name": "tensorboard"}])
    without, _, _ = _run(tmp_path / "b", [])
    assert (with_tb / "metrics.csv").read_bytes() == (without / "metrics.csv").read_bytes()
    cfg = small_config("fedavg")
    cfg["output"]["trackers"] = [{"name": "neptune"}]
    path = tmp_path / "bad.yaml"
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    assert main(["run", str(path), "--out", str(tmp_path / "bad"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "output.trackers.0.name" in err[0] and "tensorboard" in err[0]


@pytest.mark.parametrize("algorithm", ["fedavg", "dpsgd"])
def test_real_processes_send_their_rows_to_the_trackers(tmp_path, algorithm):
    """`gossamer launch` with `output.trackers`: the coordinator sends each row as it writes
    it, decentralized peers' merged rows are sent when the run ends; TensorBoard holds every
    round's test accuracy as metrics.csv has it. A tracker given a parameter it does not take
    is one line before any process starts."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = small_config(algorithm, stop={"rounds": 2})
    cfg["partition"] = {"name": "iid", "num_nodes": 3}
    cfg["runtime"] = {"round_timeout_s": 30, "join_timeout_s": 60, "poll_interval_s": 0.05,
                      "threads_per_process": 1}
    cfg["output"] = {"progress": False, "trackers": [{"name": "tensorboard"}]}
    path = tmp_path / "c.yaml"
    path.write_text(config.dump(config.validate(cfg)))
    out = tmp_path / "run"
    assert main(["launch", str(path), "--out", str(out)]) == 0
    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("test_accuracy")
    assert [s.step for s in scalars] == [int(r["round"]) for r in rows] and len(rows) == 3
    assert [s.value for s in scalars] == pytest.approx([float(r["test_accuracy"]) for r in rows], abs=1e-6)
    cfg["output"]["trackers"] = [{"name": "tensorboard", "params": {"logdir": "x"}}]
    path.write_text(config.dump(config.validate(cfg)))
    assert main(["launch", str(path), "--out", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad" / "metrics.csv").exists()
