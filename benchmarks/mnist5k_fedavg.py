"""Benchmark the "MNIST-5k FedAvg" standard workload (DESIGN.md) five ways, in one run.

Usage: python benchmarks/mnist5k_fedavg.py --clients 100 [--rounds 20] [--json]
                                           [--skip-flower] [--repeats 1]

Ways, each in its own fresh Python process, one after another (Gossamer after one untimed
one-round run that fills the machine's dataset cache):
  gossamer    `python -m gossamer run benchmarks/configs/mnist5k_fedavg.yaml`, as a user runs it
  sequential  plain PyTorch loop over clients with one reusable model   (baselines/sequential.py)
  batched     hand-written stacked-weight bmm version                  (baselines/batched.py)
  flower      Flower's simulation engine on Ray, 2 CPUs                 (baselines/flower_fedavg.py)
  pfl         Apple's pfl-research, SimulatedBackend, when installed    (baselines/pfl_fedavg.py)
For each: whole-process wall time (measured here, around the child), FL-loop time (reported by
the child), peak memory, and test accuracy after every round; then a table and ratios. With
--json the last stdout line is one JSON object. A way that fails is reported with the tail of
its stderr and counted as null; the others still run.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from proctools import busy_cpu_s, descendants

REPO = Path(__file__).resolve().parent.parent
BASELINES = REPO / "benchmarks" / "baselines"
CONFIG = "benchmarks/configs/mnist5k_fedavg.yaml"
WAYS = ("gossamer", "sequential", "batched", "flower", "pfl")
BASELINE_SCRIPTS = {
    "sequential": "sequential.py",
    "batched": "batched.py",
    "flower": "flower_fedavg.py",
    "pfl": "pfl_fedavg.py",
}
FLOWER_MISSING = "skipped (flwr not installed; pip install 'gossamer[bench]')"
PFL_MISSING = "skipped (pfl not installed; pip install 'pfl[pytorch]' beside torch==2.13.0)"
SKIPPED_EXIT = 3  # the Flower baseline exits with this when flwr cannot be imported
PAGE_MIB = os.sysconf("SC_PAGE_SIZE") / 2**20
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
BUSY_CORES = 0.2  # other processes using more than this many cores on average spoil the timings


@dataclass
class Run:
    """One way, one repeat: what the child did and what it cost."""

    way: str
    whole_s: float | None = None
    loop_s: float | None = None
    peak_mib: float | None = None  # largest single process (wait4 ru_maxrss of the child tree)
    tree_peak_mib: float | None = None  # sampled peak of the summed RSS of the process tree
    other_cores: float | None = None  # mean cores used by other processes while this ran
    accuracy: list[float] = field(default_factory=list)
    error: str | None = None
    skipped: str | None = None


# ---------------------------------------------------------------- process measurement


class TreeSampler(threading.Thread):
    """Every `interval` s: summed RSS of a process tree (Ray starts many processes) and each
    member's CPU time, so CPU used by processes the child never waits for is still counted."""

    def __init__(self, root: int, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.peak_mib = 0.0
        self.cpu_s: dict[int, float] = {}
        self._stop_event = threading.Event()

    def sample(self) -> None:
        rss_pages = 0
        for pid in descendants(self.root):
            try:
                with open(f"/proc/{pid}/statm", "rb") as f:
                    rss_pages += int(f.read().split()[1])
                with open(f"/proc/{pid}/stat", "rb") as f:
                    stat = f.read()
            except (OSError, IndexError, ValueError):
                continue
            fields = stat[stat.rindex(b")") + 2 :].split()
            cpu = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime
            self.cpu_s[pid] = max(cpu, self.cpu_s.get(pid, 0.0))
        self.peak_mib = max(self.peak_mib, rss_pages * PAGE_MIB)

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sample()
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


@dataclass
class Child:
    returncode: int
    whole_s: float
    peak_mib: float
    tree_peak_mib: float
    other_cores: float  # mean number of cores busy with processes outside this run
    stdout: str
    stderr: str
    timed_out: bool


def run_child(cmd: list[str], env: dict[str, str], timeout_s: float) -> Child:
    """Run cmd in a fresh process; wall time around it, its own rusage via wait4 (not a delta)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        busy_before = busy_cpu_s()
        self_before = _own_cpu_s()
        start = time.perf_counter()
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=out, stderr=err, start_new_session=True
        )
        sampler = TreeSampler(proc.pid)
        sampler.start()
        timed_out = threading.Event()

        def kill() -> None:
            timed_out.set()
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the child's own session: only what it started
            except ProcessLookupError:
                pass

        timer = threading.Timer(timeout_s, kill)
        timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        whole_s = time.perf_counter() - start
        timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        sampler.stop()
        _reap_leftovers(proc.pid)
        child_cpu = max(usage.ru_utime + usage.ru_stime, sum(sampler.cpu_s.values()))
        other_cpu = busy_cpu_s() - busy_before - child_cpu - (_own_cpu_s() - self_before)
        out.seek(0)
        err.seek(0)
        return Child(
            returncode=proc.returncode,
            whole_s=whole_s,
            peak_mib=usage.ru_maxrss / 1024.0,  # KiB on Linux
            tree_peak_mib=sampler.peak_mib,
            other_cores=max(0.0, other_cpu) / whole_s,
            stdout=out.read(),
            stderr=err.read(),
            timed_out=timed_out.is_set(),
        )


def _own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _reap_leftovers(pgid: int) -> None:
    """Kill processes the child left running in its session (e.g. Ray daemons) before the next way."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def last_json_line(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


# ---------------------------------------------------------------- the four ways


def run_gossamer(clients: int, rounds: int, timeout_s: float) -> Run:
    result = Run("gossamer")
    tmp = Path(tempfile.mkdtemp(prefix="gossamer-bench-"))
    out_dir = tmp / "run"
    try:
        cmd = [
            sys.executable, "-m", "gossamer", "run", CONFIG, "--out", str(out_dir),
            "--set", f"partition.num_nodes={clients}", "--set", f"stop.rounds={rounds}",
        ]  # fmt: skip
        env = dict(os.environ)
        # Benchmark this checkout, as an editable install would.
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO / "src"), env.get("PYTHONPATH")) if p
        )
        child = run_child(cmd, env, timeout_s)
        _fill_common(result, child)
        if child.returncode != 0:
            result.error = _failure(child)
            return result
        try:
            summary = json.loads((out_dir / "summary.json").read_text())
            result.loop_s = float(summary["loop_time_s"])
            with open(out_dir / "metrics.csv", newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("round") not in (None, "")]
            result.accuracy = [
                float(r["test_accuracy"])
                for r in rows
                if int(float(r["round"])) >= 1 and r.get("test_accuracy") not in (None, "")
            ]
        except (OSError, KeyError, ValueError, json.JSONDecodeError) as exc:
            result.error = f"exit 0 but could not read {out_dir}: {type(exc).__name__}: {exc}"
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_baseline(way: str, script: str, clients: int, rounds: int, timeout_s: float) -> Run:
    result = Run(way)
    cmd = [
        sys.executable,
        str(BASELINES / script),
        "--clients",
        str(clients),
        "--rounds",
        str(rounds),
    ]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(BASELINES), env.get("PYTHONPATH")) if p)
    child = run_child(cmd, env, timeout_s)
    _fill_common(result, child)
    if way == "flower" and child.returncode == SKIPPED_EXIT:
        result.skipped = FLOWER_MISSING
        return result
    report = last_json_line(child.stdout)
    if child.returncode != 0 or report is None:
        result.error = _failure(child)
        return result
    result.loop_s = float(report["loop_s"])
    result.accuracy = [float(a) for a in report["accuracy"]]
    return result


def _fill_common(result: Run, child: Child) -> None:
    result.whole_s, result.peak_mib = child.whole_s, child.peak_mib
    result.tree_peak_mib, result.other_cores = child.tree_peak_mib, child.other_cores


def _failure(child: Child) -> str:
    why = "timed out" if child.timed_out else f"exit {child.returncode}"
    return f"{why}; stderr tail:\n{tail(child.stderr) or '(empty)'}"


def run_way(way: str, clients: int, rounds: int, timeout_s: float) -> Run:
    if way == "gossamer":
        return check_rounds(run_gossamer(clients, rounds, timeout_s), rounds)
    if way == "flower" and importlib.util.find_spec("flwr") is None:
        return Run("flower", skipped=FLOWER_MISSING)
    if way == "pfl" and importlib.util.find_spec("pfl") is None:
        return Run("pfl", skipped=PFL_MISSING)
    return check_rounds(
        run_baseline(way, BASELINE_SCRIPTS[way], clients, rounds, timeout_s), rounds
    )


def check_rounds(result: Run, rounds: int) -> Run:
    """A run that did not report one accuracy per round is a failure, not a fast run."""
    if result.error is None and result.skipped is None and len(result.accuracy) != rounds:
        result.error = f"expected {rounds} per-round accuracies, got {len(result.accuracy)}"
    return result


# ---------------------------------------------------------------- summary


@dataclass
class WaySummary:
    way: str
    runs: list[Run]

    @property
    def ok(self) -> list[Run]:
        return [r for r in self.runs if r.error is None and r.skipped is None]

    def median(self, attr: str) -> float | None:
        values = [getattr(r, attr) for r in self.ok if getattr(r, attr) is not None]
        return statistics.median(values) if values else None

    @property
    def curve(self) -> list[float] | None:
        return self.ok[-1].accuracy if self.ok else None

    @property
    def final_acc(self) -> float | None:
        return self.curve[-1] if self.curve else None

    @property
    def status(self) -> str:
        if self.runs and self.runs[-1].skipped:
            return self.runs[-1].skipped
        failed = len(self.runs) - len(self.ok)
        if failed:
            return f"FAILED {failed}/{len(self.runs)}"
        if len({tuple(r.accuracy) for r in self.ok}) > 1:
            return "ok (accuracy differs between repeats!)"
        busy = self.worst_other_cores
        if busy is not None and busy > BUSY_CORES:
            return f"ok (machine busy: other processes used {busy:.1f} cores)"
        return "ok"

    @property
    def worst_other_cores(self) -> float | None:
        values = [r.other_cores for r in self.ok if r.other_cores is not None]
        return max(values) if values else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def max_diff_pp(a: list[float] | None, b: list[float] | None) -> float | None:
    if not a or not b:
        return None
    if len(a) != len(b):
        return float("nan")
    return max(abs(x - y) for x, y in zip(a, b, strict=True)) * 100.0


def fmt(value: float | None, spec: str) -> str:
    """format(value, spec), or a dash as wide as spec asks when there is no value."""
    width = int(spec.split(".")[0]) if spec[:1].isdigit() else 0
    return "-".rjust(width) if value is None else format(value, spec)


def print_report(summaries: dict[str, WaySummary], args: argparse.Namespace) -> dict:
    import torch  # only for the version line; the children import it themselves

    print(
        f"\nMNIST-5k FedAvg  K={args.clients}  rounds={args.rounds}  repeats={args.repeats}  "
        f"(python {platform.python_version()}, torch {torch.__version__}, {os.cpu_count()} CPUs)"
    )
    header = f"{'way':<11} {'whole s':>8} {'loop s':>8} {'peak MiB':>9} {'tree MiB':>9} {'final acc':>9}  status"
    print(header)
    print("-" * len(header))
    for s in summaries.values():
        print(
            f"{s.way:<11} {fmt(s.median('whole_s'), '8.2f')} {fmt(s.median('loop_s'), '8.2f')} "
            f"{fmt(s.median('peak_mib'), '9.0f')} {fmt(s.median('tree_peak_mib'), '9.0f')} "
            f"{fmt(s.final_acc, '9.4f')}  {s.status}"
        )
    print(
        "(times: median over repeats; peak MiB: largest single process; tree MiB: sampled sum over the process tree)"
    )
    if any((s.worst_other_cores or 0.0) > BUSY_CORES for s in summaries.values()):
        print(
            "WARNING: other processes were using the CPUs during some runs; those timings are "
            "unreliable (PyTorch threads slow down badly when cores are oversubscribed)."
        )

    g, q, b, f, p = (summaries.get(w) for w in WAYS)

    def get(s: WaySummary | None, attr: str) -> float | None:
        return s.median(attr) if s is not None else None

    ratios = {
        "flower_over_gossamer": ratio(get(f, "whole_s"), get(g, "whole_s")),
        "sequential_over_gossamer": ratio(get(q, "whole_s"), get(g, "whole_s")),
        "gossamer_loop_over_batched_loop": ratio(get(g, "loop_s"), get(b, "loop_s")),
        "pfl_loop_over_gossamer_loop": ratio(get(p, "loop_s"), get(g, "loop_s")),
        "max_acc_diff_pp_gossamer_vs_sequential": max_diff_pp(
            g.curve if g else None, q.curve if q else None
        ),
        "max_acc_diff_pp_batched_vs_sequential": max_diff_pp(
            b.curve if b else None, q.curve if q else None
        ),
        "max_acc_diff_pp_pfl_vs_sequential": max_diff_pp(
            p.curve if p else None, q.curve if q else None
        ),
    }
    lines = (
        ("flower / gossamer, whole process", "flower_over_gossamer", "x"),
        ("sequential / gossamer, whole process", "sequential_over_gossamer", "x"),
        ("gossamer loop / batched loop", "gossamer_loop_over_batched_loop", "x"),
        ("pfl loop / gossamer loop", "pfl_loop_over_gossamer_loop", "x"),
        (
            "max per-round accuracy |gossamer - sequential|",
            "max_acc_diff_pp_gossamer_vs_sequential",
            " pp",
        ),
        (
            "max per-round accuracy |batched - sequential|",
            "max_acc_diff_pp_batched_vs_sequential",
            " pp",
        ),
        ("max per-round accuracy |pfl - sequential|", "max_acc_diff_pp_pfl_vs_sequential", " pp"),
    )
    print("\nratios (same run)")
    for label, key, unit in lines:
        value = ratios[key]
        print(f"  {label:<48} {'n/a' if value is None else f'{value:.2f}{unit}'}")
    # each repeat's gossamer loop against the batched loop run right after it (interleaved)
    pairs = [ratio(gr.loop_s, br.loop_s) for gr, br in zip(g.runs, b.runs, strict=False)
             if not gr.error and not br.error] if g and b else []
    ratios["gossamer_loop_over_batched_loop_runs"] = pairs
    peaks = [r.peak_mib for r in g.ok if r.peak_mib] if g else []
    spread = (max(peaks) - min(peaks)) / statistics.median(peaks) if peaks else None
    ratios["gossamer_peak_mib_runs"], ratios["gossamer_peak_spread"] = peaks, spread
    if pairs:
        print(f"  {'gossamer loop / batched loop, each repeat':<48} "
              + ", ".join(f"{p:.2f}x" for p in pairs if p is not None))
    if spread is not None:
        print(f"  {'gossamer peak MiB, each repeat (spread)':<48} "
              + ", ".join(f"{p:.0f}" for p in peaks) + f"  ({100 * spread:.1f}% of the median)")
    return ratios


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--clients",
        type=int,
        required=True,
        help="K; must divide 4000 (100: 4 steps/round, 400: 1)",
    )
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--json", action="store_true", help="last stdout line: one JSON object")
    parser.add_argument("--skip-flower", action="store_true", help="Flower takes minutes")
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs per way (interleaved); times are medians"
    )
    parser.add_argument(
        "--ways", default=",".join(WAYS), help=f"comma-separated subset of {','.join(WAYS)}"
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per child process")
    args = parser.parse_args()
    if args.clients < 1 or 4000 % args.clients:
        parser.error(f"--clients must divide 4000, got {args.clients}")
    if args.repeats < 1 or args.rounds < 1:
        parser.error("--repeats and --rounds must be >= 1")
    ways = [w.strip() for w in args.ways.split(",") if w.strip()]
    if bad := [w for w in ways if w not in WAYS]:
        parser.error(f"unknown way(s) {bad}; choose from {list(WAYS)}")
    if args.skip_flower and "flower" in ways:
        ways.remove("flower")

    summaries = {w: WaySummary(w, []) for w in ways}
    if "gossamer" in ways:
        # one untimed 1-round run first: the first run on a machine converts the dataset into
        # its cache (~2.5 s, ~180 MiB more peak memory), which no timed repeat should pay
        warm = run_gossamer(args.clients, 1, args.timeout)
        if warm.error:
            print(f"gossamer warm-up: FAILED ({warm.error})", flush=True)
    for rep in range(args.repeats):
        for way in ways:
            if summaries[way].runs and summaries[way].runs[-1].skipped:
                continue
            print(
                f"[{rep + 1}/{args.repeats}] {way} K={args.clients} ...",
                file=sys.stderr,
                flush=True,
            )
            result = run_way(way, args.clients, args.rounds, args.timeout)
            summaries[way].runs.append(result)
            if result.skipped:
                print(f"{way}: {result.skipped}", flush=True)
            elif result.error:
                print(f"{way}: FAILED ({result.error})", flush=True)
            else:
                print(
                    f"{way}: whole {result.whole_s:.2f} s, loop {fmt(result.loop_s, '.2f')} s, "
                    f"final acc {fmt(result.accuracy[-1] if result.accuracy else None, '.4f')}",
                    file=sys.stderr, flush=True,
                )  # fmt: skip

    ratios = print_report(summaries, args)
    if args.skip_flower:
        print("flower: skipped (--skip-flower)")

    if args.json:
        out: dict[str, object] = {}
        for way in WAYS:
            s = summaries.get(way)
            out[f"{way}_s"] = s.median("whole_s") if s else None
            out[f"{way}_loop_s"] = s.median("loop_s") if s else None
            out[f"{way}_acc"] = s.final_acc if s else None
        for way in WAYS:
            s = summaries.get(way)
            out[f"{way}_curve"] = s.curve if s else None
            out[f"{way}_peak_mib"] = s.median("peak_mib") if s else None
            out[f"{way}_tree_peak_mib"] = s.median("tree_peak_mib") if s else None
            out[f"{way}_runs_s"] = [r.whole_s for r in s.ok] if s else []
            out[f"{way}_loop_runs_s"] = [r.loop_s for r in s.ok] if s else []
            out[f"{way}_status"] = s.status if s else "not run"
            out[f"{way}_other_cores"] = [r.other_cores for r in s.ok] if s else []
        out.update(ratios)
        out.update(
            clients=args.clients, rounds=args.rounds, repeats=args.repeats, cpus=os.cpu_count()
        )
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
