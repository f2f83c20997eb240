"""D-PSGD variants on peer processes: the final merge, gradient tracking, dynamic topologies,
and one-line refusals of what the runtime cannot run."""

import json

import pytest
import torch

from gossamer import config
from gossamer.cli import main
from gossamer.metrics.runstore import load_checkpoint
from gossamer.runtime.dl_peer import Peer
from gossamer.runtime.tracking_peer import GradientTrackingPeer
from tests.conftest import small_config
from tests.runtime.test_dl_runtime import _cfg, _launch_and_simulate, _rows


@pytest.mark.slow
def test_peers_with_a_final_merge_match_the_simulator(write_config, tmp_path, monkeypatch):
    """Local training only, then one all-to-all merge after the last round: the round-3 row
    (written after the merge) equals the simulator's, and every peer holds the same model.
    Peer 3 is slow on purpose: it reaches the merge ~3 s after the others, past their
    round_timeout_s; alive, it is waited for (only a peer that cannot be reached is left out),
    so the result does not depend on which peer finishes its local rounds first."""
    monkeypatch.setenv("GOSSAMER_TEST_ROUND_PAUSE_S", "3:1.5")
    cfg = _cfg()
    cfg["runtime"]["round_timeout_s"] = 2
    cfg["algorithm"] = {"name": "dpsgd", "params": {"schedule": "local_only", "final_merge": True}}
    real, sim = _launch_and_simulate(write_config, tmp_path, cfg)
    assert [r["round"] for r in real] == ["0", "1", "2", "3"]
    for key in ("test_accuracy", "acc_min", "acc_max", "avg_model_accuracy"):
        assert [r[key] for r in real[1:]] == [r[key] for r in sim[1:]], key
    last = real[-1]
    assert last["acc_min"] == last["acc_max"] and float(last["consensus_distance"]) == 0.0
    assert float(real[2]["consensus_distance"]) > 0                    # before the merge: apart
    # nothing is sent before the merge; then each of 4 peers sends its model to 3 others
    assert [int(r["bytes_up"]) for r in real[:3]] == [0, 0, 0]
    numel = json.loads((tmp_path / "real" / "summary.json").read_text())["num_params"]
    assert int(last["bytes_up"]) == int(last["bytes_down"])
    assert 12 * 4 * numel < int(last["bytes_up"]) < 12 * (4 * numel + 200)


@pytest.mark.slow
def test_the_final_merge_leaves_out_a_dead_peer(write_config, tmp_path, monkeypatch):
    monkeypatch.setenv("GOSSAMER_TEST_KILL_AT_ROUND", "3:1")      # peer 3 dies after round 1
    cfg = _cfg()
    cfg["runtime"]["round_timeout_s"] = 2     # the wait for the dead peer (gossip and merge)
    cfg["algorithm"] = {"name": "dpsgd", "params": {"final_merge": True}}
    path = write_config(cfg)
    assert main(["launch", str(path), "--out", str(tmp_path / "run")]) == 0
    rows = _rows(tmp_path / "run")
    assert [r["round"] for r in rows] == ["0", "1", "2", "3"]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["failed_peers"] == [3]
    last = rows[-1]                       # peers 0-2 merged among themselves: one model
    assert last["acc_min"] == last["acc_max"] and float(last["consensus_distance"]) == 0.0
    log = (tmp_path / "run" / "logs" / "peer-1.log").read_text()   # 1 is not 3's neighbour
    assert "final merge without [3]" in log


def test_a_peer_refuses_what_the_simulator_refuses_with_the_final_merge(tmp_path, write_config, capsys):
    cfg = small_config("dpsgd", stop={"rounds": 3})
    cfg["algorithm"] = {"name": "dpsgd", "params": {"final_merge": True, "aggregator": "median"}}
    with pytest.raises(config.ConfigError, match="^algorithm.params.final_merge: "):
        Peer(config.validate(cfg), 0, tmp_path)
    # the launcher asks the peer class (Peer.check_config) before spawning any process
    code = main(["launch", str(write_config(cfg)), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "algorithm.params.final_merge: " in err[0]
    cfg = small_config("dpsgd", stop={"rounds": 3, "max_sim_time_s": 10})
    cfg["algorithm"] = {"name": "dpsgd", "params": {"final_merge": True}}
    with pytest.raises(config.ConfigError, match="^stop.max_sim_time_s: "):
        Peer(config.validate(cfg), 0, tmp_path)


def test_gradient_tracking_has_its_own_peer_class(tmp_path):
    from gossamer.runtime.roles import peer_class

    assert peer_class("gradient_tracking", "gradient_tracking") is GradientTrackingPeer
    cfg = small_config("dpsgd", stop={"rounds": 3})
    cfg["algorithm"] = {"name": "gradient_tracking"}
    with pytest.raises(config.ConfigError, match="^algorithm.name: "):
        Peer(config.validate(cfg), 0, tmp_path)          # the D-PSGD class refuses it
    cfg["algorithm"] = {"name": "dpsgd"}
    with pytest.raises(config.ConfigError, match="^algorithm.name: "):
        GradientTrackingPeer(config.validate(cfg), 0, tmp_path)


@pytest.mark.slow
def test_gradient_tracking_peers_match_the_simulator(write_config, tmp_path):
    """Model and tracker travel in one frame of 2P values; the rows equal the simulator's,
    the bytes are two vectors per message, and a peer resumes with its correction."""
    cfg = _cfg()
    cfg["algorithm"] = {"name": "gradient_tracking"}
    real, sim = _launch_and_simulate(write_config, tmp_path, cfg)
    assert [r["round"] for r in real] == ["0", "1", "2", "3"]
    for key in ("test_accuracy", "acc_min", "acc_max", "avg_model_accuracy"):
        assert [r[key] for r in real[1:]] == [r[key] for r in sim[1:]], key
    # the simulator counts encoded_size(2P) per message; the real frames are a few bytes more.
    # Received bytes of the last row: every message of the run (a sender counts its bytes
    # when the push is acknowledged, which may come after its row is written)
    real_b, sim_b = int(real[-1]["bytes_down"]), int(sim[-1]["bytes_down"])
    assert sim_b <= real_b < 1.01 * sim_b
    state = load_checkpoint(tmp_path / "real" / "peers" / "checkpoint-0.pt")
    assert state["round"] == 3 and state["correction"].abs().sum() > 0
    peer = GradientTrackingPeer(config.load(tmp_path / "real" / "config.yaml"), 0, tmp_path / "real",
                                resume=True)
    assert peer.round == 3 and torch.equal(peer.correction, state["correction"])


def test_a_gossip_peer_refuses_a_dynamic_topology(tmp_path):
    from gossamer.runtime.gossip_peer import GossipPeer

    cfg = small_config("gossip", stop={"rounds": 3})
    cfg["partition"]["num_nodes"] = 4
    cfg["topology"] = {"name": "one_peer_exponential"}
    with pytest.raises(config.ConfigError, match="^topology.name: gossip peers need a static graph"):
        GossipPeer(config.validate(cfg), 0, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("topology", [{"name": "one_peer_exponential"},
                                      {"name": "peer_sampling", "params": {"view_size": 2}}],
                         ids=["one_peer_exponential", "peer_sampling"])
def test_peers_on_a_dynamic_topology_match_the_simulator(write_config, tmp_path, topology,
                                                        monkeypatch):
    """Every peer computes round r's graph alone from (seed, r): whom it sends to, whom it
    waits for and its mixing weights; the models equal the simulator's bit for bit. Peer 0
    pauses after each round: the others, which need it only in some rounds, run ahead of it,
    and it must not take that for having fallen behind (it did, and skipped rounds)."""
    monkeypatch.setenv("GOSSAMER_TEST_ROUND_PAUSE_S", "0:0.5")
    cfg = _cfg()
    cfg["topology"] = topology
    cfg["algorithm"] = {"name": "dpsgd", "params": {"gossip_steps": 2}}
    real, sim = _launch_and_simulate(write_config, tmp_path, cfg)
    assert [r["round"] for r in real] == ["0", "1", "2", "3"]
    for key in ("test_accuracy", "acc_min", "acc_max", "avg_model_accuracy"):
        assert [r[key] for r in real[1:]] == [r[key] for r in sim[1:]], key
    # the average of saved models is summed in another order: equal to float rounding
    assert [float(r["consensus_distance"]) for r in real[1:]] == pytest.approx(
        [float(r["consensus_distance"]) for r in sim[1:]], rel=1e-6)


def test_a_pattern_without_a_runtime_peer_is_one_line_exit_2(write_config, tmp_path, capsys,
                                                             monkeypatch):
    from gossamer.runtime import roles

    monkeypatch.delitem(roles.PEER_ROLES, "gradient_tracking")   # as if it had no peer class
    cfg = small_config("gradient_tracking", stop={"rounds": 3})
    cfg["topology"] = {"name": "ring"}
    path = write_config(cfg)
    code = main(["peer", str(path), "--id", "0", "--peers", str(tmp_path / "peers.json"),
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(
        "gossamer: config error: algorithm.name: gradient_tracking (gradient_tracking) has no runtime peer")
