"""Asynchronous gossip learning on real peer processes."""

import csv
import json
import math

import pytest
import torch

from gossamer import rng
from gossamer.cli import main
from tests.conftest import small_config


def _rows(out):
    with (out / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("mode", ["push", "pull"])
def test_gossip_peers_learn(write_config, tmp_path, mode):
    cfg = small_config("gossip", stop={"rounds": 6})
    cfg["partition"]["num_nodes"] = 4
    cfg["algorithm"]["params"] = {"mode": mode, "period_s": 0.25}
    cfg["eval"] = {"every": 3}
    path = write_config(cfg)
    out = tmp_path / "run"
    assert main(["launch", str(path), "--out", str(out)]) == 0
    rows = _rows(out)
    assert [r["round"] for r in rows] == ["0", "3", "6"]
    assert float(rows[-1]["test_accuracy"]) > float(rows[0]["test_accuracy"]) + 0.1
    assert int(rows[-1]["bytes_up"]) > 0 and rows[-1]["avg_model_accuracy"] != ""
    assert json.loads((out / "summary.json").read_text())["executor"] == "runtime"


def _ticks(stream: int, node: int, period: float, end_s: float) -> int:
    """Ticks of a node's Poisson clock before ``end_s``: the simulator's draws, summed the way
    the peer sums them."""
    def gap(k):
        return -math.log1p(-rng.uniform_scalar(0, stream, node, k, 0)) * period

    count, k, t = 0, 0, gap(0)
    while t < end_s:
        count, k = count + 1, k + 1
        t += gap(k)
    return count


def test_dual_clock_gossip_peers_learn_at_their_clock_rates(write_config, tmp_path):
    """DADAO's two clocks on the wall clock: exchanges (merge on arrival, no training) every
    0.25 s and local updates every 0.1 s on average, for 2 s on 4 peers."""
    period, compute_period, rounds = 0.25, 0.1, 8
    cfg = small_config("gossip", stop={"rounds": rounds})
    cfg["partition"]["num_nodes"] = 4
    cfg["algorithm"]["params"] = {"mode": "push", "period_s": period, "clocks": "dual",
                                  "compute_period_s": compute_period}
    cfg["eval"] = {"every": 4}
    path = write_config(cfg)
    out = tmp_path / "run"
    assert main(["launch", str(path), "--out", str(out)]) == 0
    rows = _rows(out)
    assert [r["round"] for r in rows] == ["0", "4", "8"]
    assert float(rows[-1]["test_accuracy"]) > float(rows[0]["test_accuracy"]) + 0.1
    end_s = rounds * period
    stats = [json.loads((out / "peers" / f"gossip-{i}.json").read_text()) for i in range(4)]
    for i, s in enumerate(stats):
        # every clock tick before the end is handled, however late the loaded machine runs it
        assert s["exchanges"] == _ticks(rng.STREAM_GOSSIP, i, period, end_s)
        assert s["compute_ticks"] == _ticks(rng.STREAM_GOSSIP_COMPUTE, i, compute_period, end_s)
        # a tick runs an update unless the previous one still runs (no timing bound: loose)
        assert s["updates"] + s["compute_skipped"] == s["compute_ticks"]
        assert s["updates"] >= s["compute_ticks"] // 4
    # near the configured rates: 4 x 2 s / 0.25 s = 32 exchanges, 4 x 2 s / 0.1 s = 80 ticks
    assert 16 <= sum(s["exchanges"] for s in stats) <= 64
    assert 40 <= sum(s["compute_ticks"] for s in stats) <= 160
    # each successful push is merged once by its receiver (a few may arrive after it stopped)
    delivered = sum(s["exchanges"] - s["exchanges_failed"] for s in stats)
    assert delivered // 2 <= sum(s["merges"] for s in stats) <= delivered


# --- parity without a wall-clock race: gossip peers replay the simulator's model operations --
def _record_ops(driver) -> list[tuple]:
    """Every model operation the simulator's gossip windows apply, in time order."""
    log, run_ops = [], driver._run_ops

    def spy(ops):
        log.extend(sorted(ops, key=lambda op: op[0]))      # a stable sort: ties keep their order
        return run_ops(ops)

    driver._run_ops = spy
    return log


@pytest.mark.parametrize("params", [
    {"mode": "push_pull", "period_s": 1.0},
    {"mode": "pull", "period_s": 1.0, "merge": "age_weighted"},
    {"mode": "push", "period_s": 1.0, "clocks": "dual", "compute_period_s": 0.4}])
def test_gossip_peers_replaying_the_simulators_operations_compute_the_same_models(tmp_path, params):
    """Gossip parity without real time: the simulator runs 6 periods on 6 nodes and every model
    operation of its windows (a sender's model read into a message, a message merged (and
    trained on, with one clock), a computation tick) is replayed, in time order, on 6
    in-process GossipPeers: a read is what the peer's Push/Pull sends (``_frames``), a merge
    goes through the peer's worker step (``_take``), a tick through ``_local_update``. Every
    peer ends with the simulator's model (float rounding: batched against one-row training),
    its age and its number of updates."""
    from gossamer import config
    from gossamer.runtime.codec import read_model
    from gossamer.runtime.gossip_peer import GossipPeer
    from gossamer.sim.drivers import driver_for
    from gossamer.sim.experiment import build_experiment
    from gossamer.sim.gossip_waves import MERGE, READ, TRAIN, WRITE

    raw = small_config("gossip", stop={"rounds": 6})
    raw["partition"]["num_nodes"] = 6
    raw["algorithm"]["params"] = params
    cfg = config.validate(raw)
    exp = build_experiment(cfg)
    sim = driver_for(exp.algorithm.pattern)(exp)
    ops = _record_ops(sim)
    for _ in range(6):
        sim.run_round()
    kinds = {op[1] for op in ops}
    assert {READ, TRAIN if params.get("clocks") == "dual" else WRITE} <= kinds

    peers = [GossipPeer(cfg, i, tmp_path / "run") for i in range(6)]
    messages = {}
    for _, kind, node, msg in ops:
        peer = peers[node]
        if kind == READ:                                  # what its Push or Pull would send
            meta, tensor = read_model(peer._frames())
            messages[msg] = (tensor.float().clone(), int(meta.meta))
        elif kind in (WRITE, MERGE):
            peer._take(*messages.pop(msg))
        elif kind == TRAIN:
            peer._local_update()
        else:
            raise AssertionError(f"unexpected operation {kind}")
    for i, peer in enumerate(peers):
        assert torch.allclose(peer.params[0], sim.params[i], atol=1e-5), i
        assert peer.age == int(sim.age[i]) and peer.updates == int(sim.updates[i])
    assert sum(p.updates for p in peers) > 6
