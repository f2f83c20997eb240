"""Streaming DiLoCo and CO2 on real processes (runtime/islands.py): parity with the simulator
upload by upload, hostile uploads refused, the outer state checked by hash, and a killed
worker failing the run in one line."""

import json
import signal

import pytest
import torch

from gossamer import config
from gossamer.cli import main
from gossamer.runtime import schema
from gossamer.runtime.codec import KIND_DELTA, KIND_ENCODED, WireError, model_frames, state_hash
from gossamer.runtime.fl_client import Client
from gossamer.runtime.guard import Refused
from gossamer.runtime.islands import IslandsCoordinator, IslandsWorker
from tests.conftest import small_config
from tests.runtime.test_fl_runtime import _free_port, _rows, procs  # noqa: F401 (fixture)

INNER = {"optimizer": "adamw", "lr": 0.01, "steps": 4, "batch_size": 16}


def _cfg(name, params, **over):
    cfg = small_config(name, local=dict(INNER), stop={"rounds": 4}, **over)
    cfg["partition"]["num_nodes"] = 4
    cfg["algorithm"] = {"name": name, "params": params}
    cfg["runtime"] = {"round_timeout_s": 20, "join_timeout_s": 60, "poll_interval_s": 0.05,
                      "threads_per_process": 2}               # the simulator's threads: exact parity
    return cfg


@pytest.mark.parametrize("name, params, compression", [
    ("streaming_diloco", {"fragments": 2, "overlap": 1, "alpha": 0.5}, {"name": "quantize", "params": {"bits": 8}}),
    ("co2", {"server_momentum": 0.3, "clip_threshold": 0.01}, None)])
def test_launch_matches_the_simulator(write_config, tmp_path, name, params, compression):
    """Every worker's model, inner AdamW state, overlap, merge (Streaming DiLoCo) or one-step-
    late outer step (CO2) as in the simulator: the same test loss every round."""
    cfg = _cfg(name, params)
    if compression:
        cfg["compression"] = {"uplink": compression}
    path = write_config(cfg)
    assert main(["launch", str(path), "--out", str(tmp_path / "real")]) == 0
    assert main(["run", str(path), "--out", str(tmp_path / "sim"), "--quiet"]) == 0
    real, sim = _rows(tmp_path / "real"), _rows(tmp_path / "sim")
    assert [r["round"] for r in real] == ["0", "1", "2", "3", "4"]
    assert real[0]["bytes_up"] == "0"                   # nobody trains before round 0 is evaluated
    assert [r["test_loss"] for r in real] == [r["test_loss"] for r in sim]
    assert [r["fragment"] for r in real[1:]] == [r["fragment"] for r in sim[1:]]
    summary = json.loads((tmp_path / "real" / "summary.json").read_text())
    assert summary["executor"] == "runtime" and summary["rejected_messages"] == 0


def _coordinator(tmp_path, name="streaming_diloco", params=None, **over):
    cfg = config.validate(_cfg(name, params or {"fragments": 2, "overlap": 1}, **over))
    coord = IslandsCoordinator(cfg, tmp_path / "run")
    coord.clients = {int(w): int(coord.exp.trainer.sizes[w]) for w in coord.workers}
    return coord


def _meta(node, exchange, samples, kind=KIND_DELTA):
    return schema.ModelMeta(kind=kind, sender=node, round=exchange, meta=samples)


def test_hostile_uploads_are_refused_and_change_nothing(tmp_path):
    coord = _coordinator(tmp_path)
    n = coord._fragment_numel(1)
    samples = coord.clients[0]
    for meta, tensor, why in (
            (_meta(0, 1, samples), torch.zeros(n + 1), "carries"),         # the wrong size
            (_meta(0, 2, samples), torch.zeros(coord._fragment_numel(2)), "owes exchange 1"),
            (_meta(0, 1, samples + 1), torch.zeros(n), "reports"),          # lies about its data
            (_meta(9, 1, samples), torch.zeros(n), "not a joined worker")):
        with pytest.raises(Refused, match=why):
            coord._accept(int(meta.sender), None, meta, tensor, 100)
    assert coord.uploads == {} and coord.bytes_up == 0
    coord._accept(0, None, _meta(0, 1, samples), torch.zeros(n), 100)
    with pytest.raises(Refused, match="owes exchange 2"):                   # a replay
        coord._accept(0, None, _meta(0, 1, samples), torch.ones(n), 100)
    assert torch.equal(coord.uploads[1][0], torch.zeros(n)) and coord.bytes_up == 100


def test_garbage_encoded_uploads_are_refused(tmp_path):
    coord = _coordinator(tmp_path, compression={"uplink": {"name": "quantize", "params": {"bits": 4}}})
    samples = coord.clients[1]
    for data in (torch.zeros(3, dtype=torch.uint8), torch.full((10**6,), 7, dtype=torch.uint8)):
        with pytest.raises(Refused):
            coord._accept(1, None, _meta(1, 1, samples, KIND_ENCODED), data, len(data))
    assert coord.uploads == {}


def test_the_outer_model_is_checked_by_hash(tmp_path, write_config):
    """A worker whose outer model differs from the coordinator's stops instead of training on
    it; an FL client refuses a task whose model does not match the hash in its header."""
    cfg = config.validate(_cfg("co2", {}))
    worker = IslandsWorker(cfg, 0, "127.0.0.1:1")
    worker._check(state_hash(worker.outer.params), "the initial model")
    with pytest.raises(RuntimeError, match="hash mismatch"):
        worker._check(state_hash(worker.outer.params + 1e-7), "the initial model")

    fl = config.validate(_cfg("diloco", {}))
    client = Client(fl, 0, "127.0.0.1:1")
    model = torch.randn(client.download_numel)

    def task(digest):
        header = schema.TaskFrame(header=schema.TaskHeader(kind=schema.TaskHeader.TRAIN, round=3,
                                                           state_hash=digest)).SerializeToString()
        frames = [schema.TaskFrame(model=f).SerializeToString()
                  for f in model_frames(model, round=3, run_id=fl.runtime.run_id)]
        return lambda req, timeout: iter([header, *frames])

    client._get_task = task(state_hash(model))
    assert torch.equal(client._fetch()[1][1], model)
    client._get_task = task(state_hash(model + 1))
    with pytest.raises(WireError, match="does not match its hash"):
        client._fetch()


def test_a_killed_worker_fails_the_run_in_one_line(write_config, tmp_path, procs):  # noqa: F811
    port = _free_port()
    cfg = _cfg("streaming_diloco", {"fragments": 2, "overlap": 1})
    cfg["runtime"].update(round_timeout_s=3, server=f"127.0.0.1:{port}")
    path = write_config(cfg)
    out = tmp_path / "run"
    server = procs.start("server", str(path), "--out", str(out))
    from tests.conftest import subprocess_env
    workers = [procs.start("client", str(path), "--id", str(i),
                           env=subprocess_env(GOSSAMER_TEST_KILL_AT_ROUND="2") if i == 3 else None)
               for i in range(4)]
    assert workers[3].wait(timeout=120) == -signal.SIGKILL
    assert server.wait(timeout=120) == 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_by"] == "failed" and "workers [3] did not upload" in summary["error"]
    assert [r["round"] for r in _rows(out)] == ["0", "1"]           # exchange 1 went through


def test_malformed_messages_are_refused_both_ways(tmp_path):
    """Uploads to the coordinator and averages to a worker go through the codec: a
    non-finite value, a lying kind or a wrong shape is a WireError, never a model."""
    coord = _coordinator(tmp_path)
    run_id = coord.cfg.runtime.run_id
    n = coord._fragment_numel(1)

    def upload(tensor, kind=KIND_DELTA):
        return [f.SerializeToString() for f in model_frames(tensor, kind=kind, sender=0, round=1,
                                                            meta=coord.clients[0], run_id=run_id)]

    bad = torch.zeros(n)
    bad[3] = float("nan")
    for frames, why in ((upload(bad), "non-finite"), (upload(torch.zeros(n), kind=1), "upload kind"),
                        (upload(torch.zeros(2, n // 2)), "flat row")):
        with pytest.raises(WireError, match=why):
            coord._read_upload(frames)
    meta, tensor, _ = coord._read_upload(upload(torch.zeros(n)))     # a good one parses
    assert int(meta.round) == 1 and tensor.shape == (n,)

    worker = IslandsWorker(coord.cfg, 0, "127.0.0.1:1")

    def served(tensor):
        return [schema.TaskFrame(model=f).SerializeToString()
                for f in model_frames(tensor, kind=KIND_DELTA, round=1, run_id=run_id)]

    with pytest.raises(WireError):
        worker._read_mean(1, served(torch.zeros(n + 1)))              # another fragment's size
    with pytest.raises(WireError, match="non-finite"):
        worker._read_mean(1, served(bad))
    assert torch.equal(worker._read_mean(1, served(torch.ones(n))), torch.ones(n))
