"""Do contribution scores rank free-riders and label-flippers below honest clients? (issue 19)

Usage: python benchmarks/contribution.py [--seeds 0,1,2] [--clients 20] [--attackers 3]
                                         [--rounds 10] [--json]

FedAvg on MNIST-5k (784-64-10 MLP), --clients clients on Dirichlet(0.5) shards, all taking
part every round; --attackers of them (drawn by the seed) are, in separate runs:
  free_rider        send the model they received (no work)
  free_rider_noisy  the same plus N(0, 0.001^2) noise on every weight, to look trained
  label_flip        train on flipped labels (y -> 9 - y)
  label_noise       train on noisy labels (80% of them drawn uniformly at random)
  mixed             --attackers free-riders and 10% more clients with noisy labels, in one run
                    (each kind's AUC against the honest clients is printed too)
Every round the server scores the uploads (contribution.methods: loo, cosine, shapley with
10 permutations, truncation 0.01, utility minus the loss on 500 test rows). Printed per
attack and seed: the AUC of each method's scores (mean per round taken part) ranking the
attackers below the honest clients, and the scoring cost per round against the round's
training time, both measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

ATTACKS = {"free_rider": ("free_rider", {}), "free_rider_noisy": ("free_rider", {"sigma": 0.001}),
           "label_flip": ("label_flip", {}), "label_noise": ("label_noise", {"rate": 0.8}),
           "mixed": ("free_rider", {})}
MIXED = [{"attack": "label_noise", "fraction": 0.1, "params": {"rate": 0.8}}]   # with "mixed"


def config(attack: str, seed: int, args: argparse.Namespace) -> dict:
    name, params = ATTACKS[attack]
    return {
        "name": f"contribution-{attack}-{seed}", "seed": seed,
        "data": {"dataset": "mnist5k"},
        "partition": {"name": "dirichlet", "num_nodes": args.clients, "params": {"alpha": 0.5}},
        "model": {"name": "mlp", "params": {"hidden": [64]}},
        "algorithm": {"name": "fedavg"},
        "local": {"epochs": 2, "batch_size": 16, "lr": 0.05},
        "stop": {"rounds": args.rounds},
        "adversary": {"attack": name, "fraction": args.attackers / args.clients, "params": params,
                      "groups": MIXED if attack == "mixed" else []},
        "contribution": {"methods": ["loo", "cosine", "shapley"], "permutations": 10,
                         "truncation": 0.01, "validation": 500},
        "output": {"progress": False, "checkpoint_every": 0},
    }


def main() -> int:
    from gossamer.api import run

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--attackers", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    report = []
    print(f"{'attack':17s} seed   AUC loo  cosine  shapley   scoring s/round  training s/round")
    for attack in args.attacks.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            with tempfile.TemporaryDirectory() as tmp:
                summary = run(config(attack, seed, args), out=Path(tmp) / "run").summary
            c = summary["contribution"]
            auc = c["auc_flagged_below_others"]
            train = summary["train_s"] / summary["rounds"]
            row = {"attack": attack, "seed": seed, "auc": auc, "scoring_s_per_round": c["seconds_per_round"],
                   "evaluations_per_round": c["evaluations_per_round"], "train_s_per_round": train,
                   "final_test_accuracy": summary["final_test_accuracy"]}
            report.append(row)
            print(f"{attack:17s} {seed:4d}   {auc['loo']:7.3f}  {auc['cosine']:6.3f}  {auc['shapley']:7.3f}"
                  f"   {c['seconds_per_round']:15.3f}  {train:16.3f}")
            for kind, by in c.get("auc_by_attack", {}).items():
                row.setdefault("auc_by_attack", {})[kind] = by
                print(f"  {kind:15s}        {by['loo']:7.3f}  {by['cosine']:6.3f}  {by['shapley']:7.3f}")
    for method in ("loo", "cosine", "shapley"):
        worst = min(r["auc"][method] for r in report)
        print(f"lowest AUC of {method}: {worst:.3f}")
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
