"""Asynchronous gossip at scale: simulated events per second, per-event overhead and memory.

Usage: python benchmarks/gossip_scale.py [--config benchmarks/configs/gossip_10k.yaml]
           [--rounds 5] [--repeats 2] [--baseline SRC_DIR] [--set KEY=VALUE ...] [--json]

Each measurement runs in its own fresh process (this script with ``--child``): it builds the
experiment, runs ``--rounds`` rounds of the gossip driver (no evaluation, no checkpoints) and
reports the events handled, the wall time of the rounds, the driver's own split (local
training ``train_s``; event scheduling ``communicate_s``; the rest is model reads, merges
and writes plus wave bookkeeping) and the child's peak RSS (``ru_maxrss`` from ``os.wait4``).

``--baseline SRC_DIR`` also runs another source tree (e.g. ``git worktree add /tmp/base
HEAD~1`` then ``--baseline /tmp/base/src``), interleaved with this checkout ``--repeats``
times, so before/after ratios come from the same machine at the same moment.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG = "benchmarks/configs/gossip_10k.yaml"


def child(config: str, rounds: int, overrides: list[str]) -> None:
    """Runs inside the measured process: build, run rounds, print one JSON line."""
    from gossamer import config as cfg_mod
    from gossamer.sim.allocator import tune_allocator
    from gossamer.sim.drivers.gossip import GossipDriver
    from gossamer.sim.experiment import build_experiment

    tune_allocator()
    start = time.perf_counter()
    driver = GossipDriver(build_experiment(cfg_mod.load(config, overrides)))
    build = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(rounds):
        driver.run_round()
    loop = time.perf_counter() - start
    print(json.dumps({"build_s": build, "loop_s": loop, "events": driver.events,
                      "train_s": driver.timers["train_s"], "schedule_s": driver.timers["communicate_s"],
                      "node_steps": driver.node_steps, "sim_time_s": driver.sim_time}))


def _spawn_and_wait(cmd: list[str], env: dict) -> tuple[int, bytes, bytes, object]:
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = proc.stdout.read()
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    return os.waitstatus_to_exitcode(status), out, err, usage


def measure(src: Path, config: str, rounds: int, overrides: list[str]) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--config", config,
           "--rounds", str(rounds)] + [a for kv in overrides for a in ("--set", kv)]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(src) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    start = time.perf_counter()
    code, out, err, usage = _spawn_and_wait(cmd, env)
    whole = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"{src}: child failed:\n{err.decode()[-2000:]}")
    r = json.loads(out.decode().strip().splitlines()[-1])
    ev = max(r["events"], 1)
    r.update(src=str(src), whole_s=whole, peak_mib=usage.ru_maxrss / 1024,
             events_per_s=r["events"] / r["loop_s"], us_per_event=1e6 * r["loop_s"] / ev,
             us_per_event_schedule=1e6 * r["schedule_s"] / ev,
             us_per_event_not_training=1e6 * (r["loop_s"] - r["train_s"]) / ev)
    return r


def _line(label: str, r: dict) -> str:
    return (f"{label:9s} {r['events']:8d} events in {r['loop_s']:6.2f} s: {r['events_per_s']:8.0f} events/s, "
            f"{r['us_per_event']:5.1f} us/event (scheduling {r['us_per_event_schedule']:4.1f}, "
            f"not training {r['us_per_event_not_training']:5.1f}); train {r['train_s']:5.2f} s; "
            f"peak {r['peak_mib']:6.0f} MiB; whole {r['whole_s']:5.1f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=CONFIG)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--baseline", type=Path, default=None,
                        help="another source tree (its src/ directory) to measure alongside")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.config, args.rounds, args.overrides)
        return 0
    trees = [("current", REPO / "src")] + ([("baseline", args.baseline)] if args.baseline else [])
    runs: dict[str, list[dict]] = {label: [] for label, _ in trees}
    for _ in range(args.repeats):
        for label, src in trees:
            r = measure(src, args.config, args.rounds, args.overrides)
            runs[label].append(r)
            print(_line(label, r), flush=True)
    medians = {label: {key: statistics.median(r[key] for r in rs)
                       for key in ("events_per_s", "us_per_event", "us_per_event_schedule",
                                   "us_per_event_not_training", "loop_s", "train_s", "peak_mib")}
               for label, rs in runs.items()}
    for label, m in medians.items():
        print(f"median {label}: {m['events_per_s']:.0f} events/s, {m['us_per_event']:.1f} us/event, "
              f"peak {m['peak_mib']:.0f} MiB")
    if args.baseline:
        ratio = medians["current"]["events_per_s"] / medians["baseline"]["events_per_s"]
        print(f"events/s, current / baseline: {ratio:.2f}x")
    if args.json:
        print(json.dumps({"config": args.config, "rounds": args.rounds, "runs": runs, "medians": medians}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
