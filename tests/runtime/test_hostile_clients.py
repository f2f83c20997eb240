"""An authenticated hostile client against a live FL server: everything it tries is rejected,
the honest clients finish the run, and the result equals the run without it."""

import csv
import json
import threading
import time

import grpc
import pytest
import torch

from gossamer.cli import main
from gossamer.runtime import schema
from gossamer.runtime.codec import model_frames
from gossamer.runtime.security import node_token
from tests.conftest import small_config
from tests.runtime.test_fl_runtime import _free_port, procs  # noqa: F401  (fixture)

HOSTILE = 3
NUMEL = 64 * 16 + 16 + 16 * 10 + 10                  # the MLP 64-16-10 on digits


def _cfg(tokens, port, **runtime):
    cfg = small_config("fedavg", stop={"rounds": 3})
    cfg["partition"]["num_nodes"] = 4
    cfg["runtime"] = {"server": f"127.0.0.1:{port}", "round_timeout_s": 60, "join_timeout_s": 60,
                      "poll_interval_s": 0.05, "threads_per_process": 2, "upload_timeout_s": 5,
                      "security": {"node_tokens_dir": str(tokens), "allow_insecure": True}, **runtime}
    return cfg


def _rows(run_dir):
    with (run_dir / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def _shard(cfg_path, node):
    from gossamer import config
    from gossamer.sim.experiment import build_experiment

    return int(build_experiment(config.load(cfg_path)).trainer.sizes[node])


def _tokens(tmp_path):
    out = tmp_path / "tokens"
    assert main(["tokens", "--out", str(out), "--nodes", "4"]) == 0
    return out


class Hostile:
    """Node 3, with its own valid token, doing everything a participant should not."""

    def __init__(self, address, token, numel):
        self.channel = grpc.insecure_channel(address)
        self.auth = (("authorization", f"Bearer {token}"),)
        self.numel = numel
        self.outcomes: dict[str, str] = {}

    def call(self, method, kind, request, **kw):
        stub = getattr(self.channel, kind)(schema.method("Coordinator", method))
        return stub(request, timeout=30, metadata=kw.pop("metadata", self.auth), wait_for_ready=True,
                    **kw)

    def join(self, node, samples):
        reply = schema.JoinReply.FromString(self.call("Join", "unary_unary", schema.JoinRequest(
            node_id=node, run_id="gossamer", num_samples=samples).SerializeToString()))
        return reply.ok, reply.reason

    def task(self, node=HOSTILE):
        frames = list(self.call("GetTask", "unary_stream", schema.TaskRequest(
            node_id=node, run_id="gossamer").SerializeToString()))
        return schema.TaskFrame.FromString(frames[0]).header

    def put(self, tensor, *, sender=HOSTILE, round_=1, samples=0, frames=None):
        frames = frames or [f.SerializeToString() for f in model_frames(
            tensor, sender=sender, round=round_, meta=samples, run_id="gossamer")]
        ack = schema.Ack.FromString(self.call("PutUpdate", "stream_unary", iter(frames)))
        return ack.ok, ack.reason

    def stalled(self, count, round_, samples):
        """``count`` uploads that send their header and stall; their outcomes."""
        head = [f.SerializeToString() for f in model_frames(
            torch.zeros(self.numel), sender=HOSTILE, round=round_, meta=samples, run_id="gossamer")][0]
        release = threading.Event()

        def frames():
            yield head
            release.wait(20)

        results = []

        def one():
            try:
                ack = schema.Ack.FromString(self.call("PutUpdate", "stream_unary", frames()))
                results.append(ack.reason)
            except grpc.RpcError as exc:
                results.append(exc.code().name)

        threads = [threading.Thread(target=one) for _ in range(count)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(15)
        release.set()
        return results

    def broken_off(self, round_, samples):
        """An upload cut off by the client after its header and half the data."""
        frames = [f.SerializeToString() for f in model_frames(
            torch.zeros(self.numel), sender=HOSTILE, round=round_, meta=samples, run_id="gossamer",
            chunk_bytes=self.numel * 2)]
        gate = threading.Event()

        def cut():
            yield frames[0]
            yield frames[1]
            gate.wait(10)

        stub = self.channel.stream_unary(schema.method("Coordinator", "PutUpdate"))
        future = stub.future(cut(), timeout=30, metadata=self.auth, wait_for_ready=True)
        time.sleep(0.5)
        future.cancel()
        gate.set()
        return future.cancelled()

    def attack(self, samples):
        o = self.outcomes
        o["huge join"] = self.join(HOSTILE, 2**63 - 1)[1]
        o["join as 0"] = self.join(0, samples)[1]
        assert self.join(HOSTILE, samples) == (True, "")
        while (header := self.task()).kind != schema.TaskHeader.TRAIN:
            assert header.kind != schema.TaskHeader.DONE
            time.sleep(0.02)
        r, numel = header.round, self.numel
        good = torch.zeros(numel)
        o["wrong shape"] = self.put(good.reshape(2, numel // 2), round_=r, samples=samples)[1]
        o["nan"] = self.put(good.clone().fill_(float("nan")), round_=r, samples=samples)[1]
        inf = good.clone()
        inf[5] = float("inf")
        o["inf"] = self.put(inf, round_=r, samples=samples)[1]
        o["float64"] = self.put(good.double(), round_=r, samples=samples)[1]
        o["huge count"] = self.put(good, round_=r, samples=2**63 - 1)[1]
        o["spoofed sender"] = self.put(good, sender=0, round_=r, samples=samples)[1]
        o["replay"] = self.put(good, round_=r, samples=samples)[1]
        o["stalled"] = self.stalled(12, r, samples)
        o["broken off"] = self.broken_off(r, samples)
        try:
            self.task(node=0)
        except grpc.RpcError as exc:
            o["task as 0"] = exc.code().name
        forged = (("authorization", f"Bearer 0.{'0' * 64}"),)
        try:
            self.call("Join", "unary_unary", b"", metadata=forged)
        except grpc.RpcError as exc:
            o["forged token"] = exc.code().name


def _run(tmp_path, procs, name, port, cfg_path, clients, hostile_samples=None, expect=0):  # noqa: F811
    out = tmp_path / name
    server = procs.start("server", str(cfg_path), "--out", str(out))
    for i in clients:
        procs.start("client", str(cfg_path), "--id", str(i))
    hostile = None
    if hostile_samples is not None:
        tokens = tmp_path / "tokens"
        token = (tokens / f"node-{HOSTILE}.token").read_text().strip()
        hostile = Hostile(f"127.0.0.1:{port}", token, numel=NUMEL)
        worker = threading.Thread(target=hostile.attack, args=(hostile_samples,), daemon=True)
        worker.start()
    assert server.wait(timeout=240) == expect, server.stdout.read().decode()[-3000:]
    if hostile is not None:
        worker.join(30)
    return out, hostile


def test_a_hostile_client_is_rejected_and_the_run_equals_the_one_without_it(write_config, tmp_path,
                                                                             procs):  # noqa: F811
    tokens = _tokens(tmp_path)
    port = _free_port()
    reference_cfg = write_config(_cfg(tokens, port, min_clients=3), "reference.yaml")
    reference, _ = _run(tmp_path, procs, "reference", port, reference_cfg, clients=range(3))
    port = _free_port()
    cfg = write_config(_cfg(tokens, port, min_clients=4, max_rejections=100), "hostile.yaml")
    samples = _shard(cfg, HOSTILE)
    out, hostile = _run(tmp_path, procs, "hostile", port, cfg, clients=range(3),
                        hostile_samples=samples)
    o = hostile.outcomes
    assert "plausible" in o["huge join"]
    assert "may not act as node 0" in o["join as 0"]
    assert "where the flat" in o["wrong shape"]
    assert "non-finite" in o["nan"] and "non-finite" in o["inf"]
    assert "float64 where float32" in o["float64"]
    assert "samples but joined with" in o["huge count"]
    assert "may not upload as node 0" in o["spoofed sender"]
    assert "not expected" in o["replay"]                 # its round no longer waits for it
    # 12 stalled streams: those held (2 at a time: the in-flight bound) are cancelled at the
    # upload deadline, the others refused at once
    held = sum(x == "CANCELLED" for x in o["stalled"])
    refused = sum("calls in flight" in x for x in o["stalled"])
    assert held >= 2 and refused >= 1 and held + refused == 12, o["stalled"]
    assert o["broken off"]
    assert o["task as 0"] == "PERMISSION_DENIED"
    assert o["forged token"] == "UNAUTHENTICATED"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_by"] == "rounds" and summary["rejected_messages"] >= 12
    rows, ref = _rows(out), _rows(reference)
    assert [r["round"] for r in rows] == ["0", "1", "2", "3"]
    assert [r["test_accuracy"] for r in rows] == [r["test_accuracy"] for r in ref]
    assert [r["test_loss"] for r in rows] == [r["test_loss"] for r in ref]
    assert [r["participants"] for r in rows[1:]] == ["3", "3", "3"]


def test_a_client_is_refused_for_the_run_after_max_rejections(write_config, tmp_path, procs):  # noqa: F811
    tokens = _tokens(tmp_path)
    port = _free_port()
    cfg = write_config(_cfg(tokens, port, min_clients=4, max_rejections=2))
    out = tmp_path / "run"
    server = procs.start("server", str(cfg), "--out", str(out))
    for i in range(3):
        procs.start("client", str(cfg), "--id", str(i))
    token = (tokens / f"node-{HOSTILE}.token").read_text().strip()
    hostile = Hostile(f"127.0.0.1:{port}", token, numel=NUMEL)
    assert hostile.join(HOSTILE, _shard(cfg, HOSTILE))[0]
    bad = torch.full((NUMEL,), float("nan"))
    assert "non-finite" in hostile.put(bad)[1]
    assert "non-finite" in hostile.put(bad)[1]
    ok, reason = hostile.put(torch.zeros(NUMEL))
    assert not ok and "refused for this run after 2 rejected messages" in reason
    assert "refused for this run" in hostile.join(HOSTILE, 1)[1]
    assert server.wait(timeout=240) == 0
    rows = _rows(out)
    assert [r["participants"] for r in rows[1:]] == ["3", "3", "3"]


def test_node_tokens_bind_ids_and_a_shared_token_needs_tls_or_allow_insecure(tmp_path, capsys):
    secret = bytes(range(32))
    from gossamer.runtime.security import token_node

    assert token_node(secret, node_token(secret, 7)) == 7
    assert token_node(secret, node_token(secret, 7).replace("7.", "8.", 1)) is None
    assert token_node(bytes(32), node_token(secret, 7)) is None
    assert token_node(secret, "7." + "z" * 64) is None
    cfg = small_config("fedavg")
    cfg["runtime"] = {"security": {"token": "abc"}}
    path = tmp_path / "c.yaml"
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "allow_insecure" in err[0]


@pytest.mark.parametrize("mode", ["server", "launch"])
def test_when_every_client_is_gone_the_run_fails_with_exit_code_3(write_config, tmp_path, procs,  # noqa: F811
                                                                   mode, capsys):
    from tests.conftest import subprocess_env

    port = _free_port()
    cfg = small_config("fedavg", stop={"rounds": 6})
    cfg["partition"]["num_nodes"] = 2
    cfg["runtime"] = {"server": f"127.0.0.1:{port}", "round_timeout_s": 3, "quorum_timeout_s": 3,
                      "poll_interval_s": 0.05, "threads_per_process": 1}
    path = write_config(cfg)
    out = tmp_path / "run"
    if mode == "server":
        server = procs.start("server", str(path), "--out", str(out))
        for i in range(2):
            procs.start("client", str(path), "--id", str(i),
                        env=subprocess_env(GOSSAMER_TEST_KILL_CLIENT_AT_ROUND="2"))
        assert server.wait(timeout=120) == 3
        text = server.stdout.read().decode().strip().splitlines()
        assert text[-1].startswith("gossamer: run failed: round 2:"), text[-3:]
    else:
        import os

        os.environ["GOSSAMER_TEST_KILL_CLIENT_AT_ROUND"] = "2"
        try:
            assert main(["launch", str(path), "--out", str(out)]) == 3
        finally:
            del os.environ["GOSSAMER_TEST_KILL_CLIENT_AT_ROUND"]
        assert "launch failed (exit 3)" in capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_by"] == "failed" and "min_participants" in summary["error"]
    assert [r["round"] for r in _rows(out)] == ["0", "1"]       # no empty round was recorded


def test_client_certificates_named_after_node_ids_bind_the_sender(tmp_path):
    from gossamer import config
    from gossamer.runtime.common import security
    from gossamer.runtime.fl_server import Coordinator, RoundState
    from gossamer.runtime.security import make_channel

    certs = tmp_path / "certs"
    assert main(["certs", "--out", str(certs), "--names", "server", "--nodes", "2"]) == 0
    cfg = small_config("fedavg")
    cfg["partition"]["num_nodes"] = 2
    cfg["runtime"] = {"server": "127.0.0.1:0", "security": {
        "tls": True, "ca": str(certs / "ca.pem"), "cert": str(certs / "{node}.pem"),
        "key": str(certs / "{node}.key"), "require_client_cert": True}}
    cfg = config.validate(cfg)
    coordinator = Coordinator(cfg, tmp_path / "run")
    server = coordinator.start_server()
    sizes = [int(n) for n in coordinator.exp.trainer.sizes]
    with coordinator.lock:
        coordinator.clients = {0: sizes[0], 1: sizes[1]}
        coordinator.current = RoundState(1, {0, 1})
    try:
        with make_channel(f"127.0.0.1:{coordinator.port}", security(cfg, node=1)) as channel:
            put = channel.stream_unary(schema.method("Coordinator", "PutUpdate"))
            join = channel.unary_unary(schema.method("Coordinator", "Join"))

            def upload(sender, round_=1):
                frames = [f.SerializeToString() for f in model_frames(
                    torch.zeros(coordinator.upload_numel), sender=sender, round=round_,
                    meta=sizes[sender], run_id="gossamer")]
                return schema.Ack.FromString(put(iter(frames), timeout=30, wait_for_ready=True))

            ack = upload(0)
            assert not ack.ok and "node 1 may not upload as node 0" in ack.reason
            reply = schema.JoinReply.FromString(join(schema.JoinRequest(
                node_id=0, run_id="gossamer", num_samples=sizes[0]).SerializeToString(), timeout=30))
            assert not reply.ok and "may not act as node 0" in reply.reason
            assert "not expected" in upload(1).reason       # the spoof was its failure this round
            with coordinator.lock:
                coordinator.current = RoundState(2, {0, 1})
            assert upload(1, 2).ok                          # as itself, it is heard
        assert set(coordinator.current.received) == {1}
    finally:
        server.stop(grace=None)


class _Context:
    def __init__(self, names):
        self.names = names

    def auth_context(self):
        return {"x509_common_name": self.names}


def test_a_peer_may_send_only_as_the_node_its_certificate_names():
    from gossamer.runtime.codec import WireError
    from gossamer.runtime.peering import check_sender
    from gossamer.runtime.security import SecurityConfig

    mutual = SecurityConfig(tls=True, ca="ca", cert="c", key="k", require_client_cert=True)
    check_sender(_Context([b"node-2"]), 2, mutual)
    with pytest.raises(WireError, match="node 2 may not send as node 0"):
        check_sender(_Context([b"node-2"]), 0, mutual)
    with pytest.raises(WireError, match="proves no node id"):
        check_sender(_Context([b"alice"]), 0, mutual)
    with pytest.raises(WireError, match="proves no node id"):
        check_sender(_Context([b"node-02"]), 2, mutual)         # one spelling per id
    check_sender(_Context([]), 0, SecurityConfig())           # nothing binds: the field is all there is


def test_the_asynchronous_server_rejects_the_same_uploads_and_drops_the_task(tmp_path):
    from gossamer import config
    from gossamer.protocols.async_fl import Task
    from gossamer.runtime.async_server import AsyncCoordinator

    cfg = small_config("fedbuff")
    cfg["algorithm"]["params"] = {"buffer_size": 2}
    cfg["partition"]["num_nodes"] = 2
    tokens = _tokens(tmp_path)
    cfg["runtime"] = {"server": "127.0.0.1:0", "security": {"node_tokens_dir": str(tokens),
                                                            "allow_insecure": True}}
    coordinator = AsyncCoordinator(config.validate(cfg), tmp_path / "run")
    server = coordinator.start_server()
    with coordinator.lock:
        coordinator.clients = {0: 10, 1: 10}
        coordinator.tasks = {0: Task(client=0, key=0, steps=1, version=0, start_s=0.0)}
    try:
        with grpc.insecure_channel(f"127.0.0.1:{coordinator.port}") as channel:
            put = channel.stream_unary(schema.method("Coordinator", "PutUpdate"))

            def upload(tensor):
                frames = [f.SerializeToString() for f in model_frames(
                    tensor, sender=0, round=0, run_id="gossamer")]
                return schema.Ack.FromString(put(iter(frames), timeout=30, wait_for_ready=True,
                                                 metadata=auth))

            auth = (("authorization", f"Bearer {(tokens / 'node-0.token').read_text().strip()}"),)
            n = coordinator.numel
            assert "where the flat" in upload(torch.zeros(1, n)).reason
            bad = torch.zeros(n)
            bad[0] = float("nan")
            assert "non-finite" in upload(bad).reason
            assert coordinator.tasks == {} and coordinator.lost == 1   # the task ends at once
            with coordinator.lock:
                coordinator.tasks = {0: Task(client=0, key=0, steps=1, version=0, start_s=0.0)}
            assert "non-finite" in upload(bad).reason
            assert coordinator.tasks == {} and coordinator.lost == 2
            # three strikes (max_rejections): even a valid upload is refused from now on
            assert "refused for this run after 3" in upload(torch.zeros(n)).reason
            assert 0 not in coordinator.clients
        assert coordinator.buffer == [] and coordinator.state.version == 0
    finally:
        server.stop(grace=None)


def test_an_asynchronous_run_whose_clients_are_gone_fails_with_exit_code_3(write_config, tmp_path,
                                                                           procs):  # noqa: F811
    from tests.conftest import subprocess_env

    port = _free_port()
    cfg = small_config("fedbuff", stop={"rounds": 50})
    cfg["algorithm"]["params"] = {"buffer_size": 2}
    cfg["partition"]["num_nodes"] = 2
    cfg["runtime"] = {"server": f"127.0.0.1:{port}", "round_timeout_s": 30, "quorum_timeout_s": 3,
                      "poll_interval_s": 0.05, "threads_per_process": 1}
    path = write_config(cfg)
    out = tmp_path / "run"
    server = procs.start("server", str(path), "--out", str(out))
    for i in range(2):                                  # each dies at the start of its 3rd task
        procs.start("client", str(path), "--id", str(i),
                    env=subprocess_env(GOSSAMER_TEST_KILL_CLIENT_AT_ROUND="2"))
    assert server.wait(timeout=120) == 3
    assert server.stdout.read().decode().strip().splitlines()[-1].startswith(
        "gossamer: run failed: no upload accepted for runtime.quorum_timeout_s")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_by"] == "failed" and summary["rounds"] < 50
