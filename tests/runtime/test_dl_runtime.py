"""D-PSGD on real peer processes over gRPC: parity with the simulator, a peer dying mid-run."""

import csv
import json
import socket
import subprocess

from gossamer.cli import main
from tests.conftest import gossamer_cmd, small_config, subprocess_env


def _cfg():
    cfg = small_config("dpsgd", stop={"rounds": 3})
    cfg["partition"]["num_nodes"] = 4
    cfg["runtime"] = {"round_timeout_s": 4, "join_timeout_s": 60, "threads_per_process": 2}
    return cfg


def _rows(run_dir):
    with (run_dir / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def test_peers_on_a_ring_match_the_simulator(write_config, tmp_path):
    path = write_config(_cfg())
    assert main(["launch", str(path), "--out", str(tmp_path / "real")]) == 0
    assert main(["run", str(path), "--out", str(tmp_path / "sim"), "--quiet"]) == 0
    real, sim = _rows(tmp_path / "real"), _rows(tmp_path / "sim")
    assert [r["round"] for r in real] == ["0", "1", "2", "3"]
    for key in ("test_accuracy", "acc_min", "acc_max", "avg_model_accuracy"):
        assert [r[key] for r in real[1:]] == [r[key] for r in sim[1:]], key
    summary = json.loads((tmp_path / "real" / "summary.json").read_text())
    assert summary["executor"] == "runtime" and summary["failed_peers"] == []


def test_a_killed_peer_is_skipped_by_its_neighbours(write_config, tmp_path, monkeypatch):
    monkeypatch.setenv("GOSSAMER_TEST_KILL_AT_ROUND", "3:1")      # peer 3 dies after round 1
    path = write_config(_cfg())
    assert main(["launch", str(path), "--out", str(tmp_path / "run")]) == 0
    rows = _rows(tmp_path / "run")
    assert [r["round"] for r in rows] == ["0", "1", "2", "3"]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["failed_peers"] == [3]
    assert float(rows[-1]["test_accuracy"]) > float(rows[1]["test_accuracy"])
    log = (tmp_path / "run" / "logs" / "peer-0.log").read_text()
    assert "no model from [3]" in log


def test_a_restarted_peer_rejoins_and_catches_up(write_config, tmp_path):
    ports = []
    for _ in range(4):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    cfg = _cfg()
    cfg["stop"] = {"rounds": 60}
    cfg["eval"] = {"every": 10}
    cfg["runtime"] = {"round_timeout_s": 3, "join_timeout_s": 60}
    path = write_config(cfg)
    out = tmp_path / "run"
    peers = tmp_path / "peers.json"
    peers.write_text(json.dumps({str(i): f"127.0.0.1:{p}" for i, p in enumerate(ports)}))

    def start(i, *extra, env=None):
        log = (tmp_path / f"peer-{i}{'-resumed' if extra else ''}.log").open("wb")
        return subprocess.Popen(gossamer_cmd("peer", str(path), "--id", str(i), "--listen",
                                             f"127.0.0.1:{ports[i]}", "--peers", str(peers),
                                             "--out", str(out), *extra),
                                env=env or subprocess_env(), stdout=log, stderr=subprocess.STDOUT)

    # the others pause 0.1 s per round so they are still running when peer 3 is back (a fresh
    # process needs seconds to start; unpaused, they could finish all 60 rounds before that)
    procs = [start(i, env=subprocess_env(GOSSAMER_TEST_KILL_AT_ROUND="3:20") if i == 3
                   else subprocess_env(GOSSAMER_TEST_ROUND_PAUSE_S="0.1")) for i in range(4)]
    try:
        assert procs[3].wait(timeout=90) == -9
        procs[3] = start(3, "--resume")
        for p in procs:
            assert p.wait(timeout=120) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    with (out / "peers" / "metrics-3.csv").open() as f:
        rows = list(csv.DictReader(f))
    rounds = [int(r["round"]) for r in rows]
    assert rounds[:3] == [0, 10, 20] and rounds[-1] == 60       # back after the restart, to the end
    # and it heard from its neighbours again (whether it had to catch up, or they waited a round
    # timeout for it and it came back in step, depends on how long the restart took)
    assert int(rows[-1]["bytes_down"]) > int(rows[2]["bytes_down"])


def test_a_peer_that_fell_behind_jumps_to_its_neighbours_round(tmp_path):
    from gossamer import config
    from gossamer.runtime.dl_peer import Peer

    cfg = _cfg()
    cfg["stop"] = {"rounds": 100}
    peer = Peer(config.validate(cfg), 3, tmp_path)
    assert peer._next_round(5) == 6                 # nobody heard yet: the next round
    peer.latest = {0: 6, 2: 5}
    assert peer._next_round(5) == 6                 # neighbours one ahead: in step
    peer.latest = {0: 17, 2: 12}
    assert peer._next_round(5) == 17                # behind: take the furthest neighbour's round
    peer.latest = {0: 250}
    assert peer._next_round(5) == 100               # never past stop.rounds


def test_peers_with_a_robust_merge_match_the_simulator(write_config, tmp_path):
    cfg = _cfg()
    cfg["algorithm"] = {"name": "dpsgd", "params": {"aggregator": "median"}}
    path = write_config(cfg)
    assert main(["launch", str(path), "--out", str(tmp_path / "real")]) == 0
    assert main(["run", str(path), "--out", str(tmp_path / "sim"), "--quiet"]) == 0
    real, sim = _rows(tmp_path / "real"), _rows(tmp_path / "sim")
    for key in ("test_accuracy", "acc_min", "acc_max"):
        assert [r[key] for r in real[1:]] == [r[key] for r in sim[1:]], key
