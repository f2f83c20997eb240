"""Isolated experts with a router against one federated model at equal compute (issue 18).

Usage: python benchmarks/experts.py [--rounds 30] [--seeds 0,1,2] [--json]

Workload: `examples/islands/isolated_experts.yaml` (MNIST-5k, 40 nodes with two label shards
each, 4 islands by main label, MLP). Per seed, in this process:
  experts   --rounds rounds: every node trains its island's expert and the router (the same
            MLP with one output per island) once per round: two model-trainings per sample
  fedavg    the same config with FedAvg over all 40 nodes for 2 x --rounds rounds: the same
            number of model-trainings per sample (equal total compute)
Printed per seed and as mean +- std: the routed ensemble's accuracy (top-1 and top-2), the
best single expert's on the whole test set, FedAvg's; all final test accuracies.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

CONFIG = Path(__file__).resolve().parent.parent / "examples" / "islands" / "isolated_experts.yaml"


def run(seed: int, rounds: int, algorithm: str) -> dict[str, str]:
    from gossamer.api import run as api_run

    sets = {"seed": seed, "stop.rounds": rounds, "eval.every": rounds}
    if algorithm == "fedavg":
        sets.update({"algorithm.name": "fedavg", "algorithm.params": {}})
    with tempfile.TemporaryDirectory() as tmp:
        return api_run(str(CONFIG), out=Path(tmp) / "run", overrides=sets).rows[-1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    table: dict[str, list[float]] = {"routed_top1": [], "routed_top2": [], "best_expert": [], "fedavg": []}
    for seed in (int(s) for s in args.seeds.split(",")):
        experts = run(seed, args.rounds, "isolated_experts")
        fedavg = run(seed, 2 * args.rounds, "fedavg")
        table["routed_top1"].append(float(experts["test_accuracy"]))
        table["routed_top2"].append(float(experts["topk_accuracy"]))
        table["best_expert"].append(float(experts["best_expert_accuracy"]))
        table["fedavg"].append(float(fedavg["test_accuracy"]))
        print(f"seed {seed}: " + "  ".join(f"{k} {v[-1]:.4f}" for k, v in table.items()), flush=True)
    summary = {k: {"mean": statistics.fmean(v), "std": statistics.pstdev(v), "runs": v}
               for k, v in table.items()}
    for k, v in summary.items():
        print(f"{k:12s} {v['mean']:.4f} +- {v['std']:.4f}")
    if args.json:
        print(json.dumps({"rounds": args.rounds, **summary}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
