"""The ``device`` and ``precision`` fields (gossamer/devices.py, docs/devices.md).

This machine has no GPU, so the device-dependent paths are checked two ways on the CPU:

- with torch's default device set to ``meta``, a run configured ``device: cpu`` must write the
  same metrics as a normal run: every tensor the simulator makes names its device (a factory
  that relied on the default would make a meta tensor, which fails or changes the numbers);
- host reads (``.item()``, ``float(t)``, ``.numpy()``, ...) are counted per round: the count
  does not grow with the cohort, so a GPU round synchronizes a fixed number of times.

The tests at the end run only where CUDA is available.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from gossamer import api, devices
from gossamer.config import ConfigError
from tests.conftest import ROOT, small_config

# example configs that together reach every device-dependent part of the supported patterns:
# the dense FedAvg round, the row path with each upload stage, robust rules and attacks,
# personalized state, contribution scores, the aggregator tree, D-PSGD's sparse mixing
EXAMPLES = [
    "quickstart.yaml", "compression/topk_ef.yaml", "compression/dgc.yaml",
    "compression/powersgd_r2.yaml", "compression/bidirectional.yaml",
    "contribution/free_riders.yaml", "heterogeneous/scaffold.yaml", "hierarchy/fedavg_tree.yaml",
    "islands/diloco.yaml", "personalized/fedpub_mnist.yaml", "personalized/fedrep.yaml",
    "personalized/fedcac.yaml", "privacy/dp_sample_sigma1.yaml", "privacy/dp_client_sigma1.yaml",
    "privacy/secure_aggregation.yaml", "privacy/dp_rqm.yaml", "robustness/signflip20_median.yaml",
    "dpsgd.yaml", "decentralized/dpsgd_dynamic.yaml", "decentralized/dfedsam.yaml",
    "heterogeneous/fedbuff.yaml", "heterogeneous/fedcompass.yaml", "heterogeneous/theory_fedfix.yaml",
    "compression/choco_topk10.yaml", "decentralized/gradient_tracking.yaml", "decentralized/srrw.yaml",
    "islands/gradient_coding.yaml", "islands/streaming_diloco.yaml", "islands/co2.yaml",
    "compression/zo_onebyte.yaml", "gossip.yaml", "modest_failures.yaml", "islands/isolated_experts.yaml",
    "scale/papaya.yaml", "scale/scaffold.yaml",          # registered populations
]

# a smaller run of the slow ones (the same code paths)
TEXT = ["data.params.max_chars_per_file=4000", "eval.test_subset=200"]
SMALLER = {"islands/diloco.yaml": ["local.steps=3", *TEXT],
           "islands/streaming_diloco.yaml": ["local.steps=10", *TEXT],
           "islands/co2.yaml": ["local.steps=10", *TEXT],
           "scale/papaya.yaml": ["stop.rounds=30", "eval.every=15", "output.checkpoint_every=0",
                                 "population.eval_clients=50"],
           "scale/scaffold.yaml": ["population.eval_clients=50"]}


def _metrics(config, out: Path, overrides: list[str]) -> bytes:
    api.run(config, out=out, overrides=overrides)
    return (out / "metrics.csv").read_bytes()


def _on_meta(config, out: Path, overrides: list[str]) -> bytes:
    torch.set_default_device("meta")
    try:
        return _metrics(config, out, overrides)
    finally:
        torch.set_default_device(None)


@pytest.mark.slow
@pytest.mark.parametrize("example", EXAMPLES)
def test_every_tensor_names_its_device(example, tmp_path):
    path = ROOT / "examples" / example
    sets = ["stop.rounds=2", "eval.every=1", "output.progress=false", *SMALLER.get(example, [])]
    assert _on_meta(path, tmp_path / "meta", sets) == _metrics(path, tmp_path / "plain", sets)


def test_bf16_on_meta_default_and_close_to_fp32(tmp_path):
    cfg = small_config("fedavg", stop={"rounds": 4})
    fp32 = _metrics(cfg, tmp_path / "fp32", [])
    bf16 = _on_meta(cfg, tmp_path / "bf16", ["precision=bf16"])
    assert bf16 != fp32                           # computed in another precision
    a, b = (np.genfromtxt(x.splitlines(), delimiter=",", names=True) for x in (fp32, bf16))
    # the same training, rounded differently: within a few percent of fp32's loss
    assert np.allclose(a["test_loss"], b["test_loss"], rtol=0.05)
    assert b["test_loss"][-1] < b["test_loss"][0]


def test_bf16_autograd_path_dpsgd(tmp_path):
    cfg = small_config("dpsgd", stop={"rounds": 3})
    rows = np.genfromtxt(_metrics(cfg, tmp_path / "r", ["precision=bf16"]).splitlines(),
                         delimiter=",", names=True)
    assert np.isfinite(rows["test_loss"]).all() and rows["test_loss"][-1] < rows["test_loss"][0]


def test_environment_names_the_device(tmp_path):
    import json

    api.run(small_config("fedavg", stop={"rounds": 1}), out=tmp_path / "r", overrides=["device=auto"])
    env = json.loads((tmp_path / "r" / "environment.json").read_text())
    assert env["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu")
    assert ("gpu" in env) == torch.cuda.is_available()


# --- the config's one-line refusals -------------------------------------------------------------
@pytest.mark.parametrize("value", ["gpu", "cuda:x", "tpu", "CPU", "cuda:-1"])
def test_device_names_checked(value):
    with pytest.raises(ConfigError, match=r"^device: .* is not a device: auto, cpu, cuda or cuda:N"):
        api.load_config(small_config(), [f"device={value}"])


def test_precision_values_checked():
    with pytest.raises(ConfigError, match=r"^precision: "):
        api.load_config(small_config(), ["precision=fp16"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"^device: cuda: torch sees no CUDA device"):
        api.run(small_config(), out=tmp_path / "r", overrides=["device=cuda"])
    assert devices.resolve("auto") == torch.device("cpu")


def test_unsupported_pattern_and_tf32_on_cpu_refused():
    with pytest.raises(ConfigError, match=r"^device: G-Rank scores click logs in numpy"):
        devices.check(torch.device("cuda"), "fp32", "grank")
    devices.check(torch.device("cuda"), "fp32", "async_gossip")
    devices.check(torch.device("cuda"), "tf32", "sync_fl")          # allowed
    with pytest.raises(ConfigError, match=r"^precision: tf32 is a CUDA matmul format"):
        devices.check(torch.device("cpu"), "tf32", "sync_fl")


def test_a_runtime_process_keeps_its_models_on_the_host():
    """A runtime process (``population=False``) places its trainer and evaluators only: its
    initial model and mixing matrix stay host tensors, which the trainer takes as they are."""
    from gossamer.experiment import build

    cfg = api.load_config(small_config("dpsgd"), ["device=auto"])
    exp = build(cfg, population=False)
    assert exp.init_params.device.type == "cpu" and exp.mixing.device.type == "cpu"
    assert exp.trainer.device == exp.device == devices.resolve("auto")
    result = exp.trainer.train(exp.init_params.expand(2, -1).clone(), np.arange(2), 0)
    assert result.params.device.type == "cpu" and result.loss.device.type == "cpu"


# --- host reads per round -------------------------------------------------------------------------
HOST_READS = {"item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__", "cpu"}


class _HostReads(TorchFunctionMode):
    """Counts the calls that read a tensor's value into Python or numpy."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in HOST_READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _reads_per_round(algorithm: str, nodes: int, **extra) -> int:
    from gossamer.sim.drivers import driver_for
    from gossamer.sim.experiment import build_experiment

    cfg = api.load_config(small_config(algorithm, partition={"name": "iid", "num_nodes": nodes}, **extra))
    exp = build_experiment(cfg)
    driver = driver_for(exp.algorithm.pattern)(exp)
    driver.run_round()                          # the first round reserves buffers
    with _HostReads() as reads:
        driver.run_round()
    return reads.count


TOPK_EF = {"uplink": {"name": "topk", "params": {"density": 0.1}}, "feedback": "ef"}


@pytest.mark.parametrize(("algorithm", "extra", "reads"), [
    ("fedavg", {}, 0),                                          # the dense round
    ("fedavg", {"compression": TOPK_EF}, 0),                    # the row path, an upload stage
    ("fedavg", {"local": {"epochs": 1, "batch_size": 16, "lr": 0.1, "momentum": 0.9}}, 0),  # autograd
    ("fedavg", {"precision": "bf16"}, 0),
    ("fedprox", {}, 0),
    ("scaffold", {}, 1),              # the cohort's control variates go back to the host store
    ("dpsgd", {}, 0),
])
def test_host_reads_per_round_do_not_grow_with_the_cohort(algorithm, extra, reads):
    assert _reads_per_round(algorithm, 8, **extra) == _reads_per_round(algorithm, 64, **extra) == reads


# --- on a GPU -------------------------------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("example", EXAMPLES)
def test_cuda_matches_cpu_up_to_rounding(example, tmp_path):
    path = ROOT / "examples" / example
    sets = ["stop.rounds=3", "output.progress=false"]
    cpu = np.genfromtxt(_metrics(path, tmp_path / "cpu", sets).splitlines(), delimiter=",", names=True)
    gpu = np.genfromtxt(_metrics(path, tmp_path / "gpu", sets + ["device=cuda"]).splitlines(),
                        delimiter=",", names=True)
    assert np.allclose(cpu["test_loss"], gpu["test_loss"], rtol=1e-3, atol=1e-4)
    assert (cpu["bytes_up"] == gpu["bytes_up"]).all() and (cpu["sim_time_s"] == gpu["sim_time_s"]).all()


@cuda
@pytest.mark.parametrize("algorithm", ["fedavg", "scaffold", "dpsgd"])
def test_real_processes_train_on_the_gpu(write_config, tmp_path, algorithm):
    """``gossamer launch`` with ``device: cuda``: every process trains and evaluates on the GPU,
    messages and aggregation stay on the host; the metrics equal the CPU launch's up to
    rounding."""
    from gossamer.cli import main

    cfg = small_config(algorithm, stop={"rounds": 3})
    cfg["partition"]["num_nodes"] = 4
    cfg["runtime"] = {"round_timeout_s": 60, "join_timeout_s": 120, "poll_interval_s": 0.1}
    runs = {}
    for device in ("cpu", "cuda"):
        path = write_config({**cfg, "device": device}, name=f"{device}.yaml")
        assert main(["launch", str(path), "--out", str(tmp_path / device)]) == 0
        runs[device] = np.genfromtxt(tmp_path / device / "metrics.csv", delimiter=",", names=True)
    assert np.allclose(runs["cpu"]["test_loss"], runs["cuda"]["test_loss"], rtol=1e-3, atol=1e-4)


@cuda
def test_cuda_resume_on_cpu(tmp_path):
    cfg = small_config("fedavg", stop={"rounds": 4})
    api.run(cfg, out=tmp_path / "r", overrides=["device=cuda", "stop.rounds=2"])
    api.run(out=tmp_path / "r", resume=True, overrides=["stop.rounds=4", "device=cpu"])
    assert len(np.genfromtxt(tmp_path / "r" / "metrics.csv", delimiter=",", names=True)) == 5


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
@pytest.mark.parametrize("algorithm", ["fedavg", "scaffold", "dpsgd", "gossip"])
def test_ranks_on_two_gpus_match_one_gpu(write_config, tmp_path, algorithm):
    """``gossamer run --ranks 2`` with ``device: cuda``: each rank computes on its own GPU and
    rows go rank to rank through NCCL (checkpoints gathered on rank 0 too); the metrics equal
    one rank's on one GPU up to rounding (a GPU kernel may round a node's values differently
    with the number of nodes in its call), and the simulated bytes and times exactly."""
    from gossamer.cli import main

    cfg = small_config(algorithm, stop={"rounds": 3}, output={"progress": False, "checkpoint_every": 2})
    path = write_config({**cfg, "device": "cuda"}, name="gpus.yaml")
    runs = {}
    for ranks in (1, 2):
        assert main(["run", str(path), "--out", str(tmp_path / f"r{ranks}"), "--ranks", str(ranks), "--quiet"]) == 0
        runs[ranks] = np.genfromtxt(tmp_path / f"r{ranks}" / "metrics.csv", delimiter=",", names=True)
    assert np.allclose(runs[1]["test_loss"], runs[2]["test_loss"], rtol=1e-4, atol=1e-5)
    assert (runs[1]["bytes_up"] == runs[2]["bytes_up"]).all() and (runs[1]["sim_time_s"] == runs[2]["sim_time_s"]).all()
