"""CNN FedAvg on the CPU: Gossamer's loop against a sequential PyTorch loop (and pfl), same run.

Usage: python benchmarks/cnn_fedavg.py [--models cnn,cnn_fedavg] [--data mnist,cifar]
                                       [--clients 100] [--rounds 3] [--repeats 1] [--json]

Workloads (issue 15): each model on MNIST-5k images (1x28x28) and on CIFAR-shaped data
(3x32x32, the `random` dataset: no download here), K clients, 50% of them per round, one local
epoch of batch 10, lr 0.05. Ways, each in its own fresh process, interleaved per repeat:
  gossamer    `gossamer.api.run` of the config, as a user runs it (its loop time from summary.json)
  sequential  plain PyTorch: one nn.Module, each selected client in turn with torch.optim.SGD,
              then the sample-weighted average; the same init, client selection and mini-batches
              (taken from Gossamer's experiment builder, outside the timed loop), so the test
              losses must agree to float rounding
  pfl         Apple's pfl-research, when installed; skipped with a note otherwise
Both ways evaluate the global model on the test set after every round. With --json the last
stdout line is one JSON object: per workload the loop times, final test loss and accuracy of
each way, and `<workload>_<way>_speedup` = that way's loop time / Gossamer's.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = {
    "mnist": {"dataset": "mnist5k", "params": {"image": True}},
    "cifar": {"dataset": "random", "params": {"shape": [3, 32, 32], "train": 4000, "test": 1000}},
}


def config(model: str, data: str, clients: int, rounds: int) -> dict:
    return {
        "name": f"cnn-{model}-{data}", "seed": 0,
        "data": DATA[data],
        "partition": {"name": "iid", "num_nodes": clients},
        "model": {"name": model},
        "algorithm": {"name": "fedavg", "params": {"client_fraction": 0.5, "weighting": "samples"}},
        "local": {"epochs": 1, "batch_size": 10, "lr": 0.05},
        "stop": {"rounds": rounds},
        "eval": {"every": 1},
        "output": {"progress": False, "checkpoint_every": 0},
    }


# ------------------------------------------------------------------------------ the children
def run_gossamer(cfg: dict) -> dict:
    from gossamer.api import run

    with tempfile.TemporaryDirectory() as tmp:
        summary = run(cfg, out=Path(tmp) / "run").summary
    return {"loop_s": summary["loop_time_s"], "test_loss": summary["final_test_loss"],
            "test_accuracy": summary["final_test_accuracy"], "forward": summary["forward"]}


def run_sequential(cfg: dict) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from gossamer import config as config_mod
    from gossamer.experiment import build
    from gossamer.models import build_model
    from gossamer.protocols.sync_fl import SyncRound

    c = config_mod.validate(cfg)
    exp = build(c)
    trainer, spec, algo = exp.trainer, exp.spec, exp.algorithm
    model = build_model(c.model.name, exp.dataset.input_shape, exp.dataset.num_classes, c.seed,
                        **c.model.params)
    x, y = trainer.x, trainer.y
    x_test, y_test = exp.dataset.x_test, exp.dataset.y_test
    params = list(model.parameters())
    global_row = exp.init_params.reshape(-1).clone()
    candidates = np.flatnonzero(trainer.sizes > 0)
    opt = torch.optim.SGD(params, lr=c.local.lr)        # plain SGD keeps no state: one for all
    loss = acc = None
    start = time.perf_counter()
    for r in range(1, c.stop.rounds + 1):
        ids = SyncRound(algo, c.seed, r, candidates).selected
        idx, valid = trainer.batches(ids, np.full(len(ids), r))
        weights = algo.mean_weights(trainer.sizes[ids]).tolist()
        summed = [torch.zeros_like(p) for p in params]
        for b in range(len(ids)):
            spec.load_into(model, global_row)
            for t in range(idx.shape[1]):
                take = torch.from_numpy(idx[b, t][valid[b, t]])
                if len(take) == 0:
                    continue
                opt.zero_grad()
                F.cross_entropy(model(x[take]), y[take]).backward()
                opt.step()
            with torch.no_grad():
                for s, p in zip(summed, params, strict=True):
                    s.add_(p, alpha=weights[b])
        with torch.no_grad():
            for p, s in zip(params, summed, strict=True):
                p.copy_(s)
            global_row = spec.flatten(model)
            logits = model(x_test)
            loss = F.cross_entropy(logits, y_test).item()
            acc = (logits.argmax(1) == y_test).float().mean().item()
    return {"loop_s": time.perf_counter() - start, "test_loss": loss, "test_accuracy": acc}


# ------------------------------------------------------------------------------ the parent
def child(way: str, cfg: dict, timeout: float) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "src"), env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, __file__, "--child", way, "--config-json", json.dumps(cfg)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="cnn,cnn_fedavg")
    parser.add_argument("--data", default="mnist,cifar")
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--config-json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        cfg = json.loads(args.config_json)
        out = run_gossamer(cfg) if args.child == "gossamer" else run_sequential(cfg)
        print(json.dumps(out), flush=True)
        return 0

    from gossamer.models import MODELS

    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in MODELS.names()]
    if unknown:
        parser.error(f"--models: unknown {unknown}; registered: {', '.join(MODELS.names())}")
    ways = ["gossamer", "sequential"]
    pfl_note = None
    if importlib.util.find_spec("pfl") is None:
        pfl_note = "pfl: skipped (pfl-research is not installed; pip install pfl)"
    else:
        pfl_note = "pfl: installed, but this script has no pfl way yet; not run"
    out: dict[str, object] = {"clients": args.clients, "rounds": args.rounds, "repeats": args.repeats,
                              "cpus": os.cpu_count(), "pfl": pfl_note}
    print(f"CNN FedAvg, K={args.clients}, 50% per round, {args.rounds} rounds, {args.repeats} repeat(s)")
    print(f"{'workload':<22} {'way':<11} {'loop s':>8} {'test loss':>11} {'acc':>7}  path")
    for model in models:
        for data in [d for d in args.data.split(",") if d]:
            cfg = config(model, data, args.clients, args.rounds)
            key = f"{model}_{data}"
            runs: dict[str, list[dict]] = {w: [] for w in ways}
            for _ in range(args.repeats):
                for way in ways:
                    runs[way].append(child(way, cfg, args.timeout))
            loops = {}
            for way in ways:
                ok = [r for r in runs[way] if "error" not in r]
                if not ok:
                    print(f"{key:<22} {way:<11} FAILED: {runs[way][-1]['error']}")
                    out[f"{key}_{way}_error"] = runs[way][-1]["error"]
                    continue
                loops[way] = statistics.median(r["loop_s"] for r in ok)
                last = ok[-1]
                out[f"{key}_{way}_loop_s"] = loops[way]
                out[f"{key}_{way}_loop_runs_s"] = [r["loop_s"] for r in ok]
                out[f"{key}_{way}_test_loss"] = last["test_loss"]
                out[f"{key}_{way}_test_accuracy"] = last["test_accuracy"]
                path = ", ".join(f"{k}={v}" for k, v in last.get("forward", {}).items())
                print(f"{key:<22} {way:<11} {loops[way]:8.2f} {last['test_loss']:11.7f} "
                      f"{last['test_accuracy']:7.4f}  {path}")
            if "gossamer" in loops and "sequential" in loops:
                out[f"{key}_sequential_speedup"] = loops["sequential"] / loops["gossamer"]
                print(f"{key:<22} sequential / gossamer loop: {out[f'{key}_sequential_speedup']:.2f}x")
    print(pfl_note)
    if args.json:
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
