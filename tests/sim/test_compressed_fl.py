"""Synchronous FL with compressed uploads: bytes from the real encoding, feedback memory,
resume, and one-line refusals of what does not combine."""

import csv
import json

import numpy as np
import pytest
import torch

from gossamer import config, wire
from gossamer.cli import main
from gossamer.compression import build_compressor
from gossamer.sim.drivers.sync_fl import SyncFLDriver
from gossamer.sim.experiment import build_experiment
from gossamer.sim.runner import Runner
from tests.conftest import run_split, small_config

TOPK_EF = {"uplink": {"name": "topk", "params": {"density": 0.01}}, "feedback": "ef"}


def _run(cfg, out):
    runner = Runner(config.validate(cfg), out)
    runner.prepare(resume=False)
    runner.run()
    return json.loads((out / "summary.json").read_text())


def test_the_identity_compressor_changes_nothing(tmp_path):
    cfg = small_config("fedavg", stop={"rounds": 3})
    _run(cfg, tmp_path / "plain")
    cfg["compression"] = {"uplink": {"name": "none"}, "feedback": "ef"}
    _run(cfg, tmp_path / "none")
    plain, none = (list(csv.DictReader((tmp_path / d / "metrics.csv").open())) for d in ("plain", "none"))
    assert len(plain) == len(none)
    # plain FedAvg takes the mean inside the trainer (mean_of_models), the pipeline over the
    # upload rows: the same sum in another order, so losses may differ in the last digit on
    # some CPUs (AMD EPYC: 2.1574502 against 2.15745 at round 3); counts are exact
    for a, b in zip(plain, none, strict=True):
        for key in a:
            if key in ("test_accuracy", "test_loss", "train_loss") and a[key]:
                assert float(b[key]) == pytest.approx(float(a[key]), rel=1e-5), key
            else:
                assert a[key] == b[key], key


def test_topk_uploads_cost_their_encoding_and_the_server_gets_start_plus_decoded(tmp_path):
    cfg = small_config("fedavg", stop={"rounds": 3}, compression=TOPK_EF)
    exp = build_experiment(config.validate(cfg))
    driver = SyncFLDriver(exp)
    start = driver.state.params.clone()
    sent, real = {}, driver.pipeline.compress.apply

    def spy(up, state):
        up, decoded, state = real(up, state)
        sent["uploads"], sent["clients"] = up.start + decoded, up.clients
        return up, decoded, state

    driver.pipeline.compress.apply = spy
    driver.run_round()
    numel, n = exp.spec.numel, exp.num_nodes
    comp = build_compressor("topk", {"density": 0.01})
    # every client's upload: the header plus the top-k payload, exactly as encoded
    enc = comp.compress(torch.randn(1, numel))
    per_client = wire.HEADER_BYTES + len(comp.to_bytes(enc, 0))
    assert driver.sent_up.tolist() == [per_client] * n
    assert driver.bytes_up == n * per_client
    # each client's residual is what top-k dropped: zero on (at least) the k coordinates sent
    k = comp.k_for(numel)
    memory = driver.stage_state["memory"]
    assert ((memory != 0).sum(1) <= numel - k).all() and (memory != 0).any(1).all()
    # the server got start + decoded: each upload differs from the start on at most k
    # coordinates (start + 0 is exactly start, so this comparison is exact)
    steps = sent["uploads"][:, :numel] - start
    assert ((steps != 0).sum(1) <= k).all() and (steps != 0).any(1).all()
    # the new global model is their weighted mean. The mean's float rounding depends on the
    # BLAS kernel's summation order (a coordinate no client touched can come out of
    # sum_i w_i * start one ulp off start), so "moved" is beyond rounding: a server that got
    # the dense trained models would move every coordinate by a training step, far above it.
    new = driver.state.params
    w = torch.as_tensor(exp.trainer.sizes[sent["clients"]], dtype=torch.float32)
    assert torch.allclose(new, start + (w / w.sum()) @ steps, rtol=0, atol=1e-6)
    touched = (steps != 0).any(0)
    assert torch.allclose(new[~touched], start[~touched], rtol=1e-5, atol=0)
    moved = int((~torch.isclose(new, start, rtol=1e-5, atol=0)).sum())
    assert 0 < moved <= n * k


def test_error_feedback_sends_every_update_eventually():
    """With EF the sum of what the server received plus the clients' residuals equals the sum
    of the clients' true updates (checked on one client over rounds, full participation)."""
    cfg = small_config("fedavg", stop={"rounds": 4}, compression=TOPK_EF)
    cfg["partition"]["num_nodes"] = 2
    exp = build_experiment(config.validate(cfg))
    driver = SyncFLDriver(exp)
    sent, true = torch.zeros(exp.spec.numel), torch.zeros(exp.spec.numel)
    real = driver.pipeline.compress.apply

    def spy(up, state):
        true.add_(up.delta()[0])
        up, decoded, state = real(up, state)
        sent.add_(decoded[0])
        return up, decoded, state

    driver.pipeline.compress.apply = spy
    for _ in range(4):
        driver.run_round()
    assert torch.allclose(sent + driver.stage_state["memory"][0], true, atol=1e-5)


def test_value_dependent_sizes_price_the_upload_after_training(tmp_path):
    """threshold sends a count that depends on the update: uploads are priced from the real
    sizes, and a thin uplink makes the compressed run's clock shorter by exactly that time."""
    cfg = small_config("fedavg", stop={"rounds": 2})
    cfg["system"] = {"bandwidth_up_Bps": {"dist": "constant", "value": 1e4}}
    plain = _run(cfg, tmp_path / "plain")
    cfg["compression"] = {"uplink": {"name": "threshold", "params": {"tau": 0.02}}}
    small = _run(cfg, tmp_path / "small")
    summary_bytes = sum(small["bytes_up_per_client"])
    assert summary_bytes == small["bytes_sent_total"] < plain["bytes_sent_total"] / 2
    assert small["sim_time_s"] < plain["sim_time_s"]


@pytest.mark.parametrize("comp", [TOPK_EF, {"uplink": {"name": "qsgd", "params": {"levels": 4}},
                                            "feedback": "ef21"}])
def test_compressed_runs_resume_identically(tmp_path, comp):
    cfg = small_config("fedavg", stop={"rounds": 6}, compression=comp)
    cfg["algorithm"]["params"] = {"client_fraction": 0.5}
    run_split(cfg, tmp_path, split=3, total=6).run()
    assert (tmp_path / "a/metrics.csv").read_bytes() == (tmp_path / "b/metrics.csv").read_bytes()


def test_scaffold_compresses_the_model_block_and_sends_the_rest_raw():
    cfg = small_config("scaffold", stop={"rounds": 1}, compression=TOPK_EF)
    exp = build_experiment(config.validate(cfg))
    driver = SyncFLDriver(exp)
    driver.run_round()
    numel = exp.spec.numel
    comp = build_compressor("topk", {"density": 0.01})
    payload = len(comp.to_bytes(comp.compress(torch.randn(1, numel)), 0))
    assert np.all(driver.sent_up == wire.HEADER_BYTES + payload + 4 * numel)


@pytest.mark.parametrize("change,field", [
    ({"algorithm": {"name": "dpsgd"}, "topology": {"name": "ring"}, "compression": TOPK_EF},
     "compression.uplink"),
    ({"compression": {"feedback": "ef"}}, "compression.feedback"),
    ({"compression": {"uplink": {"name": "threshold", "params": {"tau": 0.1}}},
      "algorithm": {"name": "fedavg", "params": {"deadline_s": 5.0}}}, "compression.uplink"),
    ({"compression": {"uplink": {"name": "topk", "params": {"density": 2}}}},
     "compression.uplink.params"),
    ({"compression": {"uplink": {"name": "zip"}}}, "compression.uplink.name"),
])
def test_bad_compression_configs_are_one_line_exit_2(write_config, tmp_path, capsys, change, field):
    cfg = small_config("fedavg", stop={"rounds": 1})
    cfg.update(change)
    code = main(["run", str(write_config(cfg)), "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"{field}:" in err[0], err


def test_dgc_without_momentum_is_error_feedback(tmp_path):
    cfg = small_config("fedavg", stop={"rounds": 4}, compression=TOPK_EF)
    _run(cfg, tmp_path / "ef")
    cfg["compression"] = {**TOPK_EF, "feedback": "dgc", "momentum": 0.0}
    _run(cfg, tmp_path / "dgc")
    assert (tmp_path / "ef/metrics.csv").read_bytes() == (tmp_path / "dgc/metrics.csv").read_bytes()


def test_dgc_warm_up_sends_denser_updates_first_and_resumes_exactly(tmp_path):
    from gossamer.compression import dgc_density

    comp = {"uplink": {"name": "topk", "params": {"density": 0.01}}, "feedback": "dgc",
            "warmup_rounds": 3, "clip_norm": 1.0}
    cfg = small_config("fedavg", stop={"rounds": 5}, compression=comp)
    driver = SyncFLDriver(build_experiment(config.validate(cfg)))
    numel = driver.exp.spec.numel
    sizes = []
    for r in range(5):
        driver.run_round()
        sizes.append(int(driver.sent_up[0]))
        k = build_compressor("topk", {"density": dgc_density(r, 0.01, 3)}).k_for(numel)
        assert (driver.stage_state["memory"] != 0).sum(1).max() <= numel - k       # masked where sent
    assert sizes[0] > sizes[1] > sizes[2] > sizes[3] == sizes[4]
    run_split(cfg, tmp_path, split=2, total=5).run()
    assert (tmp_path / "a/metrics.csv").read_bytes() == (tmp_path / "b/metrics.csv").read_bytes()


def test_dgc_needs_topk(write_config, tmp_path, capsys):
    cfg = small_config("fedavg", stop={"rounds": 1})
    cfg["compression"] = {"uplink": {"name": "qsgd"}, "feedback": "dgc"}
    code = main(["run", str(write_config(cfg)), "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "compression: feedback dgc sparsifies with top-k" in err[0], err


# --- the broadcast ----------------------------------------------------------------------------
def test_an_identity_broadcast_changes_nothing_but_rounding(tmp_path):
    """A client's copy is updated as ``copy + (x - copy)``, equal to x up to float rounding."""
    import csv

    cfg = small_config("fedavg", stop={"rounds": 3})
    cfg["algorithm"]["params"] = {"client_fraction": 0.5}
    plain = _run(cfg, tmp_path / "plain")
    cfg["compression"] = {"downlink": {"name": "none"}}
    same = _run(cfg, tmp_path / "none")
    assert plain["bytes_received_total"] == same["bytes_received_total"]
    assert plain["sim_time_s"] == same["sim_time_s"]
    rows = [list(csv.DictReader((tmp_path / d / "metrics.csv").open())) for d in ("plain", "none")]
    for a, b in zip(*rows, strict=True):
        assert float(a["test_loss"]) == pytest.approx(float(b["test_loss"]), rel=1e-5)


def test_clients_receive_the_compressed_difference_to_their_copy_and_train_from_it():
    cfg = small_config("fedavg", stop={"rounds": 3},
                       compression={"downlink": {"name": "quantize", "params": {"bits": 8}}})
    cfg["algorithm"]["params"] = {"client_fraction": 0.5}
    exp = build_experiment(config.validate(cfg))
    driver = SyncFLDriver(exp)
    numel = exp.spec.numel
    per_client = wire.HEADER_BYTES + build_compressor("quantize", {"bits": 8}).nominal_bytes(numel)
    seen, real_train = {}, exp.trainer.train

    def spy(rows, nodes, key, **kw):
        seen["rows"], seen["nodes"] = rows.clone(), np.asarray(nodes)
        return real_train(rows, nodes, key, **kw)

    exp.trainer.train = spy
    for r in range(3):
        before, global_before = driver.estimate.clone(), driver.state.params.clone()
        down_before = driver.bytes_down
        driver.run_round()
        ids = seen["nodes"]
        assert driver.bytes_down - down_before == len(ids) * per_client
        others = np.setdiff1d(np.arange(exp.num_nodes), ids)
        assert torch.equal(driver.estimate[others], before[others])       # nobody else moved
        # the selected trained from their (updated) copy, which is close to, not equal to, x
        assert torch.equal(seen["rows"], driver.estimate[torch.from_numpy(ids)])
        gap = (driver.estimate[torch.from_numpy(ids)] - global_before).abs().max()
        assert gap < 0.05 and (r == 0 or gap > 0)     # round 1: x is still the shared init


def test_compressed_broadcast_and_uploads_resume_identically(tmp_path):
    cfg = small_config("fedavg", stop={"rounds": 6}, compression={
        **TOPK_EF, "downlink": {"name": "topk", "params": {"density": 0.1}}})
    cfg["algorithm"]["params"] = {"client_fraction": 0.5}
    run_split(cfg, tmp_path, split=3, total=6).run()
    assert (tmp_path / "a/metrics.csv").read_bytes() == (tmp_path / "b/metrics.csv").read_bytes()


@pytest.mark.parametrize("algorithm", [{"name": "fedprox", "params": {"prox_mu": 0.1}}, {"name": "scaffold"}])
def test_broadcast_compression_refuses_algorithms_that_need_the_exact_model(
        write_config, tmp_path, capsys, algorithm):
    cfg = small_config("fedavg", stop={"rounds": 1}, compression={"downlink": {"name": "quantize"}})
    cfg["algorithm"] = algorithm
    code = main(["run", str(write_config(cfg)), "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "compression.downlink: " in err[0], err
