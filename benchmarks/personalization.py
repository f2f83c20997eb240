"""Personalized FL on label-skewed MNIST-5k: per-client accuracy, mean and worst 10% (issue 19).

Usage: python benchmarks/personalization.py [--seeds 0,1,2] [--rounds 30] [--alpha 0.1]
                                            [--ways fedavg,fedavg_ft,local_only,ditto,fedrep,fedcac]
                                            [--json]

20 clients on Dirichlet(--alpha) shards of MNIST-5k's training rows, each holding 20% of
its rows out as its own test split (`partition.test_fraction: 0.2`), a 784-64-10 MLP, every
client in every round, 2 local epochs of batch 16 at lr 0.05. Ways:
  fedavg      the global model on every client's own test rows
  fedavg_ft   the global model fine-tuned for 20 local steps by each client before evaluation
  local_only  each client trains alone (nothing is sent)
  ditto       Ditto, lam 0.1 (personal models pulled towards the global one)
  fedrep      FedRep, the last layer as each client's head (10 head epochs per round)
  fedcac      FedCAC, tau 0.5, beta 100 (the authors' CIFAR-10 settings, for 300 rounds)
  fedcac_b10  FedCAC, tau 0.5, beta 10 (collaboration narrows 10x sooner, for short runs)
Printed per way: the mean over seeds (and the spread, min-max) of the clients' mean accuracy
and of the mean over the worst 10% of clients, at the last round; bytes sent; simulated time.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

WAYS = {
    "fedavg": ({"name": "fedavg"}, {}),
    "fedavg_ft": ({"name": "fedavg"}, {"personal_finetune_steps": 20}),
    "local_only": ({"name": "local_only"}, {}),
    "ditto": ({"name": "ditto", "params": {"lam": 0.1}}, {}),
    "fedrep": ({"name": "fedrep", "params": {"head_layers": 1, "head_epochs": 10}}, {}),
    "fedcac": ({"name": "fedcac", "params": {"tau": 0.5, "beta": 100}}, {}),
    "fedcac_b10": ({"name": "fedcac", "params": {"tau": 0.5, "beta": 10}}, {}),
}


def config(way: str, seed: int, args: argparse.Namespace) -> dict:
    algorithm, evaluation = WAYS[way]
    return {
        "name": f"personal-{way}-{seed}", "seed": seed,
        "data": {"dataset": "mnist5k"},
        "partition": {"name": "dirichlet", "num_nodes": 20, "params": {"alpha": args.alpha},
                      "test_fraction": 0.2},
        "model": {"name": "mlp", "params": {"hidden": [64]}},
        "algorithm": algorithm,
        "local": {"epochs": 2, "batch_size": 16, "lr": 0.05},
        "stop": {"rounds": args.rounds},
        "eval": {"every": args.rounds, **evaluation},
        "output": {"progress": False, "checkpoint_every": 0},
    }


def main() -> int:
    from gossamer.api import run

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--ways", default=",".join(WAYS))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    report = {}
    print(f"{'way':11s}  mean accuracy (min-max over seeds)   worst 10%            MB sent   sim s")
    for way in args.ways.split(","):
        rows = []
        for seed in seeds:
            with tempfile.TemporaryDirectory() as tmp:
                result = run(config(way, seed, args), out=Path(tmp) / "run")
                last = result.rows[-1]
            rows.append({"seed": seed, "mean": float(last["personal_accuracy"]),
                         "worst10": float(last["personal_worst10"]),
                         "bytes": result.summary["bytes_sent_total"] + result.summary["bytes_received_total"],
                         "sim_time_s": result.summary["sim_time_s"]})
        report[way] = rows
        mean = [r["mean"] for r in rows]
        worst = [r["worst10"] for r in rows]
        print(f"{way:11s}  {sum(mean) / len(mean):.3f} ({min(mean):.3f}-{max(mean):.3f})"
              f"              {sum(worst) / len(worst):.3f} ({min(worst):.3f}-{max(worst):.3f})"
              f"   {rows[0]['bytes'] / 1e6:7.1f}   {rows[0]['sim_time_s']:6.1f}")
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
