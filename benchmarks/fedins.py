"""FedIns on label-skewed MNIST-5k: SSF pools vs plain SSF vs FedAvg of the full model (issue 19).

Usage: python benchmarks/fedins.py [--seeds 0,1,2] [--rounds 30] [--alpha 0.1] [--lr 0.05]
                                   [--ways fedavg,fedavg_pre,fedavg_pre_ft,ssf,fedins,fedins_c]
                                   [--task mnist|domains] [--json]

10% of MNIST-5k's 4,000 training rows are a public set no client holds
(`partition.public_fraction: 0.1`, the same in every way, so every way's clients hold the same
rows); the other 3,600 go to 20 clients on Dirichlet(--alpha) shards, each holding 20% of its
rows out as its own test split. ``--task domains``: the same with every image (train and test)
inverted with probability 1/2, a mixture of two domains inside every client. Model: a 784-64-10 MLP; the pre-trained ways first train it
centrally on the public rows (500 SGD steps of batch 32 at lr 0.05). Every client in every
round, 2 local epochs of batch 16 at --lr. Ways:
  fedavg         FedAvg of the full model from its random init (the public rows unused)
  fedavg_pre     FedAvg of the full model from the pre-trained model
  fedavg_pre_ft  the same, each client fine-tuning the global model for 20 steps before evaluation
  ssf            FedIns with a pool of one: plain SSF (a scale and shift per hidden unit) and one
                 head on the frozen pre-trained backbone, FedAvg'ed
  fedins         FedIns: pools of 25, top 3 per instance, lam 0.1, on the same frozen backbone
  fedins_c       the same with queries centred on the public rows' mean feature (not in the paper)
Printed per way: the mean over seeds (min-max) of the clients' mean accuracy on their own test
rows, of the worst 10% of clients, and of the shared test set's accuracy at the last round; the
pre-trained model's own accuracy (round 0 of fedavg_pre); MB sent; simulated time.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

PRETRAIN = {"steps": 500, "lr": 0.05, "batch_size": 32}
WAYS = {
    "fedavg": ({"name": "fedavg"}, False, {}),
    "fedavg_pre": ({"name": "fedavg"}, True, {}),
    "fedavg_pre_ft": ({"name": "fedavg"}, True, {"personal_finetune_steps": 20}),
    "ssf": ({"name": "fedins", "params": {"pool_size": 1, "top_k": 1}}, True, {}),
    "fedins": ({"name": "fedins", "params": {"pool_size": 25, "top_k": 3, "lam": 0.1}}, True, {}),
    "fedins_c": ({"name": "fedins", "params": {"pool_size": 25, "top_k": 3, "lam": 0.1,
                                               "center_queries": True}}, True, {}),
}


def two_domains(folder: Path) -> dict:
    """MNIST-5k as a mixture of two domains: every image (train and test) is inverted
    (``1 - x``) with probability 1/2 (``numpy.random.default_rng(0)``), written as parquet
    tables; returns the ``data`` section that reads them (``table`` dataset)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from gossamer.data import load_dataset

    mnist = load_dataset("mnist5k")
    draw = np.random.default_rng(0)
    for name, x, y in (("train", mnist.x_train, mnist.y_train), ("test", mnist.x_test, mnist.y_test)):
        x = x.numpy().reshape(len(x), -1)
        flip = draw.random(len(x)) < 0.5
        x = np.where(flip[:, None], 1 - x, x).astype(np.float32)
        pixels = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), x.shape[1])
        pq.write_table(pa.table({"pixels": pixels, "label": y.numpy()}), folder / f"{name}.parquet")
    return {"dataset": "table", "params": {"path": str(folder / "train.parquet"), "features": "pixels",
                                           "label": "label", "test_path": str(folder / "test.parquet")}}


def config(way: str, seed: int, args: argparse.Namespace, data: dict) -> dict:
    algorithm, pretrained, evaluation = WAYS[way]
    model = {"name": "mlp", "params": {"hidden": [64]}}
    if pretrained:
        model["pretrain"] = PRETRAIN
    return {
        "name": f"fedins-{way}-{seed}", "seed": seed,
        "data": data,
        "partition": {"name": "dirichlet", "num_nodes": 20, "params": {"alpha": args.alpha},
                      "test_fraction": 0.2, "public_fraction": 0.1},
        "model": model,
        "algorithm": algorithm,
        "local": {"epochs": 2, "batch_size": 16, "lr": args.lr},
        "stop": {"rounds": args.rounds},
        "eval": {"every": args.rounds, **evaluation},
        "output": {"progress": False, "checkpoint_every": 0},
    }


def pool_usage(result) -> int:
    """How many pool entries the final global pool selects for any shared test image."""
    import torch

    from gossamer.data import load_dataset

    model, cfg = result.model(), result.config
    x = load_dataset(cfg.data.dataset, **cfg.data.params).x_test
    params = {name: p.detach().unsqueeze(0) for name, p in model.named_parameters()}
    with torch.no_grad():
        weights = model.route(params, x[None])[1]
    return int((weights[0] > 0).any(0).sum())


def _spread(values: list[float]) -> str:
    return f"{sum(values) / len(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def main() -> int:
    from gossamer.api import run

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--ways", default=",".join(WAYS))
    parser.add_argument("--task", choices=["mnist", "domains"], default="mnist")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    folder = tempfile.TemporaryDirectory()
    data = {"dataset": "mnist5k"} if args.task == "mnist" else two_domains(Path(folder.name))
    seeds = [int(s) for s in args.seeds.split(",")]
    report = {}
    print(f"{'way':13s}  mean accuracy         worst 10%             shared test           MB sent   sim s")
    for way in args.ways.split(","):
        rows = []
        for seed in seeds:
            with tempfile.TemporaryDirectory() as tmp:
                result = run(config(way, seed, args, data), out=Path(tmp) / "run")
                first, last = result.rows[0], result.rows[-1]
                used = pool_usage(result) if WAYS[way][0]["name"] == "fedins" else None
            rows.append({"seed": seed, "mean": float(last["personal_accuracy"]),
                         "worst10": float(last["personal_worst10"]),
                         "test": float(last["test_accuracy"]),
                         "start_mean": float(first["personal_accuracy"]),
                         "start_test": float(first["test_accuracy"]),
                         "bytes": result.summary["bytes_sent_total"] + result.summary["bytes_received_total"],
                         "sim_time_s": result.summary["sim_time_s"], "entries_used": used})
        report[way] = rows
        print(f"{way:13s}  {_spread([r['mean'] for r in rows])}   {_spread([r['worst10'] for r in rows])}"
              f"   {_spread([r['test'] for r in rows])}   {rows[0]['bytes'] / 1e6:7.1f}   {rows[0]['sim_time_s']:6.1f}")
        if rows[0]["entries_used"] is not None and WAYS[way][0]["params"]["pool_size"] > 1:
            print(f"{'':13s}  pool entries any shared-test image selects at the end: "
                  f"{', '.join(str(r['entries_used']) for r in rows)} (of 25; per seed)")
        if way == "fedavg_pre":
            print(f"{'  (round 0)':13s}  {_spread([r['start_mean'] for r in rows])}   the pre-trained model alone; "
                  f"shared test {_spread([r['start_test'] for r in rows])}")
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
