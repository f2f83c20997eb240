"""Hierarchical aggregation on real processes: `gossamer aggregator` processes between the
clients and the coordinator; equal to the simulator's tree, a killed aggregator's clients
re-home, and a hostile aggregator's messages are refused."""

import csv
import json
import threading
import time

import grpc
import pytest
import torch

from gossamer import config
from gossamer.cli import main
from gossamer.metrics.runstore import load_checkpoint
from gossamer.runtime import schema
from gossamer.runtime.codec import KIND_PARTIAL, model_frames
from gossamer.runtime.roles import make_coordinator
from gossamer.runtime.security import node_token
from tests.conftest import small_config

NUMEL = 64 * 16 + 16 + 16 * 10 + 10                  # the MLP 64-16-10 on digits


def _cfg(rounds=3, levels=(2,), **runtime):
    cfg = small_config("fedavg", stop={"rounds": rounds})
    cfg["partition"]["num_nodes"] = 6
    cfg["hierarchy"] = {"levels": list(levels)}
    cfg["runtime"] = {"round_timeout_s": 30, "join_timeout_s": 60, "poll_interval_s": 0.05,
                      "retry_max_s": 0.5, "threads_per_process": 1, **runtime}
    return cfg


def _rows(run_dir):
    with (run_dir / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("levels", [(2,), (1, 2)])
def test_a_tree_of_aggregator_processes_equals_the_simulators_tree(write_config, tmp_path, levels):
    """The model summed up a tree of real aggregators is the simulator's up to float rounding
    (each aggregator adds w_i x_i as uploads arrive; the simulator normalizes the weights
    first): every round's accuracy equal, the final parameters within 1e-6. The coordinator's
    link carries one partial per top-level aggregator a round, each way."""
    path = write_config(_cfg(levels=levels))
    assert main(["launch", str(path), "--out", str(tmp_path / "real")]) == 0
    assert main(["run", str(path), "--out", str(tmp_path / "sim"), "--quiet"]) == 0
    real, sim = _rows(tmp_path / "real"), _rows(tmp_path / "sim")
    assert [r["test_accuracy"] for r in real] == [r["test_accuracy"] for r in sim]
    assert all(r["participants"] == "6" for r in real[1:])
    for a, b in zip(real, sim, strict=True):
        assert abs(float(a["test_loss"]) - float(b["test_loss"])) < 1e-5
    got = load_checkpoint(tmp_path / "real" / "model.pt")["params"].reshape(-1)
    sim_model = load_checkpoint(tmp_path / "sim" / "model.pt")       # a state dict, in order
    want = torch.cat([t.reshape(-1) for t in sim_model.values()])
    assert float((got - want).abs().max()) < 1e-6
    tiers = json.loads((tmp_path / "real" / "summary.json").read_text())["hierarchy"]
    assert tiers["aggregators_reporting"] == sum(levels)
    top = levels[0]
    per_model = NUMEL * 4
    # the coordinator's link: `top` partial sums up and `top` models down a round
    assert top * 3 * per_model <= tiers["bytes_up_by_tier"][0] < top * 3 * (per_model + 512)
    assert top * 3 * per_model <= tiers["bytes_down_by_tier"][0] < top * 3 * (per_model + 512)
    # the clients' tier: every client's model each round
    assert 6 * 3 * per_model <= tiers["bytes_up_by_tier"][-1] < 6 * 3 * (per_model + 512)


@pytest.mark.parametrize("levels", [(2,), (1, 2)])
def test_a_killed_aggregators_children_re_home_and_the_run_finishes(write_config, tmp_path, monkeypatch,
                                                                   levels):
    """Aggregator 0 dies (kill -9) in round 2 holding a model. One level: it is a leaf, and
    its clients re-home to the other leaf. Two levels: it is the top, and both leaves (which
    had sent it their sums) re-home to the coordinator, whose round awaits their clients
    again. Either way round 2 and the run finish with every client."""
    monkeypatch.setenv("GOSSAMER_TEST_KILL_AGGREGATOR_AT", "0:2")
    path = write_config(_cfg(rounds=4, levels=levels))
    out = tmp_path / "real"
    assert main(["launch", str(path), "--out", out.as_posix()]) == 0
    rows = _rows(out)
    assert [r["round"] for r in rows] == ["0", "1", "2", "3", "4"]
    assert [r["participants"] for r in rows[1:]] == ["6"] * 4
    summary = json.loads((out / "summary.json").read_text())
    assert summary["hierarchy"]["aggregators_reporting"] == sum(levels) - 1   # the dead one wrote nothing
    assert not (out / "aggregators" / "0" / "summary.json").exists()
    if levels == (2,):
        logs = "".join((out / "logs" / f"client-{i}.log").read_text() for i in range(3))
        assert "re-homing" in logs                                      # clients 0-2 were under it
        survivor = json.loads((out / "aggregators" / "1" / "summary.json").read_text())
        assert survivor["clients_reached"] == 6
    else:
        for g in (1, 2):
            assert "re-homing" in (out / "logs" / f"aggregator-{g}.log").read_text()


class FakeAggregators:
    """The test plays both aggregators of a 2-leaf tree, with their own valid tokens."""

    def __init__(self, address, secret):
        self.channel = grpc.insecure_channel(address)
        self.secret = secret

    def call(self, node, method, kind, request):
        stub = getattr(self.channel, kind)(schema.method("Coordinator", method))
        auth = (("authorization", f"Bearer {node_token(self.secret, node)}"),)
        return stub(request, timeout=30, metadata=auth, wait_for_ready=True)

    def join(self, node):
        reply = schema.JoinReply.FromString(self.call(node, "Join", "unary_unary", schema.JoinRequest(
            node_id=node, run_id="gossamer").SerializeToString()))
        return reply.ok, reply.reason

    def task(self, node, members, last_round=0):
        req = schema.TaskRequest(node_id=node, run_id="gossamer", last_round=last_round,
                                 members=list(members), member_samples=list(members.values()))
        try:
            frames = list(self.call(node, "GetTask", "unary_stream", req.SerializeToString()))
        except grpc.RpcError as exc:
            return exc.code().name, []
        return schema.TaskFrame.FromString(frames[0]).header, frames[1:]

    def put(self, node, tensor, nodes, round_=1, kind=KIND_PARTIAL):
        frames = [f.SerializeToString() for f in model_frames(
            tensor, kind=kind, sender=node, round=round_, meta=len(nodes), run_id="gossamer", nodes=nodes)]
        ack = schema.Ack.FromString(self.call(node, "PutUpdate", "stream_unary", iter(frames)))
        return ack.ok, ack.reason


def test_the_coordinator_checks_what_aggregators_send_and_sums_their_partials(write_config, tmp_path):
    """Against a live coordinator: an aggregator of another parent, a client posing as one,
    implausible member lists, partials for clients not under the sender or not awaited, for
    another round, non-finite, or a client's upload from an aggregator are refused; two honest
    partials complete the round and the model is their sum over the clients' total weight."""
    assert main(["tokens", "--out", str(tmp_path / "tokens"), "--nodes", "8"]) == 0
    cfg_dict = _cfg(rounds=1, max_rejections=100)
    cfg_dict["runtime"]["security"] = {"node_tokens_dir": str(tmp_path / "tokens"), "allow_insecure": True}
    cfg = config.load(write_config(cfg_dict))
    coordinator = make_coordinator(cfg, tmp_path / "run", listen="127.0.0.1:0")
    sizes = [int(s) for s in coordinator.exp.trainer.sizes]
    result = {}
    thread = threading.Thread(target=lambda: result.update(coordinator.serve()), daemon=True)
    thread.start()
    while not (tmp_path / "run" / "server.json").exists():
        time.sleep(0.02)
    address = json.loads((tmp_path / "run" / "server.json").read_text())["address"]
    secret = bytes.fromhex((tmp_path / "tokens" / "node-secret").read_text())
    fake = FakeAggregators(address, secret)
    a0, a1 = 6, 7                                        # wire ids: 6 clients, then aggregators
    under0 = {i: sizes[i] for i in range(3)}
    under1 = {i: sizes[i] for i in range(3, 6)}
    assert fake.join(8)[0] is False                      # no aggregator 2 in this tree
    assert fake.join(a0) == (True, "") and fake.join(a1) == (True, "")
    assert fake.task(a1, {3: sizes[3] * 100})[0] == "PERMISSION_DENIED"     # implausible size
    assert fake.task(a1, {9: 1})[0] == "PERMISSION_DENIED"                  # no client 9
    header, frames = fake.task(a0, under0)
    while header.kind != schema.TaskHeader.TRAIN:       # waits until all 6 clients are reached
        fake.task(a1, under1)
        time.sleep(0.02)
        header, frames = fake.task(a0, under0)
    assert sorted(header.nodes) == [0, 1, 2] and frames          # its awaited clients, the model
    header1, _ = fake.task(a1, under1, last_round=1)
    assert sorted(header1.nodes) == [3, 4, 5]
    r = header.round
    x0, x1 = torch.full((NUMEL,), 0.5), torch.full((NUMEL,), -1.0)
    outcomes = {
        "not under it": fake.put(a0, x0, [0, 3], r),
        "twice": fake.put(a0, x0, [0, 0], r),
        "no clients": fake.put(a0, x0, [], r),
        "wrong round": fake.put(a0, x0, [0, 1, 2], r + 1),
        "nan": fake.put(a0, torch.full((NUMEL,), float("nan")), [0, 1, 2], r),
        "client upload": fake.put(a0, x0, [0], r, kind=1),
        "wrong shape": fake.put(a0, torch.zeros(NUMEL + 1), [0, 1, 2], r),
    }
    assert all(ok is False for ok, _ in outcomes.values()), outcomes
    assert "does not await" in outcomes["not under it"][1]
    assert "non-finite" in outcomes["nan"][1]
    w0, w1 = sum(under0.values()), sum(under1.values())
    assert fake.put(a0, x0 * w0, [0, 1, 2], r) == (True, "")
    assert fake.put(a0, x0 * w0, [0, 1, 2], r)[0] is False            # the clients are in
    assert fake.put(a1, x1 * w1, [3, 4, 5], r) == (True, "")
    while fake.task(a0, under0)[0].kind != schema.TaskHeader.DONE:
        time.sleep(0.02)
    fake.task(a1, under1)
    thread.join(30)
    assert result["rounds"] == 1
    params = load_checkpoint(tmp_path / "run" / "model.pt")["params"].reshape(-1)
    want = (0.5 * w0 - 1.0 * w1) / (w0 + w1)
    assert torch.allclose(params, torch.full((NUMEL,), want), atol=1e-6)
    assert result["rejected_messages"] >= len(outcomes) + 2


def test_real_processes_refuse_what_a_tree_cannot_carry(write_config, tmp_path, capsys):
    cfg = _cfg()
    cfg["contribution"] = {"methods": ["cosine"]}
    assert main(["launch", str(write_config(cfg)), "--out", str(tmp_path / "a")]) == 2
    assert "contribution.methods" in capsys.readouterr().err
    cfg = _cfg()
    cfg["hierarchy"]["failures"] = [{"aggregator": 0, "from_round": 1, "to_round": 1}]
    assert main(["launch", str(write_config(cfg)), "--out", str(tmp_path / "b")]) == 2
    assert "hierarchy.failures" in capsys.readouterr().err
