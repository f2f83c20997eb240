"""Reproduction (c): D-PSGD with a single global merge at the end against FedAvg (Zhu et al.,
"A Single Merging Suffices: Recovering Server-based Learning Performance in Decentralized
Learning", 2025, arXiv:2507.06542), plus the other D-PSGD variants on the same workload.

The MNIST-5k D-PSGD workload (100 nodes, MLP 784-64-10, one local epoch of 4 steps per round,
lr 0.05, 20 rounds, random 4-regular graph with Metropolis-Hastings weights), with IID shards
and with Dirichlet(0.1) label skew. Runs ``examples/decentralized/fedavg_100.yaml`` (server),
``dpsgd_merge.yaml`` under several communication schedules, ``dfedsam.yaml`` (also as
DFedSAM-MGS) and ``gradient_tracking.yaml``, each through the same ``Runner`` as ``gossamer
run`` (its metrics equal ``gossamer run CONFIG --set ...``).

Usage: python benchmarks/dpsgd_variants.py [--jobs 1] [--only merge] [--data dirichlet] [--rounds 20]
Prints the tables (copied into docs/dpsgd_variants.md); writes
benchmarks/results/dpsgd_variants.json and docs/figures/dpsgd_merge.png (with --rounds R other
than 20: dpsgd_variants_r{R}.json and dpsgd_merge_r{R}.png).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EX = "examples/decentralized"
DL = ["algorithm.params.final_merge=false"]
RUNS = [  # label, group, config, overrides
    ("FedAvg (server)", "merge", f"{EX}/fedavg_100.yaml", []),
    ("D-PSGD", "merge", f"{EX}/dpsgd_merge.yaml", ["algorithm.params.schedule=constant", *DL]),
    ("D-PSGD + final merge", "merge", f"{EX}/dpsgd_merge.yaml", ["algorithm.params.schedule=constant"]),
    ("gossip every 5 rounds + final merge", "merge", f"{EX}/dpsgd_merge.yaml",
     ["algorithm.params.schedule=constant", "algorithm.params.gossip_every=5"]),
    ("increasing 0->2 steps + final merge", "merge", f"{EX}/dpsgd_merge.yaml",
     ["algorithm.params.schedule=increasing", "algorithm.params.gossip_steps=2"]),
    ("local only + final merge", "merge", f"{EX}/dpsgd_merge.yaml", []),
    ("local only, no merge", "merge", f"{EX}/dpsgd_merge.yaml", DL),
    ("DFedSAM (rho 0.05)", "variants", f"{EX}/dfedsam.yaml", []),
    ("DFedSAM-MGS (rho 0.05, Q 4)", "variants", f"{EX}/dfedsam.yaml", ["algorithm.name=dfedsam_mgs"]),
    ("D-PSGD, 4 gossip steps", "variants", f"{EX}/dpsgd_merge.yaml",
     ["algorithm.params.schedule=constant", "algorithm.params.gossip_steps=4", *DL]),
    ("gradient tracking", "variants", f"{EX}/gradient_tracking.yaml", []),
]
DATA = {"IID": ["partition.name=iid", "partition.params={}"],
        "Dirichlet 0.1": ["partition.name=dirichlet", "partition.params.alpha=0.1"]}
STYLE = {"FedAvg (server)": ("k", "--"), "D-PSGD": ("tab:blue", "-"),
         "D-PSGD + final merge": ("tab:blue", ":"), "gossip every 5 rounds + final merge": ("tab:green", "-"),
         "increasing 0->2 steps + final merge": ("tab:purple", "-"),
         "local only + final merge": ("tab:red", "-"), "local only, no merge": ("tab:red", ":")}


def run(job: tuple) -> dict:
    import os

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    from gossamer import config
    from gossamer.sim.runner import Runner

    label, group, data, path, overrides, rounds = job
    torch.set_num_threads(1)
    cfg = config.load(REPO / path, [*DATA[data], *overrides, f"stop.rounds={rounds}",
                                    "output.checkpoint_every=0", "output.progress=false"])
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        runner = Runner(cfg, Path(tmp) / "run", on_row=rows.append)
        runner.prepare(resume=False)
        summary = runner.run()
        wall = time.perf_counter() - start
    last = rows[-1]
    n = cfg.partition.num_nodes
    per_node = summary.get("mean_bytes_per_node")
    if per_node is None:                       # FL: every client's upload and download
        per_node = (last["bytes_up"] + last["bytes_down"]) / n
    return {"label": label, "group": group, "data": data, "config": path, "overrides": overrides,
            "final_test_accuracy": last["test_accuracy"],
            "final_avg_model_accuracy": last.get("avg_model_accuracy"),
            "best_test_accuracy": max(r["test_accuracy"] for r in rows),
            "rounds": rounds, "mb_per_node": per_node / 1e6, "sim_time_s": last["sim_time_s"], "wall_s": wall,
            "accuracy": [r["test_accuracy"] for r in rows],
            "avg_model_accuracy": [r.get("avg_model_accuracy") for r in rows]}


def plot(results: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datas = [d for d in DATA if any(res["data"] == d for res in results)]
    fig, axes = plt.subplots(1, len(datas), figsize=(max(8.0, 5.5 * len(datas)), 4.6), sharey=True,
                             squeeze=False)
    axes = axes[0]
    for ax, data in zip(axes, datas, strict=True):
        for res in results:
            if res["data"] != data or res["label"] not in STYLE:
                continue
            color, ls = STYLE[res["label"]]
            ax.plot(range(len(res["accuracy"])), res["accuracy"], color=color, ls=ls, label=res["label"])
        ax.set_title(f"MNIST-5k, 100 nodes, {data}")
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean test accuracy of the nodes' models")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


def table(results: list[dict]) -> str:
    lines = ["| run | data | final node accuracy | average-model accuracy | best | MB per node | sim s |",
             "|---|---|---|---|---|---|---|"]
    for res in results:
        avg = res["final_avg_model_accuracy"]
        lines.append(f"| {res['label']} | {res['data']} | {res['final_test_accuracy']:.3f} | "
                     f"{'-' if avg is None else f'{avg:.3f}'} | {res['best_test_accuracy']:.3f} | "
                     f"{res['mb_per_node']:.1f} | {res['sim_time_s']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--only", choices=["merge", "variants"], default=None)
    parser.add_argument("--data", choices=["iid", "dirichlet"], default=None)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--plot-only", action="store_true", help="re-plot the saved results")
    args = parser.parse_args()
    suffix = "" if args.rounds == 20 else f"_r{args.rounds}"
    out = REPO / "benchmarks" / "results" / f"dpsgd_variants{suffix}.json"
    figure = REPO / "docs" / "figures" / f"dpsgd_merge{suffix}.png"
    if args.plot_only:
        plot(json.loads(out.read_text()), figure)
        return
    datas = [d for d in DATA if args.data is None or d.lower().startswith(args.data)]
    jobs = [(label, group, data, path, overrides, args.rounds) for data in datas
            for label, group, path, overrides in RUNS if args.only in (None, group)]
    if args.jobs > 1:
        with mp.get_context("spawn").Pool(args.jobs) as pool:
            results = pool.map(run, jobs)
    else:
        results = [run(job) for job in jobs]
    for res in results:
        print(f"{res['label']:40s} {res['data']:14s} acc {res['final_test_accuracy']:.3f} "
              f"({res['wall_s']:.0f} s)", flush=True)
    print(table(results))
    out.write_text(json.dumps(results, indent=1) + "\n")
    if args.only in (None, "merge"):
        plot(results, figure)


if __name__ == "__main__":
    main()
