"""Disaster scenarios: losing devices that hold data versus devices that only relay.

Reproduces the setting of Palmieri et al., "Exploring the Impact of Disrupted Peer-to-Peer
Communications on Fully Decentralized Learning in Disaster Scenarios" (2023,
arXiv:2310.02986): D-PSGD over a Barabasi-Albert graph of 100 devices, 50 with IID MNIST-5k
data and 50 relay-only (`examples/disaster/base.yaml`). At t = --at-s simulated seconds a
scheduled event removes `count` devices chosen at random among the data holders, among the
relays, or among all devices, or the highest-degree devices (hubs, data or not). The value is the final mean test accuracy of the surviving
devices (relays included: they hold and average models too), with the number of connected
components the survivors form and the consensus distance among them.

Usage: python benchmarks/disaster.py [--counts 10,20,30,40] [--rounds 40] [--at-s 40] [--jobs 2]
Prints the table (copied into docs/robustness.md); writes docs/figures/disaster.png and
benchmarks/results/disaster.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
BASE = REPO / "examples/disaster/base.yaml"
SELECT = {"data holders": "data_holders", "relays": "relay_only", "random": "random",
          "hubs": "highest_degree"}
COLORS = {"none": "k", "data holders": "tab:blue", "relays": "tab:orange", "random": "tab:green",
          "hubs": "tab:red"}


def run(job: tuple) -> dict:
    import csv

    import networkx as nx
    import torch

    from gossamer.config import validate
    from gossamer.sim.runner import Runner

    label, count, rounds, at_s, threads = job
    torch.set_num_threads(threads)
    raw = yaml.safe_load(BASE.read_text())
    raw["stop"] = {"rounds": rounds}
    raw["output"] = {"progress": False, "checkpoint_every": 0}
    if count:
        raw["faults"] = {"events": [{"at_s": at_s, "action": "remove", "count": count,
                                     "select": SELECT[label]}]}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        runner = Runner(validate(raw), Path(tmp) / "run")
        runner.prepare(resume=False)
        summary = runner.run()
        with (Path(tmp) / "run/metrics.csv").open() as f:
            curve = [(int(r["round"]), float(r["test_accuracy"])) for r in csv.DictReader(f)]
    removed = [n for e in summary.get("faults_applied", []) for n in e["nodes"]]
    topo = runner.exp.topology
    graph = nx.Graph()
    graph.add_nodes_from(range(topo.num_nodes))
    graph.add_edges_from(map(tuple, topo.edges.tolist()))
    graph.remove_nodes_from(removed)
    holders = set((runner.exp.trainer.sizes > 0).nonzero()[0].tolist())
    comps = list(nx.connected_components(graph))
    with_data = sum(1 for c in comps if c & holders)
    return {"scenario": label if count else "none", "count": count,
            "accuracy": summary["final_test_accuracy"], "components": len(comps),
            "components_with_data": with_data, "largest_component": max(len(c) for c in comps),
            "removed_with_data": len(holders & set(removed)), "curve": curve,
            "seconds": time.perf_counter() - start}


def figure(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    base = next(r for r in results if r["scenario"] == "none")
    for label in SELECT:
        rows = sorted((r for r in results if r["scenario"] == label), key=lambda r: r["count"])
        if rows:
            right.plot([0] + [r["count"] for r in rows], [base["accuracy"]] + [r["accuracy"] for r in rows],
                       marker="o", label=f"remove {label}", color=COLORS[label])
    right.set_xlabel("devices removed (of 100)")
    right.set_ylabel("final mean accuracy of survivors")
    right.legend()
    biggest = max(r["count"] for r in results)
    for r in [base] + [r for r in results if r["count"] == biggest]:
        xs, ys = zip(*r["curve"], strict=True)
        left.plot(xs, ys, label="no removal" if r["count"] == 0 else f"remove {biggest} {r['scenario']}",
                  color=COLORS[r["scenario"]])
    left.set_xlabel("round")
    left.set_ylabel("mean test accuracy")
    left.legend()
    fig.suptitle("D-PSGD on a Barabasi-Albert graph, 50 data holders + 50 relays (MNIST-5k)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--counts", default="10,20,30,40")
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--at-s", type=float, default=40.0)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--docs", default=str(REPO / "docs"))
    p.add_argument("--results", default=str(REPO / "benchmarks/results/disaster.json"))
    args = p.parse_args()
    threads = max(1, (mp.cpu_count() or 1) // args.jobs)
    counts = [int(c) for c in args.counts.split(",")]
    jobs = [("none", 0, args.rounds, args.at_s, threads)]
    jobs += [(label, c, args.rounds, args.at_s, threads) for label in SELECT for c in counts]
    start = time.perf_counter()
    results = []
    with mp.get_context("fork").Pool(args.jobs) as pool:
        for res in pool.imap(run, jobs):
            results.append(res)
            print(f"{res['scenario']:>13} {res['count']:>3}: acc {res['accuracy']:.4f}, "
                  f"{res['components']} components ({res['components_with_data']} with data), "
                  f"largest {res['largest_component']} ({res['seconds']:.0f}s)", flush=True)
    total = time.perf_counter() - start
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps({"results": results, "wall_s": total}, indent=1))
    docs = Path(args.docs)
    figure(results, docs / "figures/disaster.png")
    lines = ["| removed | count | final accuracy | components (with data) | largest component |",
             "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['scenario']} | {r['count']} | {r['accuracy']:.4f} | "
                     f"{r['components']} ({r['components_with_data']}) | {r['largest_component']} |")
    print("\n".join(lines))
    print(f"total {total:.0f}s")


if __name__ == "__main__":
    main()
