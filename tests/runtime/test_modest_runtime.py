"""MoDeST on real peer processes over gRPC: parity with the simulator, a peer dying mid-run."""

import csv
import json

import numpy as np
import pytest

from gossamer import config
from gossamer.algorithms.dl.modest import rank
from gossamer.cli import main
from tests.conftest import small_config


def _cfg(nodes, sample_size, timeout_s, rounds):
    cfg = small_config("modest", stop={"rounds": rounds}, topology={"name": "complete"})
    cfg["partition"]["num_nodes"] = nodes
    cfg["algorithm"]["params"] = {"sample_size": sample_size, "aggregators": 2, "success_fraction": 1.0,
                                  "timeout_s": timeout_s, "weighting": "uniform"}
    cfg["runtime"] = {"round_timeout_s": 10, "join_timeout_s": 60, "threads_per_process": 2}
    return cfg


def _rows(run_dir):
    with (run_dir / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def test_peers_match_the_simulator_round_by_round(write_config, tmp_path):
    # 4 nodes, 2 trainers and 2 aggregators a round: some nodes sit rounds out and wait; with
    # DP-SGD in local training (its noise keyed by node, round and step, as in the simulator),
    # each peer recording its steps, so the merged epsilon composes every node's
    cfg = _cfg(nodes=4, sample_size=2, timeout_s=30.0, rounds=4)      # a live peer is waited for
    cfg["privacy"] = {"dp": {"level": "sample", "clip_norm": 1.0, "noise_multiplier": 1.0}}
    path = write_config(cfg)
    assert main(["launch", str(path), "--out", str(tmp_path / "real")]) == 0
    assert main(["run", str(path), "--out", str(tmp_path / "sim"), "--quiet"]) == 0
    real, sim = _rows(tmp_path / "real"), _rows(tmp_path / "sim")
    assert [r["round"] for r in real] == [r["round"] for r in sim] == ["0", "1", "2", "3", "4"]
    assert 0 == float(real[0]["epsilon"]) < float(real[1]["epsilon"]) < float(real[-1]["epsilon"])
    # same samples, same data-order keys, same rank-ordered average: the same model, bit for bit
    for key in ("test_accuracy", "test_loss", "participants", "aggregators", "timeouts", "epsilon"):
        assert [r[key] for r in real] == [r[key] for r in sim], key
    assert [float(r["train_loss"]) for r in real[1:]] == pytest.approx(
        [float(r["train_loss"]) for r in sim[1:]], rel=1e-6)      # a mean of 2 floats, summed apart
    # the same messages; protobuf frames carry a few more header bytes than the simulator's wire size
    assert [int(r["bytes_up"]) for r in real] == pytest.approx([int(r["bytes_up"]) for r in sim], rel=0.02)
    summary = json.loads((tmp_path / "real" / "summary.json").read_text())
    assert summary["executor"] == "runtime" and summary["stopped_by"] == "rounds"
    assert summary["failed_peers"] == [] and summary["timeouts_total"] == 0
    assert (tmp_path / "real" / "model.pt").exists()


def test_a_killed_peer_is_skipped_and_the_run_finishes(write_config, tmp_path, monkeypatch):
    # 5 nodes, 3 trainers, 2 aggregators: node 4 aggregates round 1 and is ranked among the
    # trainers of every later round, so each of them has to skip it
    everyone = np.arange(5)
    assert 4 in rank(everyone, 0, 2)[:2] and all(4 in rank(everyone, 0, r)[:3] for r in range(2, 6))
    monkeypatch.setenv("GOSSAMER_TEST_KILL_AT_ROUND", "4:1")      # dies once it fed round 2
    path = write_config(_cfg(nodes=5, sample_size=3, timeout_s=0.5, rounds=5))
    out = tmp_path / "run"
    assert main(["launch", str(path), "--out", str(out)]) == 0
    rows = _rows(out)
    assert [r["round"] for r in rows] == [str(r) for r in range(6)]
    assert all(int(r["aggregators"]) >= 1 and int(r["participants"]) >= 2 for r in rows[1:])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed_peers"] == [4] and summary["stopped_by"] == "rounds"
    assert summary["timeouts_total"] >= 3
    assert float(rows[-1]["test_accuracy"]) > float(rows[1]["test_accuracy"])
    logs = "".join((out / "logs" / f"peer-{i}.log").read_text() for i in range(4))
    assert "[4] did not answer within 0.5 s" in logs


def test_a_resumed_peer_keeps_its_rounds_and_drops_stale_models(tmp_path):
    from gossamer.protocols.modest import AGGREGATE, TRAIN, Arrival
    from gossamer.runtime.modest_peer import ModestPeer

    cfg = config.validate(_cfg(nodes=5, sample_size=3, timeout_s=1.0, rounds=4))
    peer = ModestPeer(cfg, 2, tmp_path)
    peer.params += 1.0
    peer.box.trained, peer.box.aggregated, peer.bytes_up = 3, 2, 1234
    peer._checkpoint()
    peer._record(3, "train", sent=10, timeouts=0)
    again = ModestPeer(cfg, 2, tmp_path, resume=True)
    assert (again.box.trained, again.box.aggregated, again.bytes_up) == (3, 2, 1234)
    assert again.params.equal(peer.params) and len(again.metrics.rows) == 1
    model = Arrival(0, again.params[0].clone(), 10)
    for r, purpose in ((3, TRAIN), (2, AGGREGATE), (4, TRAIN), (3, AGGREGATE)):
        again._deliver(r, purpose, model)
    assert sorted(again.box.held) == [(3, AGGREGATE), (4, TRAIN)]      # rounds it already did: dropped


def test_a_peer_accepts_models_and_the_end_notice_and_rejects_the_rest(tmp_path):
    import torch

    from gossamer.protocols.modest import AGGREGATE
    from gossamer.runtime import schema
    from gossamer.runtime.codec import model_frames
    from gossamer.runtime.modest_peer import DONE, ModestPeer

    cfg = config.validate(_cfg(nodes=5, sample_size=3, timeout_s=1.0, rounds=4))
    peer = ModestPeer(cfg, 2, tmp_path)

    def push(tensor, **meta):
        frames = [f.SerializeToString() for f in model_frames(tensor, run_id=cfg.runtime.run_id, **meta)]
        return schema.Ack.FromString(peer.push(iter(frames), None))

    model = torch.zeros(peer.exp.spec.numel)
    assert push(model, sender=0, round=3, meta=(40 << 1) | AGGREGATE).ok
    assert [(a.sender, a.samples) for a in peer.box.held[(3, AGGREGATE)]] == [(0, 40)]
    assert "elements" in push(torch.zeros(7), sender=0, round=3).reason
    assert "outside" in push(model, sender=0, round=5).reason           # past stop.rounds
    assert "another peer" in push(model, sender=2, round=3).reason      # itself
    assert "kind" in push(model, kind=7, sender=0, round=3).reason
    assert "ends at round 4" in push(torch.empty(0), kind=DONE, sender=1, round=3).reason
    assert peer.done_at is None
    assert push(torch.empty(0), kind=DONE, sender=1, round=4).ok and peer.done_at == 4


def test_a_peer_reads_only_models_of_the_spec_or_empty_notices(tmp_path):
    import torch

    from gossamer import config
    from gossamer.runtime import schema
    from gossamer.runtime.codec import WireError, model_frames
    from gossamer.runtime.modest_peer import DONE, MODEL, ModestPeer

    peer = ModestPeer(config.validate(_cfg(4, 2, 5.0, 2)), 0, tmp_path)
    numel, run_id = peer.exp.spec.numel, peer.cfg.runtime.run_id

    def frames(tensor, kind):
        return [f.SerializeToString() for f in model_frames(tensor, kind=kind, sender=1, round=1, run_id=run_id)]

    meta, tensor, size = peer._read(frames(torch.ones(numel), MODEL))
    assert int(meta.kind) == MODEL and torch.equal(tensor, torch.ones(numel)) and size > 4 * numel
    assert peer._read(frames(torch.empty(0), DONE))[1].numel() == 0
    chunk = schema.Frame(chunk=b"\0" * 8).SerializeToString()
    for bad in (frames(torch.ones(numel - 1), MODEL), frames(torch.ones(3), DONE),
                frames(torch.ones(numel), 2), [chunk], [], frames(torch.ones(numel), MODEL)[:1]):
        with pytest.raises(WireError):
            peer._read(bad)
