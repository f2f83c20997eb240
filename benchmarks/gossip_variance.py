"""Reproduction (b): gossip learning with independently initialized nodes, plain averaging against
variance-corrected averaging (Tian et al., "Vanishing Variance Problem in Fully Decentralized
Neural-Network Systems", 2024, arXiv:2404.04616).

Runs ``examples/decentralized/gossip_plain.yaml`` and ``gossip_vc.yaml`` (independent init) and,
as references, the same two runs with every node starting from one shared init
(``--set model.init=same``). Each run goes through the same ``Runner`` as ``gossamer run`` (so
its metrics equal ``gossamer run CONFIG``); after every evaluation the script also records the
standard deviation of each parameter tensor (over its elements, averaged over nodes): the
variance that plain averaging of unrelated models shrinks.

Usage: python benchmarks/gossip_variance.py [--rounds 100] [--jobs 2]
Prints the table (copied into docs/gossip.md); writes benchmarks/results/gossip_variance.json
and docs/figures/gossip_variance.png.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RUNS = [  # label, config, init
    ("plain, independent init", "examples/decentralized/gossip_plain.yaml", "independent"),
    ("variance-corrected, independent init", "examples/decentralized/gossip_vc.yaml", "independent"),
    ("plain, shared init (reference)", "examples/decentralized/gossip_plain.yaml", "same"),
    ("variance-corrected, shared init", "examples/decentralized/gossip_vc.yaml", "same"),
]
STYLE = {RUNS[0][0]: ("tab:red", "-"), RUNS[1][0]: ("tab:blue", "-"),
         RUNS[2][0]: ("k", "--"), RUNS[3][0]: ("tab:cyan", ":")}


def run(job: tuple) -> dict:
    import os

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    from gossamer import config
    from gossamer.sim.runner import Runner

    label, path, init, rounds = job
    torch.set_num_threads(1)
    cfg = config.load(REPO / path, [f"model.init={init}", f"stop.rounds={rounds}",
                                    "output.checkpoint_every=0", "output.progress=false"])
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        runner: Runner | None = None

        def on_row(row: dict) -> None:
            spec, params = runner.exp.spec, runner.driver.params
            stds = {name: float(view.reshape(view.shape[0], -1).std(dim=1).mean())
                    for name, view in spec.views(params).items()}
            rows.append({**row, "param_std": stds})

        start = time.perf_counter()
        runner = Runner(cfg, Path(tmp) / "run", on_row=on_row)
        runner.prepare(resume=False)
        summary = runner.run()
    return {"label": label, "config": path, "init": init, "rows": rows,
            "final_test_accuracy": summary["final_test_accuracy"],
            "wall_s": time.perf_counter() - start}


def first_time(rows: list[dict], goal: float) -> float | None:
    for row in rows:
        if row["test_accuracy"] is not None and row["test_accuracy"] >= goal:
            return row["sim_time_s"]
    return None


def plot(results: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc, std) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        color, line = STYLE[r["label"]]
        t = [row["sim_time_s"] for row in r["rows"]]
        acc.plot(t, [row["test_accuracy"] for row in r["rows"]], color=color, ls=line, label=r["label"])
        first = next(iter(r["rows"][0]["param_std"]))                  # the first layer's weights
        std.plot(t, [row["param_std"][first] for row in r["rows"]], color=color, ls=line)
    acc.set(xlabel="simulated time (s)", ylabel="mean node test accuracy", ylim=(0, 1))
    std.set(xlabel="simulated time (s)", ylabel=f"std of {first} (mean over nodes)", yscale="log")
    acc.legend(fontsize=8, loc="lower right")
    fig.suptitle("Gossip learning, 100 nodes, MNIST-5k, MLP 784-64-64-10: plain vs variance-corrected averaging",
                 fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    jobs = [(label, path, init, args.rounds) for label, path, init in RUNS]
    with mp.get_context("spawn").Pool(args.jobs) as pool:
        results = pool.map(run, jobs)
    print("| run | time to 50% (s) | time to 80% (s) | final mean node accuracy | final accuracy of the "
          "average model | first-layer weight std, start -> end |")
    print("|---|---|---|---|---|---|")
    for r in results:
        first, last = r["rows"][0], r["rows"][-1]
        layer = next(iter(first["param_std"]))
        t50, t80 = first_time(r["rows"], 0.5), first_time(r["rows"], 0.8)
        print(f"| {r['label']} | {t50 if t50 is not None else 'not reached'} | "
              f"{t80 if t80 is not None else 'not reached'} | {last['test_accuracy']:.3f} | "
              f"{last['avg_model_accuracy']:.3f} | {first['param_std'][layer]:.4f} -> "
              f"{last['param_std'][layer]:.4f} |")
    (REPO / "benchmarks/results").mkdir(exist_ok=True)
    (REPO / "benchmarks/results/gossip_variance.json").write_text(
        json.dumps({"rounds": args.rounds, "runs": results}, indent=1))
    plot(results, REPO / "docs/figures/gossip_variance.png")
    print("wrote benchmarks/results/gossip_variance.json and docs/figures/gossip_variance.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
