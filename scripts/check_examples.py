"""Run every example config at a small round count on this tree and on a reference commit, and
compare their ``metrics.csv`` byte for byte: a refactor that changes no maths changes no byte.

    python scripts/check_examples.py --ref HEAD~3 [--rounds 2] [--only dpsgd] [--jobs 2]

The reference commit is checked out in a temporary git worktree and run with its own sources
(``PYTHONPATH``); both sides run with one intra-op thread, so float reductions happen in the
same order. Prints one line per example (``same``, ``DIFFERENT`` with the first differing row
and column, ``new`` for a config the reference commit lacks, or ``failed`` with the last line of
the error) and exits 1 if any example differs
or fails on one side only.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(src: Path, config: Path, out: Path, rounds: int) -> tuple[bool, str]:
    env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "gossamer", "run", str(config), "--out", str(out), "--quiet",
           "--set", f"stop.rounds={rounds}", "--set", "output.progress=false"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    last = (result.stdout + result.stderr).strip().splitlines()[-1:] or [""]
    return result.returncode == 0, last[0]


def _first_difference(a: str, b: str) -> str:
    rows_a, rows_b = list(csv.reader(io.StringIO(a))), list(csv.reader(io.StringIO(b)))
    if rows_a[:1] != rows_b[:1]:
        return f"columns {rows_a[:1]} vs {rows_b[:1]}"
    header = rows_a[0]
    for i, (ra, rb) in enumerate(zip(rows_a[1:], rows_b[1:], strict=False), start=1):
        for col, x, y in zip(header, ra, rb, strict=False):
            if x != y:
                return f"row {i} {col}: {x} vs {y}"
    return f"{len(rows_a) - 1} rows vs {len(rows_b) - 1}"


def compare(config: Path, ref_src: Path, work: Path, rounds: int) -> tuple[str, str]:
    name = str(config.relative_to(ROOT / "examples")).removesuffix(".yaml").replace("/", "__")
    ok_new, msg_new = _run(ROOT / "src", config, work / "new" / name, rounds)
    if not (ref_src.parent / config.relative_to(ROOT)).exists():
        return ("new", "") if ok_new else ("FAILED", f"this tree: {msg_new}")
    ok_ref, msg_ref = _run(ref_src, ROOT / config.relative_to(ROOT), work / "ref" / name, rounds)
    if not ok_new or not ok_ref:
        if not ok_new and not ok_ref:
            return "failed on both", msg_new
        return "FAILED", f"this tree: {msg_new}" if not ok_new else f"reference: {msg_ref}"
    a = (work / "new" / name / "metrics.csv").read_text()
    b = (work / "ref" / name / "metrics.csv").read_text()
    return ("same", "") if a == b else ("DIFFERENT", _first_difference(a, b))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", required=True, help="reference commit (e.g. HEAD~1, a tag)")
    parser.add_argument("--rounds", type=int, default=2, help="stop.rounds of every run")
    parser.add_argument("--only", default="", help="run only configs whose path contains this")
    parser.add_argument("--jobs", type=int, default=1, help="examples at once")
    args = parser.parse_args(argv)
    configs = sorted(p for p in (ROOT / "examples").rglob("*.yaml") if args.only in str(p))
    if not configs:
        print(f"no example matches {args.only!r}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="gossamer-examples-") as tmp:
        tmp = Path(tmp)
        tree = tmp / "ref-tree"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(tree), args.ref], cwd=ROOT,
                       check=True)
        try:
            with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
                results = list(pool.map(lambda c: (c, *compare(c, tree / "src", tmp, args.rounds)),
                                        configs))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False)
    bad = 0
    for config, status, detail in results:
        print(f"{status:>14}  {config.relative_to(ROOT)}  {detail}")
        bad += status in ("DIFFERENT", "FAILED")
    same = sum(status == "same" for _, status, _ in results)
    new = sum(status == "new" for _, status, _ in results)
    print(f"{same} of {len(results) - new} examples byte-identical to {args.ref} at {args.rounds} "
          f"rounds ({new} new in this tree, run without a reference)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
