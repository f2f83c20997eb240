"""Gossamer on a GPU: its loop against a sequential PyTorch loop on the same GPU, and against
Gossamer on the CPU, with samples/s and the fraction of the GPU's peak FLOP/s reached.

Usage: python benchmarks/gpu.py [--device cuda] [--workloads cnn_fedavg,resnet8_gn,dpsgd]
                                [--clients 100,1000] [--rounds 3] [--cpu-rounds 1]
                                [--precision fp32] [--peak-tflops X] [--json]

Workloads (issue 15): FedAvg on CIFAR-shaped data (3x32x32, the `random` dataset; no download)
with the FedAvg paper's CNN (`cnn_fedavg`) and ResNet-8 with GroupNorm (`resnet8_gn`), K
clients, 50% per round, one local epoch of batch 10 over 40 samples each; D-PSGD on a random
4-regular graph of 10,000 nodes (an MLP, 784 inputs, 8 samples per node, one local step).
Ways, each in its own fresh process:
  gossamer      `gossamer.api.run` with `device` set (its loop time from summary.json)
  sequential    FedAvg only: plain PyTorch on the same device, one nn.Module, each selected
                client in turn with torch.optim.SGD, then the weighted average; the same init,
                selection and mini-batches as Gossamer's run (from its experiment builder), so
                the test losses agree up to float rounding
  gossamer_cpu  the same config with `device: cpu` and `--cpu-rounds` rounds (its loop time is
                scaled to `--rounds`)
Every way's process runs with Gossamer's glibc allocator settings (BASELINES.md; processes
started by cnn_fedavg.py's `child`).
Samples/s counts every sample a local step trains on; FLOP/s = samples/s x 3 x the model's
forward FLOPs per sample (torch.utils.flop_counter; backward ~2x forward); the peak is the
device's dense peak for the precision (a table of known GPUs, or --peak-tflops).
With --json the last stdout line is one JSON object with every number printed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
import cnn_fedavg  # noqa: E402  (its ways: Gossamer's run and the sequential loop)

# dense peak TFLOP/s by device-name fragment: (fp32, tf32, bf16), NVIDIA's data sheets (SXM)
PEAKS = {"H100": (67.0, 494.7, 989.4), "H200": (67.0, 494.7, 989.4), "A100": (19.5, 156.0, 312.0),
         "L40S": (91.6, 183.0, 362.0), "V100": (15.7, 15.7, 15.7)}


def fedavg_config(model: str, clients: int, rounds: int, device: str, precision: str) -> dict:
    return {
        "name": f"gpu-{model}-{clients}", "seed": 0, "device": device, "precision": precision,
        "data": {"dataset": "random", "params": {"shape": [3, 32, 32], "train": 40 * clients, "test": 1000}},
        "partition": {"name": "iid", "num_nodes": clients},
        "model": {"name": model},
        "algorithm": {"name": "fedavg", "params": {"client_fraction": 0.5, "weighting": "samples"}},
        "local": {"epochs": 1, "batch_size": 10, "lr": 0.05},
        "stop": {"rounds": rounds}, "eval": {"every": rounds},
        "output": {"progress": False, "checkpoint_every": 0},
    }


def dpsgd_config(nodes: int, rounds: int, device: str, precision: str) -> dict:
    return {
        "name": f"gpu-dpsgd-{nodes}", "seed": 0, "device": device, "precision": precision,
        "data": {"dataset": "random", "params": {"shape": [784], "train": 8 * nodes, "test": 1000}},
        "partition": {"name": "iid", "num_nodes": nodes},
        "model": {"name": "mlp", "params": {"hidden": [64]}},
        "algorithm": {"name": "dpsgd"},
        "topology": {"name": "random_regular", "params": {"degree": 4}},
        "local": {"steps": 1, "batch_size": 8, "lr": 0.05},
        "stop": {"rounds": rounds}, "eval": {"every": rounds, "nodes": 100},
        "output": {"progress": False, "checkpoint_every": 0},
    }


# ------------------------------------------------------------------------------ the children
def run_sequential(cfg: dict) -> dict:
    """cnn_fedavg.py's sequential loop on the config's device, evaluated once at the end."""
    return cnn_fedavg.run_sequential(cfg, evaluate_every_round=False)


def child(way: str, cfg: dict, timeout: float) -> dict:
    """This file's ``--child way`` in a fresh process, as cnn_fedavg.py runs its ways."""
    return cnn_fedavg.child(way, cfg, timeout, script=__file__)


# ------------------------------------------------------------------------------ the arithmetic
def forward_flops(cfg: dict) -> float:
    """FLOPs of one sample's forward pass through the config's model."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from gossamer.data import load_dataset
    from gossamer.models import build_model

    data = load_dataset(cfg["data"]["dataset"], **{**cfg["data"]["params"], "train": 10, "test": 10})
    model = build_model(cfg["model"]["name"], data.input_shape, data.num_classes, 0,
                        **cfg["model"].get("params", {}))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(data.x_train[:1])
    return float(counter.get_total_flops())


def trained_samples(cfg: dict) -> int:
    """Samples the run's local steps process (every step's batch), over all rounds."""
    rounds, nodes = cfg["stop"]["rounds"], cfg["partition"]["num_nodes"]
    per_node = cfg["data"]["params"]["train"] // nodes
    if cfg["algorithm"]["name"] == "dpsgd":
        return rounds * nodes * cfg["local"]["steps"] * cfg["local"]["batch_size"]
    return rounds * round(0.5 * nodes) * per_node * cfg["local"]["epochs"]


def peak_tflops(device_name: str, precision: str, given: float | None) -> float | None:
    if given is not None:
        return given
    for fragment, peaks in PEAKS.items():
        if fragment in device_name:
            return peaks[("fp32", "tf32", "bf16").index(precision)]
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--workloads", default="cnn_fedavg,resnet8_gn,dpsgd")
    parser.add_argument("--clients", default="100,1000")
    parser.add_argument("--dpsgd-nodes", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cpu-rounds", type=int, default=1, help="0 skips the CPU runs")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16"])
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--timeout", type=float, default=1200.0)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--config-json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        cfg = json.loads(args.config_json)
        from gossamer.sim.allocator import tune_allocator

        tune_allocator()          # every way with Gossamer's glibc settings, as in cnn_fedavg.py
        print(json.dumps({"gossamer": cnn_fedavg.run_gossamer, "sequential": run_sequential}[args.child](cfg)), flush=True)
        return 0

    import torch

    name = torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else "cpu"
    peak = peak_tflops(name, args.precision, args.peak_tflops)
    out: dict[str, object] = {"device": name, "precision": args.precision, "rounds": args.rounds,
                              "peak_tflops": peak, "torch": torch.__version__}
    print(f"{name}, {args.precision}, {args.rounds} rounds; peak {peak} TFLOP/s")
    print(f"{'workload':<20} {'way':<13} {'loop s':>9} {'samples/s':>11} {'TFLOP/s':>8} {'of peak':>8} {'test loss':>10}")
    jobs = []
    for work in [w for w in args.workloads.split(",") if w]:
        if work == "dpsgd":
            jobs.append((f"dpsgd_{args.dpsgd_nodes}", lambda rounds, dev, n=args.dpsgd_nodes:
                         dpsgd_config(n, rounds, dev, args.precision), False))
            continue
        for k in (int(c) for c in args.clients.split(",") if c):
            jobs.append((f"{work}_{k}", lambda rounds, dev, w=work, k=k:
                         fedavg_config(w, k, rounds, dev, args.precision), True))
    for key, make, sequential in jobs:
        cfg = make(args.rounds, args.device)
        flops = 3 * forward_flops(cfg)
        samples = trained_samples(cfg)
        ways = [("gossamer", "gossamer", cfg, 1.0)]
        if sequential:
            ways.append(("sequential", "sequential", cfg, 1.0))
        if args.cpu_rounds and args.device != "cpu":
            ways.append(("gossamer_cpu", "gossamer", make(args.cpu_rounds, "cpu"), args.rounds / args.cpu_rounds))
        loops = {}
        for label, way, c, scale in ways:
            result = child(way, c, args.timeout)
            if "error" in result:
                print(f"{key:<20} {label:<13} FAILED: {result['error']}")
                out[f"{key}_{label}_error"] = result["error"]
                continue
            loop = result["loop_s"] * scale
            loops[label] = loop
            rate = samples / loop
            tflops = rate * flops / 1e12
            share = tflops / peak if peak and label != "gossamer_cpu" else None
            out.update({f"{key}_{label}_loop_s": loop, f"{key}_{label}_samples_per_s": rate,
                        f"{key}_{label}_tflops": tflops, f"{key}_{label}_test_loss": result["test_loss"]})
            if share is not None:
                out[f"{key}_{label}_of_peak"] = share
            print(f"{key:<20} {label:<13} {loop:9.3f} {rate:11.0f} {tflops:8.3f} "
                  f"{'' if share is None else f'{share:8.2%}':>8} {result['test_loss']:10.6f}")
        for label in ("sequential", "gossamer_cpu"):
            if "gossamer" in loops and label in loops:
                out[f"{key}_{label}_speedup"] = loops[label] / loops["gossamer"]
                print(f"{key:<20} {label} / gossamer: {out[f'{key}_{label}_speedup']:.1f}x")
    if args.json:
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
