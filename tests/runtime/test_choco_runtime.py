"""CHOCO-SGD on real processes (runtime/choco_peer.py): compressed gossip between peers, the
simulator's rounds, and a peer that decodes only well-formed messages."""

import json

import pytest
import torch

from gossamer import config
from gossamer.cli import main
from gossamer.runtime.choco_peer import ChocoPeer
from gossamer.runtime.codec import WireError, bytes_frames
from tests.conftest import small_config
from tests.runtime.test_dl_runtime import _launch_and_simulate, _launch_with_a_dead_peer


def _cfg(compressor="topk", params=None, **extra):
    cfg = small_config("choco", stop={"rounds": 3})
    cfg["partition"]["num_nodes"] = 4
    cfg["topology"] = {"name": "ring"}
    cfg["algorithm"]["params"] = {"compressor": compressor, "compressor_params": params or {"density": 0.2},
                                  "gamma": 0.5, "gossip_steps": 2, **extra}
    # a live peer is waited for until it sends (a loaded machine may stall one for seconds);
    # the tests with a dead peer shorten this wait
    cfg["runtime"] = {"round_timeout_s": 30, "join_timeout_s": 60, "threads_per_process": 2}
    return cfg


@pytest.mark.slow
@pytest.mark.parametrize("compressor, params", [("topk", {"density": 0.2}), ("qsgd", {"levels": 16})])
def test_peers_match_the_simulator(write_config, tmp_path, compressor, params):
    real, sim = _launch_and_simulate(write_config, tmp_path, _cfg(compressor, params))
    assert [r["round"] for r in real] == ["0", "1", "2", "3"]
    for key in ("test_accuracy", "acc_min", "acc_max", "avg_model_accuracy"):
        assert [r[key] for r in real[1:]] == [r[key] for r in sim[1:]], key
    # the merger sums the peers' squared distances in another order than the simulator
    assert [float(r["consensus_distance"]) for r in real[1:]] == pytest.approx(
        [float(r["consensus_distance"]) for r in sim[1:]], rel=1e-5)
    summary = json.loads((tmp_path / "real" / "summary.json").read_text())
    assert summary["executor"] == "runtime" and summary["failed_peers"] == []


def test_what_peers_cannot_run_is_refused_in_one_line(write_config, tmp_path, capsys):
    cfg = _cfg(final_merge=True)
    code = main(["launch", str(write_config(cfg)), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "final_merge" in err[0], err


def test_a_peer_decodes_only_well_formed_messages_from_its_neighbours(tmp_path):
    peer = ChocoPeer(config.validate(_cfg()), 0, tmp_path)          # ring: neighbours 1 and 3
    numel = peer.exp.spec.numel
    x = torch.randn(1, numel)
    enc = peer.compressor.compress(x, seed=peer.cfg.seed, keys=[peer._key(1, 2, 1)])
    data = peer.compressor.to_bytes(enc, 0)

    def frames(payload, sender=1, round_=2, step=1):
        return [f.SerializeToString() for f in bytes_frames(payload, kind=4, sender=sender, round=round_,
                                                            meta=step, run_id=peer.cfg.runtime.run_id)]

    meta, q, _ = peer._accept(frames(data))
    assert torch.equal(q.reshape(-1), peer.compressor.decompress(enc)[0])
    for bad in (frames(data, sender=2), frames(data[:-3]), frames(data + b"\0" * 5),
                frames(data, step=1 << 10), frames(b"")):
        with pytest.raises(WireError):
            peer._accept(bad)


@pytest.mark.slow
def test_a_killed_peer_is_mixed_without_and_the_run_finishes(write_config, tmp_path, monkeypatch):
    """A neighbour's missing message is mixed as D-PSGD mixes it (its weight on the own copy)."""
    _launch_with_a_dead_peer(write_config, tmp_path, monkeypatch, _cfg())
