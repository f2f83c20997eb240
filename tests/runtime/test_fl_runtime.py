"""FedAvg on real processes over gRPC on loopback: end to end, parity, faults, rejections."""

import csv
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import grpc
import pytest
import torch

from gossamer.cli import main
from gossamer.processes import start
from gossamer.runtime import schema
from gossamer.runtime.codec import model_frames
from tests.conftest import gossamer_cmd, interruptible, small_config, subprocess_env


def _cfg(**runtime):
    cfg = small_config("fedavg", stop={"rounds": 3})
    cfg["partition"]["num_nodes"] = 4
    cfg["runtime"] = {"round_timeout_s": 20, "join_timeout_s": 60, "poll_interval_s": 0.1,
                      "threads_per_process": 2, **runtime}      # the simulator's threads: exact parity
    return cfg


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rows(run_dir):
    with (run_dir / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


class Procs:
    """Processes started by a test (as ``gossamer launch`` starts its own: forked from a
    forkserver that imported PyTorch once); all are killed at the end, whatever happens. A
    process's output goes to a file, read back through its ``stdout``."""

    def __init__(self, logs: Path):
        self.procs, self.logs = [], logs

    def start(self, *args, env=None):
        log = self.logs / f"{len(self.procs)}-{args[0]}.log"
        p = start(list(args), env or subprocess_env(), log=log)
        p.stdout = _Output(log)
        self.procs.append(p)
        return p

    def close(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)


class _Output:
    """What a process wrote so far, as from a pipe: ``read()`` returns bytes."""

    def __init__(self, path: Path):
        self.path = path

    def read(self) -> bytes:
        return self.path.read_bytes() if self.path.exists() else b""


@pytest.fixture
def procs(tmp_path_factory):
    ps = Procs(tmp_path_factory.mktemp("logs"))
    yield ps
    ps.close()


def launched_and_simulated(path, out: Path, name: str = "") -> tuple[list, list]:
    """The metrics rows of ``gossamer launch`` and of ``gossamer run`` of the config ``path``
    (under ``out/<name>real`` and ``out/<name>sim``)."""
    assert main(["launch", str(path), "--out", str(out / f"{name}real")]) == 0
    assert main(["run", str(path), "--out", str(out / f"{name}sim"), "--quiet"]) == 0
    return _rows(out / f"{name}real"), _rows(out / f"{name}sim")


def start_with_victim(procs, path, out: Path, clients: int, victim: int, **kill):
    """``gossamer server`` and ``clients`` clients of the config ``path``; client ``victim``
    runs with the test kill variables ``kill``. The server's and the victim's processes."""
    server = procs.start("server", str(path), "--out", str(out))
    started = [procs.start("client", str(path), "--id", str(i), env=subprocess_env(**kill) if i == victim else None)
               for i in range(clients)]
    return server, started[victim]


def test_launch_matches_the_simulator(write_config, tmp_path):
    real, sim = launched_and_simulated(write_config(_cfg()), tmp_path)
    assert [r["round"] for r in real] == ["0", "1", "2", "3"]
    assert [r["test_accuracy"] for r in real] == [r["test_accuracy"] for r in sim]
    assert all(r["participants"] == "4" for r in real[1:])
    summary = json.loads((tmp_path / "real" / "summary.json").read_text())
    assert summary["executor"] == "runtime" and summary["bytes_up_total"] > 3 * 4 * 4 * 1000


@pytest.mark.parametrize("name, params", [("scaffold_m", {"prox_mu": 0.01}),
                                          ("fedamd", {"anchor_prob": 0.5}),
                                          ("diloco", {})])
def test_stateful_clients_and_server_optimizers_match_the_simulator(write_config, tmp_path, name, params):
    """SCAFFOLD-M: a 3-vector payload, 2-vector uploads, control variates kept by the client
    process, the proximal term and the server momentum; DiLoCo: the inner AdamW state kept by
    each worker process and the server's optimizer (Nesterov; every server optimizer is the
    same ServerOptimizer.step in both executors)."""
    cfg = _cfg()
    cfg["algorithm"] = {"name": name, "params": params}
    if name == "diloco":
        cfg["local"] = {"optimizer": "adamw", "lr": 0.01, "steps": 5, "batch_size": 16}
    path = write_config(cfg)
    assert main(["launch", str(path), "--out", str(tmp_path / "real")]) == 0
    assert main(["run", str(path), "--out", str(tmp_path / "sim"), "--quiet"]) == 0
    real, sim = _rows(tmp_path / "real"), _rows(tmp_path / "sim")
    assert [r["test_accuracy"] for r in real] == [r["test_accuracy"] for r in sim]
    numel = json.loads((tmp_path / "real" / "summary.json").read_text())["num_params"]
    vectors = 2 if name == "scaffold_m" else 1                  # uploads: (y_i, c_i+ - c_i)
    assert int(real[-1]["bytes_up"]) >= 3 * 4 * vectors * numel * 4


def test_over_selection_closes_rounds_at_the_wanted_uploads(write_config, tmp_path):
    cfg = _cfg()
    cfg["algorithm"] = {"name": "fedavg", "params": {"client_fraction": 0.5, "over_selection": 1.0}}
    path = write_config(cfg)
    assert main(["launch", str(path), "--out", str(tmp_path / "real")]) == 0
    rows = _rows(tmp_path / "real")
    assert [r["participants"] for r in rows[1:]] == ["2", "2", "2"]      # 4 selected, first 2 kept


def test_elastic_diloco_a_killed_worker_is_dropped_and_a_late_one_joins(write_config, tmp_path, procs):
    """DiLoCo workers on real processes with changing membership: the run starts once 3 of 4
    have joined (runtime.min_clients), one is killed (kill -9) in the middle of outer step 2,
    which closes at its deadline (without it, unless its restarted process delivers in time), and
    is restarted; the fourth joins while that step waits. A joining or restarted worker receives the current global model with its first task,
    checked against the task's SHA-256 before it trains (and starts a fresh inner optimizer).
    Every outer step happens exactly once and the run finishes with all four."""
    port = _free_port()
    cfg = _cfg(round_timeout_s=8, server=f"127.0.0.1:{port}", min_clients=3)   # honest clients
    cfg["algorithm"] = {"name": "diloco"}             # finish in time on a loaded machine
    cfg["local"] = {"optimizer": "adamw", "lr": 0.01, "steps": 20, "batch_size": 16}
    cfg["stop"] = {"rounds": 8}                       # the newcomer has outer steps 2-8 to start
    path = write_config(cfg)
    out = tmp_path / "run"
    server = procs.start("server", str(path), "--out", str(out))
    victim = None
    for i in range(3):
        env = subprocess_env(GOSSAMER_TEST_KILL_AT_ROUND="2") if i == 2 else None
        p = procs.start("client", str(path), "--id", str(i), env=env)
        victim = p if i == 2 else victim
    assert victim.wait(timeout=120) == -signal.SIGKILL                # killed in outer step 2
    procs.start("client", str(path), "--id", "3")                     # joins late
    procs.start("client", str(path), "--id", "2")                     # the killed one, restarted
    assert server.wait(timeout=120) == 0, server.stdout.read().decode()[-2000:]
    rows = _rows(out)
    assert [r["round"] for r in rows] == [str(r) for r in range(9)]
    parts = [int(r["participants"]) for r in rows[1:]]
    # outer step 2 closes at its deadline without worker 2, or with its restarted process when
    # that started in time (the restarted worker is given the step it was killed in)
    assert parts[0] == 3 and parts[1] in (2, 3) and parts[-1] == 4     # 0, 1, the newcomer, 2 again


def test_server_restart_loses_and_repeats_no_round(write_config, tmp_path, procs):
    port = _free_port()
    path = write_config(_cfg(server=f"127.0.0.1:{port}", join_timeout_s=90))
    reference = tmp_path / "reference"                # the simulator gives the same numbers
    assert main(["run", str(path), "--out", str(reference), "--quiet"]) == 0
    out = tmp_path / "run"
    first = procs.start("server", str(path), "--out", str(out),
                        env=subprocess_env(GOSSAMER_TEST_KILL_AT_ROUND="1"))
    clients = [procs.start("client", str(path), "--id", str(i)) for i in range(4)]
    assert first.wait(timeout=120) == -signal.SIGKILL
    assert [r["round"] for r in _rows(out)] == ["0", "1"]
    time.sleep(0.5)
    second = procs.start("server", "--resume", str(out))
    assert second.wait(timeout=120) == 0, second.stdout.read().decode()[-2000:]
    for c in clients:
        assert c.wait(timeout=30) == 0
    rows = _rows(out)
    assert [r["round"] for r in rows] == ["0", "1", "2", "3"]
    assert [r["test_accuracy"] for r in rows] == [r["test_accuracy"] for r in _rows(reference)]


def _serve_once(write_config, tmp_path, procs, **runtime):
    port = _free_port()
    path = write_config(_cfg(server=f"127.0.0.1:{port}", join_timeout_s=30, **runtime))
    server = procs.start("server", str(path), "--out", str(tmp_path / "run"))
    deadline = time.monotonic() + 60
    while not (tmp_path / "run" / "server.json").exists():
        assert server.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    return path, f"127.0.0.1:{port}"


def _put(channel, frames, metadata=()):
    put = channel.stream_unary(schema.method("Coordinator", "PutUpdate"))
    return schema.Ack.FromString(put(iter(frames), timeout=10, metadata=metadata))


def test_bad_messages_are_rejected_and_the_server_keeps_serving(write_config, tmp_path, procs):
    _, address = _serve_once(write_config, tmp_path, procs)
    with grpc.insecure_channel(address) as channel:
        wrong_shape = [f.SerializeToString() for f in model_frames(torch.zeros(7), run_id="gossamer")]
        ack = _put(channel, wrong_shape)
        assert not ack.ok and "expected" in ack.reason
        ack = _put(channel, [b"\x08\x96\x01garbage", os.urandom(64)])
        assert not ack.ok and ack.reason
        spec = schema.TensorSpec(dtype="float32", shape=[10], num_bytes=41)
        lying = [schema.Frame(meta=schema.ModelMeta(tensor=spec, run_id="gossamer")).SerializeToString()]
        ack = _put(channel, lying)
        assert not ack.ok and "header says 41" in ack.reason
        join = channel.unary_unary(schema.method("Coordinator", "Join"))
        reply = schema.JoinReply.FromString(join(schema.JoinRequest(
            node_id=0, run_id="gossamer", num_samples=10).SerializeToString(), timeout=10))
        assert reply.ok                                            # still serving


def test_oversized_message_is_rejected(write_config, tmp_path, procs):
    _, address = _serve_once(write_config, tmp_path, procs, max_message_bytes=4096)
    with grpc.insecure_channel(address) as channel:
        frames = [f.SerializeToString() for f in model_frames(torch.zeros(5000), run_id="gossamer")]
        ack = _put(channel, frames)
        assert not ack.ok and "exceeds the cap" in ack.reason


def test_wrong_token_is_rejected(write_config, tmp_path, procs):
    _, address = _serve_once(write_config, tmp_path, procs, security={"token": "s3cret-token", "allow_insecure": True})
    with grpc.insecure_channel(address) as channel:
        with pytest.raises(grpc.RpcError) as err:
            _put(channel, [], metadata=(("authorization", "Bearer wrong"),))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:
            _put(channel, [])
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        ack = _put(channel, [], metadata=(("authorization", "Bearer s3cret-token"),))
        assert not ack.ok                                          # authenticated, then rejected as empty


def test_plaintext_client_cannot_talk_to_a_tls_server(write_config, tmp_path, procs):
    certs = tmp_path / "certs"
    assert main(["certs", "--out", str(certs), "--names", "server"]) == 0
    security = {"tls": True, "ca": str(certs / "ca.pem"), "cert": str(certs / "server.pem"),
                "key": str(certs / "server.key")}
    _, address = _serve_once(write_config, tmp_path, procs, security=security)
    with grpc.insecure_channel(address) as channel:
        with pytest.raises(grpc.RpcError) as err:
            _put(channel, [])
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    creds = grpc.ssl_channel_credentials(root_certificates=(certs / "ca.pem").read_bytes())
    with grpc.secure_channel(address, creds) as channel:
        assert not _put(channel, []).ok                            # TLS works; empty message rejected


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _live_processes_mentioning(text: str) -> list[int]:
    """Processes whose command line or open files name ``text`` (a launched child is forked
    from a forkserver, so its command line is the forkserver's; its log file is open)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            named = []
            for path in ["cmdline", *(f"fd/{fd}" for fd in _listdir(f"/proc/{entry}/fd"))]:
                try:                                   # either may be gone by now
                    named.append(open(f"/proc/{entry}/cmdline", "rb").read().decode(errors="replace")
                                 if path == "cmdline" else os.readlink(f"/proc/{entry}/{path}"))
                except OSError:
                    pass
            if any(text in name for name in named):
                pids.append(int(entry))
    return pids


def test_ctrl_c_on_the_launcher_stops_every_process(write_config, tmp_path):
    cfg = _cfg()
    cfg["stop"] = {"rounds": 1000}
    path = write_config(cfg)
    out = tmp_path / "interrupted"
    launcher = subprocess.Popen(gossamer_cmd("launch", str(path), "--out", str(out)),
                                env=subprocess_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, preexec_fn=interruptible)
    try:
        deadline = time.monotonic() + 90
        while not (out / "metrics.csv").exists():               # the run is under way
            assert launcher.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        assert len(_live_processes_mentioning(str(out))) >= 5      # server + 4 clients
        launcher.send_signal(signal.SIGINT)
        assert launcher.wait(timeout=30) != 0
        deadline = time.monotonic() + 10
        while _live_processes_mentioning(str(out)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _live_processes_mentioning(str(out)) == []
    finally:
        if launcher.poll() is None:
            launcher.kill()


def test_contribution_scores_on_real_processes_equal_the_simulator(write_config, tmp_path):
    """The coordinator scores the uploads it holds as the simulator does: the same
    contributions.csv, and the label-flipping client ranked last."""
    cfg = _cfg()
    cfg["adversary"] = {"attack": "label_flip", "nodes": [1]}
    cfg["contribution"] = {"methods": ["loo", "cosine", "shapley"], "permutations": 4, "validation": 200}
    path = write_config(cfg)
    assert main(["launch", str(path), "--out", str(tmp_path / "real")]) == 0
    assert main(["run", str(path), "--out", str(tmp_path / "sim"), "--quiet"]) == 0
    real = (tmp_path / "real" / "contributions.csv").read_text()
    assert real == (tmp_path / "sim" / "contributions.csv").read_text()
    summary = json.loads((tmp_path / "real" / "summary.json").read_text())
    assert summary["contribution"]["auc_flagged_below_others"]["loo"] == 1.0
