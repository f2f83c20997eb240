"""Random-walk (token) learning on real peer processes: parity with the simulator, a dead
neighbour routed around, one-line refusals."""

import csv
import json
import socket
import threading

import numpy as np
import pytest

from gossamer import config
from gossamer.cli import main
from gossamer.sim.drivers.random_walk import RandomWalkDriver
from gossamer.sim.experiment import build_experiment
from tests.conftest import small_config

# Columns a real run must reproduce exactly; bytes differ by the protobuf framing, time is wall time.
EXACT = ["round", "test_accuracy", "test_loss", "train_loss", "acc_min", "acc_max",
         "avg_model_accuracy", "avg_model_loss", "visits", "visit_tv", "visit_tv_token"]


def _cfg(name, nodes, topology, **params):
    cfg = small_config(name, topology=topology, partition={"name": "iid", "num_nodes": nodes},
                       stop={"rounds": 6}, eval={"every": 2})
    cfg["algorithm"]["params"] = params
    # a live neighbour is waited for (a loaded machine may stall one for seconds); the test
    # with a dead one shortens this wait
    cfg["runtime"] = {"round_timeout_s": 30, "join_timeout_s": 60, "threads_per_process": 1}
    return cfg


def _rows(run_dir):
    with (run_dir / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def _simulated_paths(cfg):
    driver = RandomWalkDriver(build_experiment(config.validate(cfg)))
    steps = [driver.position.copy()]
    for _ in range(cfg["stop"]["rounds"]):
        driver.run_round()
        steps.append(driver.position.copy())
    return {str(t): [int(p) for p in path] for t, path in enumerate(np.array(steps).T)}, driver


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _peers_in_threads(cfg, run_dir, dead=(), broken=None):
    """Every peer of ``cfg`` in a thread of this process, over real gRPC on loopback (cheaper
    than a process each); ``dead`` peers never come up, peer ``broken`` fails at its first hop.
    Returns the errors the peers raised and the merged summary (when none did)."""
    from gossamer.runtime.dl_merge import merge_metrics
    from gossamer.runtime.walk_peer import WalkPeer

    cfg = config.validate(cfg)
    peers = [WalkPeer(cfg, i, run_dir, listen=f"127.0.0.1:{p}")
             for i, p in enumerate(_free_ports(cfg.partition.num_nodes))]
    if broken is not None:
        peers[broken]._hop = lambda token: 1 / 0
    addresses = {i: p.listen for i, p in enumerate(peers)}
    errors = {}

    def run(i):
        try:
            peers[i].run(addresses)
        except Exception as exc:        # noqa: BLE001 - returned
            errors[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(peers)) if i not in dead]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    return errors, None if errors else merge_metrics(cfg, run_dir, killed=list(dead))


def _assert_as_simulated(cfg, real_dir, sim_dir, framing):
    real, sim = _rows(real_dir), _rows(sim_dir)
    assert [r["round"] for r in real] == ["0", "2", "4", "6"]
    for key in EXACT:
        assert [r[key] for r in real] == [r[key] for r in sim], key
    summary = json.loads((real_dir / "summary.json").read_text())
    simulated = json.loads((sim_dir / "summary.json").read_text())
    paths, driver = _simulated_paths(cfg)
    assert summary["paths"] == paths
    assert driver.weights is not None               # shards of 287/288 samples, or a non-uniform target
    assert summary["visits_per_node"] == simulated["visits_per_node"]
    assert summary["executor"] == "runtime" and summary["stopped_by"] == "rounds"
    # the same moves: bytes are moves x the token message, which carries a little protobuf
    # framing (a few bytes more or less with the varint ids) on top of the simulator's headers
    sim_hop = simulated["hop_bytes"]
    assert 0 < summary["hop_bytes"] - sim_hop < framing
    for r, s in zip(real, sim, strict=True):
        moves = int(s["bytes_up"]) // sim_hop
        assert moves * sim_hop <= int(r["bytes_up"]) <= moves * (sim_hop + framing), r["round"]
    assert summary["node_steps"] == simulated["node_steps"] and summary["reroutes"] == 0


@pytest.mark.slow
def test_srrw_tokens_on_peer_processes_walk_and_learn_as_in_the_simulator(write_config, tmp_path):
    # SRRW over the Metropolis-Hastings chain (self-loops: a token may stay), 2 tokens, one
    # process per node; the visit counts travel with the model
    cfg = _cfg("srrw", 5, {"name": "barabasi_albert", "params": {"m": 2}}, num_tokens=2, alpha=3.0)
    path = write_config(cfg)
    assert main(["launch", str(path), "--out", str(tmp_path / "real")]) == 0
    assert main(["run", str(path), "--out", str(tmp_path / "sim"), "--quiet"]) == 0
    _assert_as_simulated(cfg, tmp_path / "real", tmp_path / "sim", framing=128)


def test_a_simple_walk_token_on_peers_walks_and_learns_as_in_the_simulator(write_config, tmp_path):
    # the simple walk on a tree, 1 token: its target (degrees) is far from the data shares, so
    # every visit is reweighted; peers in threads of this process, over gRPC. With DP-SGD (its
    # noise keyed by node, hop and step, as in the simulator): the merged epsilon composes each
    # node's steps from the hop records, the simulator's (the SRRW test runs without DP)
    cfg = _cfg("random_walk", 4, {"name": "barabasi_albert", "params": {"m": 1}}, walk="simple")
    cfg["privacy"] = {"dp": {"level": "sample", "clip_norm": 1.0, "noise_multiplier": 1.0}}
    assert _peers_in_threads(cfg, tmp_path / "real")[0] == {}
    assert main(["run", str(write_config(cfg)), "--out", str(tmp_path / "sim"), "--quiet"]) == 0
    _assert_as_simulated(cfg, tmp_path / "real", tmp_path / "sim", framing=64)
    real, sim = _rows(tmp_path / "real"), _rows(tmp_path / "sim")
    assert [r["epsilon"] for r in real] == [r["epsilon"] for r in sim]
    assert 0 == float(real[0]["epsilon"]) < float(real[1]["epsilon"]) < float(real[-1]["epsilon"])


def test_a_token_routes_around_a_dead_neighbour(tmp_path):
    # A ring of 5: peer 2 never comes up. Tokens drawn to it go to the other neighbour (the
    # simulator's rule for an offline node) and the run still ends everywhere.
    cfg = _cfg("random_walk", 5, {"name": "ring"}, walk="simple", num_tokens=2)
    cfg["stop"] = {"rounds": 8}
    cfg["runtime"]["round_timeout_s"] = 1
    dead = 2
    paths, _ = _simulated_paths(cfg)
    assert all(path[0] != dead for path in paths.values())        # no token starts there
    errors, summary = _peers_in_threads(cfg, tmp_path, dead=(dead,))
    assert errors == {}
    assert summary["stopped_by"] == "rounds" and summary["reroutes"] > 0
    assert summary["failed_peers"] == [dead]
    for path in summary["paths"].values():
        assert len(path) == 9 and dead not in path
        assert all(abs(a - b) % 5 in (1, 4) for a, b in zip(path[:-1], path[1:], strict=True))
    assert summary["visits_per_node"][dead] == 0 and sum(summary["visits_per_node"]) == 16
    rows = _rows(tmp_path)
    assert float(rows[-1]["test_accuracy"]) > float(rows[0]["test_accuracy"]) + 0.2


def test_a_failing_peer_stops_every_peer_instead_of_leaving_them_waiting(tmp_path):
    cfg = _cfg("random_walk", 4, {"name": "ring"}, walk="simple")
    start = int(_simulated_paths(cfg)[0]["0"][0])
    errors, _ = _peers_in_threads(cfg, tmp_path, broken=start)   # fails holding the only token
    assert isinstance(errors.pop(start), ZeroDivisionError)
    assert sorted(errors) == sorted(set(range(4)) - {start})
    assert all(f"peer {start} failed" in str(exc) for exc in errors.values())


@pytest.mark.parametrize("field, value", [
    ("topology", {"name": "one_peer_exponential"}),
    ("stop.max_sim_time_s", {"rounds": 4, "max_sim_time_s": 10.0}),
])
def test_what_walk_peers_cannot_run_is_one_line(write_config, tmp_path, capsys, field, value):
    cfg = _cfg("srrw", 4, {"name": "ring"})
    cfg[field.split(".")[0]] = value
    path = write_config(cfg)
    assert main(["launch", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"gossamer: config error: {field}"), err
    assert not (tmp_path / "run" / "logs").exists()          # refused before any peer started


def test_token_messages_round_trip_and_bad_ones_are_rejected():
    import torch

    from gossamer.runtime.codec import Limits, WireError
    from gossamer.runtime.walk_wire import (
        KIND_DONE,
        Expect,
        Token,
        notice_frame,
        read_message,
        token_frames,
    )

    expect = Expect(frozenset({1, 2}), tokens=2, rounds=5, numel=3, num_nodes=4, with_visits=True,
                    run_id="r", limits=Limits())
    token = Token(1, 3, torch.tensor([[1.0, -2.0, 0.5]]), np.array([1, 0, 2, 0]))

    def frames(tok=token, sender=1, **kw):
        return token_frames(tok, sender=sender, with_visits=True, run_id=kw.get("run_id", "r"),
                            chunk_bytes=kw.get("chunk_bytes", 4))

    meta, got, size = read_message(frames(), expect)
    assert (got.id, got.hops) == (1, 3) and torch.equal(got.params, token.params)
    assert got.visits.tolist() == [1, 0, 2, 0] and size == sum(map(len, frames()))
    notice = notice_frame(KIND_DONE, 1, sender=2, rounds=5, run_id="r")
    assert read_message([notice], expect)[1] is None
    bad = {
        "is not a neighbour": frames(sender=3),
        "another run": frames(run_id="x"),
        "summing to the hops": frames(Token(1, 2, token.params, token.visits)),
        "no token 7": frames(Token(7, 3, token.params, token.visits)),
        "no payload": [notice, frames()[1]],
        "payload has 4 bytes": frames()[:2],
        "must carry its visit counts": frames()[:4],
    }
    for reason, message in bad.items():
        with pytest.raises(WireError, match=reason):
            read_message(message, expect)
