"""Personalized FL on label-skewed MNIST-5k and on an SBM graph: per-client accuracy, mean and
worst 10% (issue 19).

Usage: python benchmarks/personalization.py [--task mnist|sbm|sbm_shift|sbm_overlap] [--seeds 0,1,2]
                                            [--rounds 30] [--alpha 0.1] [--optimizer sgd|adamw]
                                            [--lr LR]
                                            [--ways fedavg,fedavg_ft,local_only,ditto,fedrep,fedcac,fedpub]
                                            [--json]

mnist (default): 20 clients on Dirichlet(--alpha) shards of MNIST-5k's training rows, each
holding 20% of its rows out as its own test split (`partition.test_fraction: 0.2`), a 784-64-10
MLP (FED-PUB: the same MLP with masks), every client in every round, 2 local epochs of batch 16
at lr 0.05.
sbm: the `sbm` dataset, 3,000 nodes in 20 label-skewed communities (Dirichlet(1) class
proportions, 5 classes, p_in 0.1 with homophily 0.8, p_out 0.002, 16 features at noise 4), one
community per client (20 clients), 20% of each client's nodes labelled for training and 40%
held out as its test nodes; a 2-layer GCN (hidden 128) and a linear classifier (FED-PUB: with
masks), full-batch, 5 local steps at lr 0.2 per round, every client in every round.
--optimizer adamw trains every way's local steps with Adam instead (fresh state per round, no
weight decay; --lr, default 0.005 with adamw), as FED-PUB's authors train every method they
compare (Adam at lr 0.01).
sbm_shift: the same with `groups: 2` (the two halves of the communities map the same features
to different labels). sbm_overlap: the same graph as sbm with `overlap: true` (FED-PUB's
overlapping setting: 4 parts of 750 nodes, each client a random half of its part).
Ways:
  fedavg      the global model on every client's own test rows
  fedavg_ft   the global model fine-tuned for 20 local steps by each client before evaluation
  local_only  each client trains alone (nothing is sent)
  ditto       Ditto, lam 0.1 (personal models pulled towards the global one)
  fedrep      FedRep, the last layer as each client's head (10 head epochs per round)
  fedcac      FedCAC, tau 0.5, beta 100 (the authors' CIFAR-10 settings, for 300 rounds)
  fedcac_b10  FedCAC, tau 0.5, beta 10 (collaboration narrows 10x sooner, for short runs)
  fedcac_t03  FedCAC, tau 0.3, beta 10 (the best of tau 0.3/0.5/0.8 x beta 3/10 on MNIST)
  fedpub      FED-PUB, tau 10, L1 1e-3 on the masks, proximal 1e-3 (the authors' defaults)
  fedpub_t100 FED-PUB with tau 100 (sharper similarity weights; an ablation)
  fedpub_keep FED-PUB with each client's Adam state kept between its rounds, as the authors'
              clients keep it (needs --optimizer adamw)
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
    "fedcac_t03": ({"name": "fedcac", "params": {"tau": 0.3, "beta": 10}}, {}),
    "fedpub": ({"name": "fedpub", "params": {"tau": 10.0, "l1": 1e-3, "loc_l2": 1e-3}}, {}),
    "fedpub_t100": ({"name": "fedpub", "params": {"tau": 100.0, "l1": 1e-3, "loc_l2": 1e-3}}, {}),
    "fedpub_keep": ({"name": "fedpub", "params": {"tau": 10.0, "l1": 1e-3, "loc_l2": 1e-3,
                                                  "keep_optimizer_state": True}}, {}),
}
SBM = {"num_clients": 20, "nodes": 3000, "communities": 20, "classes": 5, "p_in": 0.1,
       "p_out": 0.002, "homophily": 0.8, "label_alpha": 1.0, "features": 16, "noise": 4.0,
       "train_fraction": 0.2, "test_fraction": 0.4}


def config(way: str, seed: int, args: argparse.Namespace) -> dict:
    algorithm, evaluation = WAYS[way]
    masked = way.startswith("fedpub")
    lr = args.lr if args.lr is not None else 0.005 if args.optimizer == "adamw" else None
    if args.task == "mnist":
        task = {
            "data": {"dataset": "mnist5k"},
            "partition": {"name": "dirichlet", "num_nodes": 20, "params": {"alpha": args.alpha},
                          "test_fraction": 0.2},
            "model": {"name": "masked_mlp" if masked else "mlp", "params": {"hidden": [64]}},
            "local": {"epochs": 2, "batch_size": 16, "lr": 0.05},
        }
    else:
        task = {
            "data": {"dataset": "sbm", "params": {**SBM, "groups": 2 if args.task == "sbm_shift" else 1,
                                                  "overlap": args.task == "sbm_overlap", "seed": seed}},
            "partition": {"name": "natural", "num_nodes": SBM["num_clients"]},
            "model": {"name": "gcn", "params": {"hidden": 128, "masked": masked}},
            "local": {"epochs": 5, "batch_size": 1, "lr": 0.2},
        }
    if args.optimizer == "adamw":
        task["local"]["optimizer"] = "adamw"
    if lr is not None:
        task["local"]["lr"] = lr
    return {
        "name": f"personal-{args.task}-{way}-{seed}", "seed": seed, **task,
        "algorithm": algorithm,
        "stop": {"rounds": args.rounds},
        "eval": {"every": args.rounds, **evaluation},
        "output": {"progress": False, "checkpoint_every": 0},
    }


def main() -> int:
    from gossamer.api import run

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=("mnist", "sbm", "sbm_shift", "sbm_overlap"), default="mnist")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd",
                        help="every way's local optimizer (adamw: fresh state per round)")
    parser.add_argument("--lr", type=float, default=None,
                        help="every way's local learning rate (default: the task's, 0.005 with adamw)")
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
