"""The sharded simulator against one process, measured in the same run (docs/scale.md).

Usage: python benchmarks/scale_out.py [--workload fedavg|dpsgd|gossip] [--nodes 400] [--rounds 20]
                                     [--epochs 1] [--ranks 1,2] [--repeats 3] [--set KEY=VALUE]
                                     [--json]

Runs a standard workload as ``gossamer run --ranks R`` for each R (one intra-op thread per
rank), and once as a plain one-process run with one thread, interleaved over ``--repeats``:
``fedavg``, MNIST-5k FedAvg with every client every round (benchmarks/configs/
mnist5k_fedavg.yaml); ``dpsgd``, MNIST-5k D-PSGD on a random 4-regular graph, every node
evaluated every round (benchmarks/configs/mnist5k_dpsgd.yaml); ``gossip``, gossip learning on
the same nodes, graph and data (push, age-weighted merge, one Poisson clock of mean gap 1 s,
a local epoch on every received model, every node evaluated every period;
benchmarks/configs/mnist5k_gossip.yaml). ``--set`` changes the config
(e.g. ``eval.nodes=100``). Reports each way's loop time (``loop_time_s`` of summary.json: the
rounds, evaluation included, not process start-up or data loading), the median speed-up of R
ranks over 1 rank, and whether ``metrics.csv`` is byte-identical across rank counts. ``2
halves`` runs two independent one-process runs of half the nodes each at the same time (FedAvg:
half the clients a round; D-PSGD and gossip: N / 2 nodes, which then hold twice the data each): the most
any two processes can gain on this machine (memory and cache are shared), the ceiling for 2
ranks; ``2 halves as 1 rank`` runs each half as ``--ranks 1`` (the sharded executor's path, which
the grouped FedAvg means make faster than one process), the ceiling of 2 ranks against 1 rank.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIGS = {"fedavg": "benchmarks/configs/mnist5k_fedavg.yaml",
           "dpsgd": "benchmarks/configs/mnist5k_dpsgd.yaml",
           "gossip": "benchmarks/configs/mnist5k_gossip.yaml"}


def _sets(pairs: list[str]) -> list[str]:
    return [arg for pair in pairs for arg in ("--set", pair)]


def run(way: str, ranks: int | None, config: str, sets: list[str], out: Path) -> tuple[float, str]:
    args = [sys.executable, "-m", "gossamer", "run", config, "--out", str(out), "--quiet", *_sets(sets)]
    if ranks is not None:
        args += ["--ranks", str(ranks), "--threads", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{way} failed: {done.stderr.strip().splitlines()[-1:]}")
    summary = json.loads((out / "summary.json").read_text())
    return float(summary["loop_time_s"]), (out / "metrics.csv").read_text()


def halves(config: str, sets: list[str], out: Path, rank: bool = False) -> float:
    """The ceiling of two processes on this machine: two independent one-process runs of half
    the work each (``sets`` makes it half), at the same time (``rank``: each as ``--ranks 1``,
    the sharded executor's path); the slower loop."""
    args = [sys.executable, "-m", "gossamer", "run", config, "--quiet", *_sets(sets),
            *(["--ranks", "1", "--threads", "1"] if rank else [])]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    procs = [subprocess.Popen([*args, "--out", str(out / f"half{k}")], cwd=REPO, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for k in range(2)]
    for p in procs:
        if p.wait() != 0:
            raise SystemExit(f"halves failed: {p.stderr.read().decode().strip().splitlines()[-1:]}")
    return max(float(json.loads((out / f"half{k}" / "summary.json").read_text())["loop_time_s"])
               for k in range(2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=sorted(CONFIGS), default="fedavg")
    parser.add_argument("--nodes", "--clients", type=int, default=400, dest="nodes")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=1, help="local epochs (the standard workload: 1)")
    parser.add_argument("--ranks", default="1,2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    config = CONFIGS[args.workload]
    sets = [f"partition.num_nodes={args.nodes}", f"stop.rounds={args.rounds}",
            f"local.epochs={args.epochs}", *args.set]
    half = (sets + ["algorithm.params.client_fraction=0.5"] if args.workload == "fedavg"
            else sets + [f"partition.num_nodes={args.nodes // 2}"])
    counts = [int(x) for x in args.ranks.split(",")]
    ways = [("one process", None)] + [(f"{r} rank{'s' if r > 1 else ''}", r) for r in counts]
    times: dict[str, list[float]] = {w: [] for w, _ in ways}
    metrics: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for way, ranks in ways:
                loop, text = run(way, ranks, config, sets, Path(tmp) / f"{rep}-{way}")
                times[way].append(loop)
                metrics.setdefault(way, text)
            times.setdefault("2 halves", []).append(
                halves(config, half, Path(tmp) / f"{rep}-halves"))
            if 1 in counts:          # the same, each half on the sharded executor's path
                times.setdefault("2 halves, 1 rank each", []).append(
                    halves(config, half, Path(tmp) / f"{rep}-rank-halves", rank=True))
    sharded = [w for w, r in ways if r is not None]
    identical = len({metrics[w] for w in sharded}) == 1
    base = statistics.median(times[sharded[0]])
    result = {"workload": args.workload, "nodes": args.nodes, "rounds": args.rounds, "epochs": args.epochs,
              "set": args.set, "repeats": args.repeats,
              "loop_s": {w: [round(t, 3) for t in ts] for w, ts in times.items()},
              "median_loop_s": {w: round(statistics.median(ts), 3) for w, ts in times.items()},
              "speedup_vs_1_rank": {w: round(base / statistics.median(times[w]), 3) for w in sharded},
              # two independent half-cohort processes at once: what 2 processes can reach here
              "ceiling_2_processes": round(statistics.median(times["one process"]) /
                                           statistics.median(times["2 halves"]), 3),
              # the same with each half as --ranks 1: the ceiling of 2 ranks against 1 rank
              "ceiling_2_ranks": (round(statistics.median(times["1 rank"]) /
                                        statistics.median(times["2 halves, 1 rank each"]), 3)
                                  if 1 in counts else None),
              "metrics_identical_across_ranks": identical}
    what = {"fedavg": f"FedAvg MNIST-5k, {args.nodes} clients every round",
            "dpsgd": f"D-PSGD MNIST-5k, {args.nodes} nodes, random 4-regular graph",
            "gossip": f"gossip learning MNIST-5k, {args.nodes} nodes, random 4-regular graph"}[args.workload]
    print(f"{what}, {args.epochs} local epoch(s), {args.rounds} rounds{', ' if args.set else ''}"
          f"{' '.join(args.set)}, {args.repeats} interleaved repeats, one thread per process")
    for way, _ in ways:
        ts = times[way]
        extra = f"  {result['speedup_vs_1_rank'][way]:.2f}x 1 rank" if way in sharded else ""
        print(f"  {way:12s} loop {statistics.median(ts):7.2f} s (runs {', '.join(f'{t:.2f}' for t in ts)}){extra}")
    ts = times["2 halves"]
    print(f"  {'2 halves':12s} loop {statistics.median(ts):7.2f} s (runs {', '.join(f'{t:.2f}' for t in ts)})  "
          f"ceiling {result['ceiling_2_processes']:.2f}x one process (two independent runs of half "
          "the work at once)")
    if 1 in counts:
        ts = times["2 halves, 1 rank each"]
        print(f"  {'2 halves as 1 rank':12s} loop {statistics.median(ts):7.2f} s (runs "
              f"{', '.join(f'{t:.2f}' for t in ts)})  ceiling {result['ceiling_2_ranks']:.2f}x 1 rank "
              "(the same, each half as --ranks 1)")
    print(f"  metrics.csv byte-identical across {', '.join(sharded)}: {identical}")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
