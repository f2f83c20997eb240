"""Gradient coding on real processes (runtime/coded.py): a classic round closes at the first
n - s uploads, so a worker killed mid-run costs nothing, and the decoded gradient is the
simulator's whichever workers straggle; a sequential round waits for the reattempt its due job
needs; the coordinator files only well-formed coded vectors."""

import signal

import numpy as np
import pytest
import torch

from gossamer import config
from gossamer.cli import main
from gossamer.protocols.coding import decode, encode
from gossamer.runtime.codec import WireError
from gossamer.runtime.coded import CodedCoordinator
from gossamer.runtime.fl_server import RoundState
from tests.conftest import small_config
from tests.runtime.test_fl_runtime import (  # noqa: F401  (procs: a fixture)
    _free_port,
    _rows,
    launched_and_simulated,
    procs,
    start_with_victim,
)

SEQUENTIAL = {"burst": 2, "window": 3, "stragglers": 2, "server_lr": 0.5}


def _cfg(**params):
    cfg = small_config("gradient_coding", stop={"rounds": 3}, local={"epochs": 1, "batch_size": 16, "lr": 0.1})
    cfg["partition"]["num_nodes"] = 4
    cfg["algorithm"] = {"name": "gradient_coding", "params": {"s": 1, "server_lr": 0.5, **params}}
    cfg["runtime"] = {"round_timeout_s": 30, "join_timeout_s": 60, "poll_interval_s": 0.1,
                      "threads_per_process": 2}      # the simulator's threads: exact parity
    return cfg


@pytest.mark.slow
def test_a_killed_worker_costs_nothing_and_every_round_is_the_simulators(write_config, tmp_path, procs):  # noqa: F811
    """Worker 3 is killed (SIGKILL) at its first task from round 2 on (a straggler may miss a
    round's task: rounds close at the first three uploads): the later rounds close at the other
    three uploads (n - s = 3) and decode the exact full gradient, so the run equals the
    simulator's (where nobody straggles) round by round, bit for bit with the fractional code."""
    port = _free_port()
    cfg = _cfg()
    cfg["stop"] = {"rounds": 5}
    cfg["runtime"]["server"] = f"127.0.0.1:{port}"
    path = write_config(cfg)
    server, victim = start_with_victim(procs, path, tmp_path / "real", 4, 3, GOSSAMER_TEST_KILL_CLIENT_AT_ROUND="2+")
    assert server.wait(timeout=180) == 0, server.stdout.read().decode()[-3000:]
    assert victim.wait(timeout=10) == -signal.SIGKILL
    assert main(["run", str(path), "--out", str(tmp_path / "sim"), "--quiet"]) == 0
    real, sim = _rows(tmp_path / "real"), _rows(tmp_path / "sim")
    assert [r["waited"] for r in real[1:]] == ["3"] * 5             # round 1 closes at 3 too
    assert [r["stragglers"] for r in real[1:]] == ["1"] * 5
    for column in ("test_accuracy", "test_loss"):
        assert [r[column] for r in real] == [r[column] for r in sim], column
    assert real[-1]["test_loss"] != real[0]["test_loss"]


@pytest.mark.slow
def test_the_cyclic_code_and_the_sequential_scheme_on_real_processes(write_config, tmp_path):
    """The cyclic code's float64 vectors, decoded by least squares from whichever three arrive
    first: the simulator's run to float rounding. Sequential gradient coding (B = 2: the
    gradient of round r - 2 is applied in round r, none before round 3): the simulator's run
    bit for bit, whichever workers straggled."""
    real, sim = launched_and_simulated(write_config(_cfg(code="cyclic")), tmp_path)
    assert [float(r["test_loss"]) for r in real] == pytest.approx([float(r["test_loss"]) for r in sim], rel=1e-5)
    assert all(float(r["decode_residual"]) <= 1e-9 for r in real[1:])
    cfg = _cfg()
    cfg["algorithm"] = {"name": "sequential_gradient_coding", "params": SEQUENTIAL}
    cfg["stop"] = {"rounds": 4}
    real, sim = launched_and_simulated(write_config(cfg), tmp_path, "seq-")
    for column in ("test_accuracy", "test_loss", "job"):
        assert [r[column] for r in real] == [r[column] for r in sim], column
    assert [r["job"] for r in real[1:]] == ["0", "0", "1", "2"]
    assert real[2]["test_loss"] == real[0]["test_loss"] != real[3]["test_loss"]


def test_a_sequential_round_waits_for_the_reattempt_it_needs(tmp_path):
    """The selective-reattempt scheme on the coordinator, arrivals scripted in id order (n = 4,
    s = 1, B = 2, W = 3, lambda = 2): rounds 1 and 2 close once workers 0 and 1 are in (2 and 3
    straggle: a burst the model allows); in round 3 worker 2 reattempts job 1 from the model of
    round 1, and since 2 and 3 straggled within the window the round waits for both; job 1's
    gradient, decoded from workers 0, 1 and 2, is the full gradient at round 1's model."""
    cfg = _cfg()
    cfg["algorithm"] = {"name": "sequential_gradient_coding", "params": SEQUENTIAL}
    coord = CodedCoordinator(config.validate(cfg), tmp_path)
    trainer, code, w = coord.exp.trainer, coord.code, coord.partition_weights
    support = torch.from_numpy(np.stack(code.partitions()))

    def vectors(model):
        grads, _ = trainer.full_gradient(model.expand(4, -1), np.arange(4))
        return encode(code, np.arange(4), w, grads[support]).float()

    def round_(r, order):
        """Arrivals in ``order`` until the round closes; who was in."""
        coord._open(r, np.arange(4))
        cur = RoundState(r, selected={0, 1, 2, 3})
        sent = {int(j): vectors(coord.models[int(j)]) for j in set(coord.jobs.tolist())}
        for i in order:
            cur.received[i] = (sent[int(coord.jobs[i])][i], 10)
            if coord._closes(cur, 0):
                break
        assert coord._enough(r, cur.received)
        coord._aggregate(r, cur.received)
        return sorted(cur.received)

    x1 = coord.state.params.clone()
    assert round_(1, [0, 1, 2, 3]) == [0, 1] and round_(2, [0, 1, 2, 3]) == [0, 1]
    assert coord.job == 0 and torch.equal(coord.state.params, x1)       # nothing decoded yet
    coord._open(3, np.arange(4))
    assert coord.jobs.tolist() == [3, 3, 1, 3] and torch.equal(coord.models[1], x1)
    assert not coord._enough(3, {0: None, 1: None, 3: None})   # 2 and 3 straggled within W
    assert round_(3, [0, 1, 3, 2]) == [0, 1, 2, 3]
    grads, _ = trainer.full_gradient(x1.expand(4, -1), np.arange(4))
    full = (w[:, None] * grads.double()).sum(0).float()
    stepped = coord.algorithm.step(coord.algorithm.init_state(x1), full).params
    assert coord.job == 1 and coord.reattempts == 1
    assert torch.allclose(coord.state.params, stepped, atol=1e-6)


def test_the_coordinator_decodes_from_any_n_minus_s_and_refuses_malformed_vectors(tmp_path):
    cfg = config.validate(_cfg())
    coord = CodedCoordinator(cfg, tmp_path)
    assert coord._quorum()[0] == 3
    rnd = coord._open(1, np.arange(4))
    assert rnd.selected.tolist() == [0, 1, 2, 3] and rnd.wanted == 3
    p, code = coord.numel, coord.code
    grads = torch.randn(4, p, generator=torch.Generator().manual_seed(0))
    support = np.stack(code.partitions())
    sent = encode(code, np.arange(4), coord.partition_weights, grads[torch.from_numpy(support)]).float()
    full = (coord.partition_weights[:, None] * grads.double()).sum(0)
    for arrived in ([0, 1, 2], [0, 2, 3], [1, 2, 3]):           # any three decode the same bits
        got, residual = decode(code, np.array(arrived), sent[arrived])
        assert residual == 0.0 and torch.allclose(got, full, atol=1e-6)
        assert torch.equal(got, decode(code, np.array([0, 1, 2]), sent[[0, 1, 2]])[0])

    def raw(values: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.frombuffer(values.tobytes(), dtype=np.uint8).copy())

    assert torch.equal(coord._decode(0, 1, raw(sent[0].numpy()))[0], sent[0])
    bad = sent[0].numpy().copy()
    bad[3] = np.inf
    for tensor in (raw(bad), raw(sent[0].numpy()[:-1]), raw(sent[0].double().numpy())):
        with pytest.raises(WireError):
            coord._decode(0, 1, tensor)
