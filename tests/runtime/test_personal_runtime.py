"""Personalized FL on real processes: clients hold their personal models and evaluate them on
their own test rows; equal to the simulator, and a client's evaluation report is checked."""

import csv
import json
import threading
import time

import grpc
import pytest
import torch

from gossamer import config
from gossamer.cli import main
from gossamer.config import ConfigError
from gossamer.runtime import schema
from gossamer.runtime.codec import KIND_EVAL, model_frames, read_model
from gossamer.runtime.fl_server import Coordinator
from gossamer.runtime.roles import make_coordinator
from tests.conftest import small_config

COLUMNS = ("test_accuracy", "test_loss", "personal_accuracy", "personal_median", "personal_worst10")


def _cfg(name, params=None, rounds=3, **over):
    cfg = small_config(name, stop={"rounds": rounds}, **over)
    cfg["algorithm"] = {"name": name, "params": params or {}}
    cfg["partition"] = {"name": "dirichlet", "num_nodes": 5, "params": {"alpha": 0.3}, "test_fraction": 0.2}
    cfg["runtime"] = {"round_timeout_s": 30, "join_timeout_s": 60, "poll_interval_s": 0.05,
                      "threads_per_process": 1}
    return cfg


def _rows(path):
    with path.open() as f:
        return list(csv.DictReader(f))


def _equal_to_the_simulator(write_config, tmp_path, cfg, rel=None):
    """Launch ``cfg`` on real processes and run it in the simulator: every round's COLUMNS and
    clients.csv must be equal (with ``rel``: equal to that relative tolerance); returns the
    real run's rows."""
    path = write_config(cfg)
    assert main(["launch", str(path), "--out", str(tmp_path / "real")]) == 0
    assert main(["run", str(path), "--out", str(tmp_path / "sim"), "--quiet"]) == 0
    real, sim = _rows(tmp_path / "real" / "metrics.csv"), _rows(tmp_path / "sim" / "metrics.csv")
    assert len(real) == len(sim)
    clients = [_rows(tmp_path / run / "clients.csv") for run in ("real", "sim")]
    if rel is None:
        for column in COLUMNS:
            assert [r[column] for r in real] == [r[column] for r in sim], column
        assert (tmp_path / "real" / "clients.csv").read_text() == (tmp_path / "sim" / "clients.csv").read_text()
        return real
    for column in COLUMNS:
        assert [float(r[column]) for r in real] == pytest.approx([float(r[column]) for r in sim], rel=rel), column
    assert len(clients[0]) == len(clients[1])
    for a, b in zip(*clients, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert float(a[key]) == pytest.approx(float(b[key]), rel=rel), key
    return real


@pytest.mark.parametrize("name, params, over", [
    ("ditto", {"lam": 0.1}, {}),
    ("fedrep", {"head_layers": 1, "head_epochs": 2}, {}),
    ("fedcac", {"tau": 0.5, "beta": 10}, {}),
    ("fedpub", {"tau": 10.0}, {"model": {"name": "masked_mlp", "params": {"hidden": [16]}}}),
    ("fedavg", {}, {"eval": {"personal_finetune_steps": 3}}),
    ("fedbn", {}, {"model": {"name": "mlp_bn", "params": {"hidden": [16]}}})])
def test_personalized_fl_on_real_processes_equals_the_simulator(write_config, tmp_path, name, params, over):
    """Ditto's v, FedRep's head and FedBN's BatchNorm layers live in the client processes,
    FedCAC's rows in the coordinator, FedAvg's fine-tuning happens in each client before it
    evaluates: every round's global and per-client metrics and clients.csv equal the
    simulator's (FedBN's model runs layer by layer, where a client's one-node products round
    unlike the simulator's batched ones: to 1e-5)."""
    rel = 1e-5 if name == "fedbn" else None
    real = _equal_to_the_simulator(write_config, tmp_path, _cfg(name, params, **over), rel)
    assert len(real) == 4
    assert float(real[-1]["personal_accuracy"]) > float(real[0]["personal_accuracy"])


def test_fedins_on_real_processes_equals_the_simulator(write_config, tmp_path):
    """FedIns: every process pre-trains the same backbone on the public rows (seeded, one
    thread each, as the tests run the simulator), so the pools the clients train and the
    coordinator averages give the simulator's metrics, global and per client."""
    cfg = _cfg("fedins", {"pool_size": 5, "top_k": 2, "lam": 0.1})
    cfg["partition"]["public_fraction"] = 0.1
    cfg["model"] = {"name": "mlp", "params": {"hidden": [16]},
                    "pretrain": {"steps": 30, "lr": 0.05, "batch_size": 32}}
    real = _equal_to_the_simulator(write_config, tmp_path, cfg)
    assert float(real[-1]["test_accuracy"]) > float(real[0]["test_accuracy"])


def test_a_client_whose_pre_trained_model_differs_is_refused_at_join(write_config, tmp_path):
    """With ``model.pretrain`` the frozen backbone never travels: a client's Join carries the
    SHA-256 of the model it built, and a live coordinator refuses one that differs (another
    machine's math gave other bits) or is missing, in one line, and accepts its own."""
    from gossamer.runtime.common import model_digest

    cfg = _cfg("fedins", {"pool_size": 5, "top_k": 2})
    cfg["partition"]["public_fraction"] = 0.1
    cfg["model"] = {"name": "mlp", "params": {"hidden": [16]},
                    "pretrain": {"steps": 10, "lr": 0.05, "batch_size": 32}}
    coordinator = Coordinator(config.load(write_config(cfg)), tmp_path / "run")
    server = coordinator.start_server()
    mine = model_digest(coordinator.exp)
    assert len(mine) == 32 and model_digest(make_coordinator(config.load(write_config(_cfg("fedavg"))),
                                                             tmp_path / "flat").exp) == b""
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{coordinator.port}")
        join = channel.unary_unary(schema.method("Coordinator", "Join"))
        size = int(coordinator.exp.trainer.sizes[0])

        def reply(digest):
            return schema.JoinReply.FromString(join(schema.JoinRequest(
                node_id=0, run_id="gossamer", num_samples=size, model_digest=digest).SerializeToString(),
                timeout=30, wait_for_ready=True))

        for digest in (bytes(32), mine[:-1] + bytes([mine[-1] ^ 1]), b""):
            got = reply(digest)
            assert not got.ok and "pre-trained model (model.pretrain) differs" in got.reason
            assert 0 not in coordinator.clients
        assert reply(mine).ok and 0 in coordinator.clients
        channel.close()
    finally:
        server.stop(grace=None)


@pytest.mark.parametrize("name, masked, local, params", [
    ("fedavg", False, {"lr": 0.2}, {}),
    ("fedpub", True, {"optimizer": "adamw", "lr": 0.01}, {}),     # FED-PUB's authors train with Adam
    ("fedpub", True, {"optimizer": "adamw", "lr": 0.01}, {"keep_optimizer_state": True})])
def test_graph_clients_on_real_processes_equal_the_simulator(write_config, tmp_path, name, masked, local,
                                                             params):
    """FedAvg and FED-PUB with a GCN on SBM subgraphs: each client process evaluates on its
    own test nodes (the dataset's split) and reports hits out of its test nodes, not its one
    sample; FED-PUB's clients upload their embeddings on the proxy graph with their models and
    train with Adam, its state fresh each round or kept in the client process."""
    cfg = _cfg(name, params)
    cfg["data"] = {"dataset": "sbm", "params": {"num_clients": 4, "nodes": 240, "communities": 4,
                                                "classes": 3, "features": 8, "noise": 2.0}}
    cfg["partition"] = {"name": "natural", "num_nodes": 4}
    cfg["model"] = {"name": "gcn", "params": {"hidden": 16, "masked": masked}}
    cfg["local"] = {"epochs": 3, "batch_size": 1, **local}
    _equal_to_the_simulator(write_config, tmp_path, cfg)
    assert min(int(r["test_rows"]) for r in _rows(tmp_path / "real" / "clients.csv")) > 1   # test nodes


class Clients:
    """The test plays every client of a live coordinator (no node tokens: ids unbound)."""

    def __init__(self, address):
        self.channel = grpc.insecure_channel(address)

    def call(self, method, kind, request):
        stub = getattr(self.channel, kind)(schema.method("Coordinator", method))
        return stub(request, timeout=30, wait_for_ready=True)

    def join(self, node, samples):
        reply = schema.JoinReply.FromString(self.call("Join", "unary_unary", schema.JoinRequest(
            node_id=node, run_id="gossamer", num_samples=samples).SerializeToString()))
        assert reply.ok, reply.reason

    def task(self, node):
        frames = list(self.call("GetTask", "unary_stream", schema.TaskRequest(
            node_id=node, run_id="gossamer").SerializeToString()))
        header = schema.TaskFrame.FromString(frames[0]).header
        model = None
        if len(frames) > 1:
            model = read_model(schema.TaskFrame.FromString(f).model for f in frames[1:])[1]
        return header, model

    def wait_for(self, node, kind):
        while (got := self.task(node))[0].kind != kind:
            assert got[0].kind != schema.TaskHeader.DONE
            time.sleep(0.02)
        return got

    def put(self, node, tensor, round_, samples, kind=1):
        frames = [f.SerializeToString() for f in model_frames(
            tensor, kind=kind, sender=node, round=round_, meta=samples, run_id="gossamer")]
        ack = schema.Ack.FromString(self.call("PutUpdate", "stream_unary", iter(frames)))
        return ack.ok, ack.reason


def test_the_coordinator_checks_evaluation_reports_and_summarizes_them(write_config, tmp_path):
    """Against a live coordinator running FedAvg with per-client test splits: evaluation
    reports that are fractional, negative, above the client's test rows, mis-shaped, for
    another round, or outside an evaluation phase are refused; the accepted hits become the
    round's personal columns and clients.csv."""
    cfg = config.load(write_config(_cfg("fedavg", rounds=1, runtime={})))
    coordinator = make_coordinator(cfg, tmp_path / "run", listen="127.0.0.1:0")
    sizes = [int(s) for s in coordinator.exp.trainer.sizes]
    rows = [int(s) for s in coordinator.exp.personal.sizes]
    result = {}
    thread = threading.Thread(target=lambda: result.update(coordinator.serve()), daemon=True)
    thread.start()
    while not (tmp_path / "run" / "server.json").exists():
        time.sleep(0.02)
    clients = Clients(json.loads((tmp_path / "run" / "server.json").read_text())["address"])
    for i in range(5):
        clients.join(i, sizes[i])
    header, model = clients.wait_for(0, schema.TaskHeader.EVAL)        # round 0's phase
    assert header.round == 0 and model is not None                     # FedAvg: the global model
    bad = {
        "fraction": clients.put(0, torch.tensor([0.5]), 0, sizes[0], KIND_EVAL),
        "negative": clients.put(0, torch.tensor([-1.0]), 0, sizes[0], KIND_EVAL),
        "too many": clients.put(0, torch.tensor([rows[0] + 1.0]), 0, sizes[0], KIND_EVAL),
        "shape": clients.put(0, torch.tensor([1.0, 1.0]), 0, sizes[0], KIND_EVAL),
        "round": clients.put(0, torch.tensor([1.0]), 1, sizes[0], KIND_EVAL),
    }
    assert all(ok is False for ok, _ in bad.values()), bad
    assert "correct predictions" in bad["too many"][1]
    for i in range(5):                                      # round 0: every client hits 1 row
        assert clients.put(i, torch.tensor([1.0]), 0, sizes[i], KIND_EVAL) == (True, "")
    header, model = clients.wait_for(0, schema.TaskHeader.TRAIN)
    assert clients.put(0, torch.tensor([1.0]), header.round, sizes[0], KIND_EVAL)[0] is False
    for i in range(5):
        clients.wait_for(i, schema.TaskHeader.TRAIN)
        assert clients.put(i, model, header.round, sizes[i]) == (True, "")
    for i in range(5):                                      # round 1: client i hits min(i, rows)
        clients.wait_for(i, schema.TaskHeader.EVAL)
        assert clients.put(i, torch.tensor([float(min(i, rows[i]))]), 1, sizes[i], KIND_EVAL) == (True, "")
    while clients.task(0)[0].kind != schema.TaskHeader.DONE:
        time.sleep(0.02)
    thread.join(30)
    metrics = _rows(tmp_path / "run" / "metrics.csv")
    accuracy = [min(i, rows[i]) / rows[i] for i in range(5)]
    assert float(metrics[0]["personal_accuracy"]) == pytest.approx(sum(1 / r for r in rows) / 5, rel=1e-6)
    assert float(metrics[1]["personal_accuracy"]) == pytest.approx(sum(accuracy) / 5, rel=1e-6)
    assert float(metrics[1]["personal_worst10"]) == 0.0                       # client 0
    table = _rows(tmp_path / "run" / "clients.csv")
    assert [float(r["accuracy"]) for r in table] == pytest.approx(accuracy, rel=1e-6)
    assert result["rejected_messages"] >= len(bad) + 1


def test_what_real_processes_cannot_run_is_refused_in_one_line(write_config, tmp_path, capsys):
    assert main(["launch", str(write_config(_cfg("local_only"))), "--out", str(tmp_path / "a")]) == 2
    assert "algorithm.name" in capsys.readouterr().err
    cfg = _cfg("fedcac")
    cfg["compression"] = {"uplink": {"name": "topk", "params": {"ratio": 0.1}}, "feedback": "ef"}
    with pytest.raises(ConfigError, match="algorithm.name"):
        Coordinator.check_config(config.validate(cfg))
    cfg = _cfg("fedavg")
    cfg["hierarchy"] = {"levels": [2]}
    with pytest.raises(ConfigError, match="partition.test_fraction"):
        Coordinator.check_config(config.validate(cfg))
