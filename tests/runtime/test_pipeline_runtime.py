"""The upload pipeline on real processes: compressed uploads with feedback and DP-FedAvg run
the same stages as the simulator (protocols/upload.py), so `gossamer launch` equals
`gossamer run` round by round; so does a BatchNorm model (its statistics travel in the rows)."""

import csv
import json
import signal

import pytest

from gossamer.cli import main
from tests.conftest import small_config
from tests.runtime.test_fl_runtime import _free_port, procs, start_with_victim  # noqa: F401


def _rows(run_dir):
    with (run_dir / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def _cfg(**sections):
    cfg = small_config("fedavg", stop={"rounds": 3})
    cfg["partition"]["num_nodes"] = 4
    cfg["runtime"] = {"round_timeout_s": 30, "join_timeout_s": 60, "poll_interval_s": 0.1,
                      "threads_per_process": 2}      # the simulator's threads: exact parity
    cfg.update(sections)
    return cfg


CASES = {
    "topk_ef": {"compression": {"uplink": {"name": "topk", "params": {"density": 0.05}},
                                "feedback": "ef"}},
    "randk_ef21_scaffold": {"algorithm": {"name": "scaffold", "params": {}},
                            "compression": {"uplink": {"name": "randk", "params": {"density": 0.1}},
                                            "feedback": "ef21"}},
    "dp_client_noise": {"privacy": {"dp": {"level": "client", "clip_norm": 0.5,   # (every process
                                           "target_epsilon": 30.0, "noise": "clients"}}},  # plans the noise)
    "dp_server_noise": {"privacy": {"dp": {"level": "client", "clip_norm": 0.5,
                                           "noise_multiplier": 0.8, "noise": "server"}}},
    "batchnorm": {"model": {"name": "mlp_bn", "params": {"hidden": [16]}}},   # per-node statistics
    # sketches the coordinator sums, never decodes alone; its momentum and error sketches
    "fetchsgd": {"compression": {"uplink": {"name": "countsketch",
                                            "params": {"rows": 5, "ratio": 0.1, "density": 0.05}},
                                 "feedback": "fetchsgd", "momentum": 0.9}},
    "dp_in_the_secure_sum": {"privacy": {"secure_aggregation": {"threshold": 0.5},
                                         "dp": {"level": "client", "clip_norm": 0.5,
                                                "noise_multiplier": 0.8, "noise": "clients"}}},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_launch_runs_the_simulators_upload_pipeline(write_config, tmp_path, case):
    path = write_config(_cfg(**CASES[case]))
    assert main(["launch", str(path), "--out", str(tmp_path / "real")]) == 0
    assert main(["run", str(path), "--out", str(tmp_path / "sim"), "--quiet"]) == 0
    real, sim = _rows(tmp_path / "real"), _rows(tmp_path / "sim")
    assert [r["test_accuracy"] for r in real] == [r["test_accuracy"] for r in sim]
    if case == "batchnorm":     # layer by layer, a client's one-node products round unlike the batched ones
        assert [float(r["test_loss"]) for r in real] == pytest.approx(
            [float(r["test_loss"]) for r in sim], rel=1e-5)
    else:
        assert [r["test_loss"] for r in real] == [r["test_loss"] for r in sim]
    if "privacy" in CASES[case]:
        assert [r["epsilon"] for r in real] == [r["epsilon"] for r in sim]
    summary = json.loads((tmp_path / "real" / "summary.json").read_text())
    if case == "dp_client_noise":           # privacy.dp.target_epsilon: the same noise planned
        simulated = json.loads((tmp_path / "sim" / "summary.json").read_text())
        assert summary["dp_noise_multiplier"] == simulated["dp_noise_multiplier"] > 0
        assert float(real[-1]["epsilon"]) <= 30.0
    numel = summary["num_params"]
    if "compression" in CASES[case]:        # what really crossed the wire is the encoded update
        vectors = 2 if "scaffold" in case else 1
        assert summary["bytes_up_total"] < 3 * 4 * vectors * numel * 4 * 0.7


def test_secure_aggregation_on_real_processes_equals_the_simulator(write_config, tmp_path):
    cfg = _cfg(privacy={"secure_aggregation": {"threshold": 0.5}})
    path = write_config(cfg)
    assert main(["launch", str(path), "--out", str(tmp_path / "real")]) == 0
    assert main(["run", str(path), "--out", str(tmp_path / "sim"), "--quiet"]) == 0
    real, sim = _rows(tmp_path / "real"), _rows(tmp_path / "sim")
    assert [r["test_accuracy"] for r in real] == [r["test_accuracy"] for r in sim]
    assert [r["test_loss"] for r in real] == [r["test_loss"] for r in sim]


def test_secure_aggregation_recovers_a_client_killed_after_sharing_keys(write_config, tmp_path, procs):  # noqa: F811
    """Client 3 is killed (SIGKILL) in round 2 after sharing its keys, before its masked
    update: the others' Shamir shares remove its masks, the round aggregates the three
    survivors, and round 3 runs without it. The simulator's run where node 3 is removed
    during round 2 (before its upload) gives the same models round by round."""
    port = _free_port()
    cfg = _cfg(privacy={"secure_aggregation": {"threshold": 0.5}})
    cfg["runtime"].update(round_timeout_s=8, server=f"127.0.0.1:{port}")
    path = write_config(cfg)
    out = tmp_path / "real"
    server, victim = start_with_victim(procs, path, out, 4, 3, GOSSAMER_TEST_KILL_BEFORE_MASKED_AT_ROUND="2")
    assert server.wait(timeout=180) == 0, server.stdout.read().decode()[-3000:]
    assert victim.wait(timeout=10) == -signal.SIGKILL
    real = _rows(out)
    assert [r["participants"] for r in real[1:]] == ["4", "3", "3"]
    # the simulator: node 3 is removed mid-round 2 (after round 1 ended, before its upload)
    sim_cfg = _cfg(privacy={"secure_aggregation": {"threshold": 0.5}})
    probe = tmp_path / "probe"
    assert main(["run", str(write_config(sim_cfg)), "--out", str(probe), "--quiet"]) == 0
    t1 = float(_rows(probe)[1]["sim_time_s"])
    sim_cfg["faults"] = {"events": [{"at_s": t1 + 1e-6, "action": "remove", "nodes": [3]}]}
    assert main(["run", str(write_config(sim_cfg)), "--out", str(tmp_path / "sim"), "--quiet"]) == 0
    sim = _rows(tmp_path / "sim")
    assert [r["test_accuracy"] for r in real] == [r["test_accuracy"] for r in sim]
    assert [r["test_loss"] for r in real] == [r["test_loss"] for r in sim]


def test_a_client_given_a_tampered_share_drops_out_of_the_round_instead_of_crashing():
    """Another client can send it garbage through the server (a share it cannot decrypt):
    the client leaves that round's protocol (the others recover its mask), and lives on."""
    import struct

    from gossamer import config
    from gossamer.privacy.secagg import CIPHER_BYTES, Randomness, advertise_keys
    from gossamer.privacy.secagg import Client as Party
    from gossamer.runtime import schema
    from gossamer.runtime.fl_client import Client

    cfg = config.validate(_cfg(privacy={"secure_aggregation": {"threshold": 2}}))
    client = Client(cfg, 0, server="127.0.0.1:1")                 # never connects
    sent = []
    client._send = lambda message, round_, kind=1: sent.append((kind, message))
    client._train_and_send(1, client.exp.init_params.reshape(-1))
    assert sent[-1][0] == 5 and len(sent[-1][1]) == 68            # it advertised its keys
    other = advertise_keys(Party.new(1, None, Randomness(3)))
    secagg = schema.TaskHeader.SECAGG
    client._secagg_step(schema.TaskHeader(kind=secagg, round=1, stage=1, members=2, share=0.5),
                        struct.pack("<I", 2) + sent[-1][1] + other)
    assert sent[-1][0] == 6                                        # it shared its keys
    garbage = struct.pack("<II", 1, 1) + bytes(CIPHER_BYTES)
    client._secagg_step(schema.TaskHeader(kind=secagg, round=1, stage=2), garbage)
    assert client.secagg is None and [k for k, _ in sent] == [5, 6]
