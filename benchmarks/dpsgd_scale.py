"""D-PSGD at scale (DESIGN.md "MNIST-5k D-PSGD"): wall time, node-steps per second, memory vs N.

Usage: python benchmarks/dpsgd_scale.py [--nodes 250,500,1000,2000] [--rounds 50]
                                       [--repeats 1] [--batched] [--json]

Runs `python -m gossamer run examples/dpsgd_1000.yaml --set partition.num_nodes=N` for each N,
each in its own process, and reports: whole-process wall time, loop time split into local
training / mixing / evaluation, local SGD node-steps per second of training time and of loop
time, and peak memory (the child's own ru_maxrss). Memory is fitted as a + b * N by least
squares; the largest relative deviation from the fit says whether it grows linearly.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG = "examples/dpsgd_1000.yaml"


def run_one(nodes: int, rounds: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "gossamer", "run", CONFIG, "--out", str(out), "--quiet",
               "--set", f"partition.num_nodes={nodes}", "--set", f"stop.rounds={rounds}",
               "--set", "output.checkpoint_every=0"]
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(proc.pid, 0)
        whole = time.perf_counter() - start
        stderr = proc.stderr.read().decode()
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"N={nodes}: gossamer failed:\n{stderr[-2000:]}")
        summary = json.loads((out / "summary.json").read_text())
    return {
        "nodes": nodes, "whole_s": whole, "loop_s": summary["loop_time_s"],
        "train_s": summary["train_s"], "mix_s": summary["communicate_s"], "eval_s": summary["eval_s"],
        "node_steps": summary["node_steps"], "peak_mib": usage.ru_maxrss / 1024,
        "mean_node_acc": summary["final_test_accuracy"], "spectral_gap": summary["spectral_gap"],
        "node_steps_per_train_s": summary["node_steps"] / max(summary["train_s"], 1e-9),
        "node_steps_per_loop_s": summary["node_steps"] / max(summary["loop_time_s"], 1e-9),
    }


def run_batched(nodes: int, rounds: int) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "baselines" / "dpsgd_batched.py"),
                           "--nodes", str(nodes), "--rounds", str(rounds)],
                          cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"N={nodes}: the batched baseline failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least-squares a + b x, and the largest relative deviation of ys from it."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / max(sum((x - mx) ** 2 for x in xs), 1e-12)
    a = my - b * mx
    dev = max(abs(y - (a + b * x)) / y for x, y in zip(xs, ys, strict=True))
    return a, b, dev


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", default="250,500,1000,2000")
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=1, help="runs per N (interleaved with --batched)")
    parser.add_argument("--batched", action="store_true", help="also run the hand-written batched loop")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = []
    for n in [int(v) for v in args.nodes.split(",")] * args.repeats:
        r = run_one(n, args.rounds)
        if args.batched:
            b = run_batched(n, args.rounds)
            r.update(batched_loop_s=b["loop_s"], batched_mean_node_acc=b["mean_node_acc"],
                     batched_peak_mib=b["peak_mib"], loop_over_batched=r["loop_s"] / b["loop_s"])
            print(f"N={n:5d}  batched loop {b['loop_s']:6.2f} s, mean node acc {b['mean_node_acc']:.4f}; "
                  f"gossamer loop {r['loop_s']:6.2f} s: {r['loop_over_batched']:.2f}x the batched loop",
                  flush=True)
        results.append(r)
        print(f"N={n:5d}  whole {r['whole_s']:6.1f} s  loop {r['loop_s']:6.1f} s "
              f"(train {r['train_s']:5.1f}, mix {r['mix_s']:5.1f}, eval {r['eval_s']:5.1f})  "
              f"{r['node_steps_per_train_s']:9.0f} node-steps/s of training, "
              f"{r['node_steps_per_loop_s']:8.0f} per loop s  peak {r['peak_mib']:7.0f} MiB  "
              f"mean node acc {r['mean_node_acc']:.4f}", flush=True)
    out = {"rounds": args.rounds, "runs": results}
    if len({r["nodes"] for r in results}) >= 2:
        a, b, dev = linear_fit([r["nodes"] for r in results], [r["peak_mib"] for r in results])
        out.update(memory_fixed_mib=a, memory_per_node_mib=b, memory_max_rel_deviation=dev)
        print(f"peak memory ~ {a:.0f} MiB + {b:.3f} MiB x N (largest deviation from the line {dev:.1%})")
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
