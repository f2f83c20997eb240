"""G-Rank against ranking without gossip, under churn (issue 19; docs/grank.md).

Usage: python benchmarks/grank.py [--seeds 0,1,2] [--rounds 100] [--ways grank,no_gossip,offset1]
                                  [--json]

Workload: examples/grank/grank.yaml as a user runs it (`gossamer run`, one process, each way and
seed one after the other): 40 nodes in 4 user groups, 120 items with 3 of 30 tags, one query per
online node per 60-second round, Markov churn (mean 30 min on, 10 min off), a complete graph.
Ways:
  grank      the example: gossip a 50% sample of the log to a similar neighbour every round
  no_gossip  examples/grank/no_gossip.yaml: each node ranks from its own clicks only
  offset1    grank with offset 1: every held click counts with weight similarity + 1, so
             dissimilar groups' clicks weigh at least half as much as the most similar's
Printed per way: mean NDCG@10 over nodes (and over seeds) every 10 rounds; per node, NDCG at
the end against the start and against round 20 (the fraction of node-seed pairs whose NDCG
rose); mean and minimum at the end; bytes sent. Then G-Rank minus no gossip per seed and the
fraction of nodes where G-Rank ends higher.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"grank": ("grank.yaml", []), "no_gossip": ("no_gossip.yaml", []),
           "offset1": ("grank.yaml", ["algorithm.params.offset=1.0"])}


def run(way: str, seed: int, rounds: int, out: Path) -> dict:
    """One `gossamer run` of ``way``: per-node NDCG ``[evaluations, N]`` and the summary."""
    name, sets = CONFIGS[way]
    argv = [sys.executable, "-m", "gossamer", "run", str(ROOT / "examples" / "grank" / name),
            "--out", str(out), "--quiet", "--set", f"seed={seed}", "--set", f"stop.rounds={rounds}"]
    for item in sets:
        argv += ["--set", item]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL)
    rows = list(csv.DictReader((out / "nodes.csv").open()))
    evals = sorted({int(r["round"]) for r in rows})
    n = 1 + max(int(r["node"]) for r in rows)
    ndcg = np.zeros((len(evals), n))
    for r in rows:
        ndcg[evals.index(int(r["round"])), int(r["node"])] = float(r["ndcg"])
    summary = json.loads((out / "summary.json").read_text())
    return {"rounds": evals, "ndcg": ndcg, "bytes": summary["bytes_sent_total"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--ways", default="grank,no_gossip,offset1")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    ways = args.ways.split(",")
    results: dict[str, list[dict]] = {w: [] for w in ways}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for way in ways:
                results[way].append(run(way, seed, args.rounds, Path(tmp) / f"{way}-{seed}"))
    evals = results[ways[0]][0]["rounds"]
    print(f"mean NDCG@10 over nodes and seeds {seeds}, by round")
    print("way        " + " ".join(f"{r:>6d}" for r in evals))
    for way in ways:
        curve = np.mean([res["ndcg"].mean(1) for res in results[way]], axis=0)
        print(f"{way:<10} " + " ".join(f"{v:6.3f}" for v in curve))
    print()
    early = evals.index(20) if 20 in evals[:-1] else min(1, len(evals) - 1)
    out = {}
    print(f"{'way':<10} {'start':>6} {'end':>6} {'end min':>8} {'rose vs start':>14} "
          f"{'rose vs r' + str(evals[early]):>10} {'MB sent':>8}")
    for way in ways:
        nd = np.stack([res["ndcg"] for res in results[way]])          # [seeds, evals, N]
        row = {"start": float(nd[:, 0].mean()), "end": float(nd[:, -1].mean()),
               "end_min": float(nd[:, -1].min(1).mean()),
               "rose_vs_start": float((nd[:, -1] > nd[:, 0]).mean()),
               "rose_vs_early": float((nd[:, -1] > nd[:, early]).mean()),
               "mb_sent": float(np.mean([res["bytes"] for res in results[way]]) / 1e6)}
        out[way] = row
        print(f"{way:<10} {row['start']:6.3f} {row['end']:6.3f} {row['end_min']:8.3f} "
              f"{row['rose_vs_start']:14.3f} {row['rose_vs_early']:10.3f} {row['mb_sent']:8.2f}")
    if "grank" in results and "no_gossip" in results:
        print()
        for i, seed in enumerate(seeds):
            g, b = results["grank"][i]["ndcg"][-1], results["no_gossip"][i]["ndcg"][-1]
            print(f"seed {seed}: G-Rank - no gossip at the end: mean {g.mean() - b.mean():+.3f}, "
                  f"min {g.min() - b.min():+.3f}, nodes where G-Rank is higher {(g > b).mean():.3f}")
    if args.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
