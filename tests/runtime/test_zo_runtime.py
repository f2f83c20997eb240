"""Zeroth-order FL on real processes (runtime/zo_fl.py): the same rounds as the simulator,
and a server that files only well-formed scalars."""

import numpy as np
import pytest
import torch

from gossamer import config
from gossamer.cli import main
from gossamer.runtime.codec import WireError
from gossamer.runtime.zo_fl import ZOCoordinator
from tests.conftest import small_config
from tests.runtime.test_fl_runtime import _rows, procs  # noqa: F401  (fixture)


def _cfg(**params):
    cfg = small_config("zo_fedavg", model={"name": "logreg"}, stop={"rounds": 3},
                       local={"batch_size": 32, "lr": 0.05})
    cfg["partition"]["num_nodes"] = 4
    cfg["algorithm"]["params"] = {"perturbations": 4, **params}
    cfg["runtime"] = {"round_timeout_s": 20, "join_timeout_s": 60, "poll_interval_s": 0.1,
                      "threads_per_process": 2}      # the simulator's threads: exact parity
    return cfg


@pytest.mark.slow
@pytest.mark.parametrize("params", [{}, {"quantize_bits": 8, "directions": "shared", "client_fraction": 0.5}],
                         ids=["float32", "int8_shared_half"])
# (broadcast: scalars on real processes: the restarted-server test below)
def test_launch_matches_the_simulator(write_config, tmp_path, params):
    path = write_config(_cfg(**params))
    assert main(["launch", str(path), "--out", str(tmp_path / "real")]) == 0
    assert main(["run", str(path), "--out", str(tmp_path / "sim"), "--quiet"]) == 0
    real, sim = _rows(tmp_path / "real"), _rows(tmp_path / "sim")
    assert [r["round"] for r in real] == ["0", "1", "2", "3"]
    for column in ("test_accuracy", "test_loss", "participants"):
        assert [r[column] for r in real] == [r[column] for r in sim], column
    assert real[-1]["test_loss"] != real[0]["test_loss"]                  # it moved
    # what went up is scalars: less over the whole run than one model upload (650 float32)
    assert int(real[-1]["bytes_up"]) < 650 * 4


def test_a_client_catches_up_from_relayed_scalars_and_refuses_malformed_ones(tmp_path):
    """``broadcast: scalars``: the records of the rounds a client missed rebuild the server's
    model bit for bit; the model itself travels when it is smaller or the client's round is
    unknown; a relay out of order, cut short, naming a client out of range or carrying a value
    that is not finite is refused."""
    from gossamer.protocols.zo_fl import relay_payload, replay

    cfg = config.validate(_cfg(broadcast="scalars"))
    server = ZOCoordinator(cfg, tmp_path)
    algo, x0 = server.algorithm, server.state.params.clone()
    gen = torch.Generator().manual_seed(0)
    for r, ids in enumerate(([0, 2], [1], [0, 1, 3]), start=1):
        server._aggregate(r, {i: (torch.randn(4, generator=gen), 10) for i in ids})
    x3, seed, lr = server.state.params, cfg.seed, cfg.local.lr

    def caught_up(data, since, model):
        return replay(algo, model, data, since, 3, 4, seed, lr)

    assert torch.equal(caught_up(relay_payload(server.records, x3, 0), 0, x0), x3)
    x1 = algo.server_update(x0, server.records[0][1], server.records[0][0], 1, seed, lr)
    assert torch.equal(caught_up(relay_payload(server.records, x3, 1), 1, x1), x3)
    assert relay_payload(server.records, x3, 3) == b"R"                  # nothing missed
    for since in (-1, 4):
        assert relay_payload(server.records, x3, since)[:1] == b"M"     # unknown: the model
    tiny = relay_payload(server.records, x3[:10], 0)                       # records larger: the model
    assert tiny[:1] == b"M" and len(tiny) == 41
    good = relay_payload(server.records, x3, 0)
    rounds = np.frombuffer(good[1:9], dtype="<i4")
    assert rounds.tolist() == [1, 2]
    nan = bytearray(good)
    nan[-4:] = np.array([np.nan], dtype="<f4").tobytes()
    out_of_range = bytearray(good)
    out_of_range[9:13] = np.array([7], dtype="<i4").tobytes()
    for bad in (good[:-3], good[:1] + good[9 + 8 + 16:], bytes(nan), bytes(out_of_range), b"X", good + b"\0"):
        with pytest.raises(ValueError):
            caught_up(bad, 0, x0)


@pytest.mark.parametrize("bits", [None, 8, 16])
def test_the_server_takes_exactly_k_scalars_of_the_configured_width(tmp_path, bits):
    params = {} if bits is None else {"quantize_bits": bits}
    server = ZOCoordinator(config.validate(_cfg(**params)), tmp_path)
    algo = server.algorithm
    wire = {None: "<f4", 8: "i1", 16: "<i2"}[bits]
    codes = np.array([1, -2, 3, 0], dtype=wire)
    scalars, _ = server._decode(0, 1, torch.frombuffer(bytearray(codes.tobytes()), dtype=torch.uint8))
    assert torch.equal(scalars, algo.decode(torch.from_numpy(codes.astype(np.float32 if bits is None else np.int16))
                                            .view(1, 4))[0])
    bad = [codes[:3].tobytes(), codes.tobytes() + codes[:1].tobytes()]            # 3 or 5 scalars
    if bits is None:
        bad.append(np.array([1, np.nan, 0, 0], dtype=wire).tobytes())
        bad.append(np.array([1, np.inf, 0, 0], dtype=wire).tobytes())
    else:
        top = 2 ** (bits - 1)
        bad.append(np.array([0, -top, 0, 0], dtype=wire).tobytes())            # -128: outside +-127
    for data in bad:
        with pytest.raises(WireError):
            server._decode(0, 1, torch.frombuffer(bytearray(data), dtype=torch.uint8))


@pytest.mark.slow
def test_a_restarted_server_resumes_from_its_checkpoint(write_config, tmp_path, procs):  # noqa: F811
    """``broadcast: scalars``, half the clients a round: the server dies after round 1 (kill -9)
    and resumes with the relay it checkpointed; clients catch up on the rounds they missed from
    relayed scalars: no round lost or repeated, and the rows equal the simulator's."""
    import signal

    from tests.conftest import subprocess_env
    from tests.runtime.test_fl_runtime import _free_port

    cfg = _cfg(broadcast="scalars", client_fraction=0.5)
    cfg["stop"] = {"rounds": 4}
    cfg["runtime"].update(server=f"127.0.0.1:{_free_port()}", join_timeout_s=90)
    path = write_config(cfg)
    assert main(["run", str(path), "--out", str(tmp_path / "sim"), "--quiet"]) == 0
    out = tmp_path / "run"
    first = procs.start("server", str(path), "--out", str(out), env=subprocess_env(GOSSAMER_TEST_KILL_AT_ROUND="1"))
    clients = [procs.start("client", str(path), "--id", str(i)) for i in range(4)]
    assert first.wait(timeout=120) == -signal.SIGKILL
    second = procs.start("server", "--resume", str(out))
    assert second.wait(timeout=120) == 0, second.stdout.read().decode()[-2000:]
    for c in clients:
        assert c.wait(timeout=30) == 0
    real, sim = _rows(out), _rows(tmp_path / "sim")
    assert [r["round"] for r in real] == ["0", "1", "2", "3", "4"]
    assert [r["test_loss"] for r in real] == [r["test_loss"] for r in sim]
    # what went down: scalars, not models (the model is 650 float32: 2,600 bytes)
    assert int(real[-1]["bytes_down"]) < 4 * 2 * 2600
