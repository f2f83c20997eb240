"""D-PSGD variants on peer processes: what the runtime cannot run yet is refused in one line."""

import pytest

from gossamer import config
from gossamer.runtime.dl_peer import Peer
from tests.conftest import small_config


def test_a_peer_refuses_the_final_merge(tmp_path):
    cfg = small_config("dpsgd", stop={"rounds": 3})
    cfg["algorithm"] = {"name": "dpsgd", "params": {"final_merge": True}}
    with pytest.raises(config.ConfigError, match="^algorithm.params.final_merge: "):
        Peer(config.validate(cfg), 0, tmp_path)


def test_a_peer_refuses_gradient_tracking(tmp_path):
    cfg = small_config("dpsgd", stop={"rounds": 3})
    cfg["algorithm"] = {"name": "gradient_tracking"}
    with pytest.raises(config.ConfigError, match="^algorithm.name: "):
        Peer(config.validate(cfg), 0, tmp_path)


def test_a_gossip_peer_refuses_a_dynamic_topology(tmp_path):
    from gossamer.runtime.gossip_peer import GossipPeer

    cfg = small_config("gossip", stop={"rounds": 3})
    cfg["partition"]["num_nodes"] = 4
    cfg["topology"] = {"name": "one_peer_exponential"}
    with pytest.raises(config.ConfigError, match="^topology.name: gossip peers need a static graph"):
        GossipPeer(config.validate(cfg), 0, tmp_path)


@pytest.mark.parametrize("topology", [{"name": "one_peer_exponential"},
                                      {"name": "peer_sampling", "params": {"view_size": 2}}],
                         ids=["one_peer_exponential", "peer_sampling"])
def test_peers_on_a_dynamic_topology_match_the_simulator(write_config, tmp_path, topology):
    """Every peer computes round r's graph alone from (seed, r): whom it sends to, whom it
    waits for and its mixing weights; the models equal the simulator's bit for bit."""
    from gossamer.cli import main
    from tests.runtime.test_dl_runtime import _cfg, _rows

    cfg = _cfg()
    cfg["topology"] = topology
    cfg["algorithm"] = {"name": "dpsgd", "params": {"gossip_steps": 2}}
    path = write_config(cfg)
    assert main(["launch", str(path), "--out", str(tmp_path / "real")]) == 0
    assert main(["run", str(path), "--out", str(tmp_path / "sim"), "--quiet"]) == 0
    real, sim = _rows(tmp_path / "real"), _rows(tmp_path / "sim")
    assert [r["round"] for r in real] == ["0", "1", "2", "3"]
    for key in ("test_accuracy", "acc_min", "acc_max", "avg_model_accuracy"):
        assert [r[key] for r in real[1:]] == [r[key] for r in sim[1:]], key
    # the average of saved models is summed in another order: equal to float rounding
    assert [float(r["consensus_distance"]) for r in real[1:]] == pytest.approx(
        [float(r["consensus_distance"]) for r in sim[1:]], rel=1e-6)


def test_a_pattern_without_a_runtime_peer_is_one_line_exit_2(write_config, tmp_path, capsys):
    from gossamer.cli import main

    cfg = small_config("gradient_tracking", stop={"rounds": 3})
    cfg["topology"] = {"name": "ring"}
    path = write_config(cfg)
    code = main(["peer", str(path), "--id", "0", "--peers", str(tmp_path / "peers.json"),
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(
        "gossamer: config error: algorithm.name: gradient_tracking (gradient_tracking) has no runtime peer")
