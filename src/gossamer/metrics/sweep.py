"""``gossamer sweep``: a grid of hyper-parameters times several seeds, one table of mean ± 95% CI.

Each ``--grid key=v1,v2`` flag gives values for one config field (parsed like ``--set``
values: YAML scalars or lists); several flags make the cartesian product. Every grid cell runs
at the seeds ``cfg.seed + i`` for ``i < --seeds``, each run in ``OUT/<cell>/seed=<s>``, where
``<cell>`` is ``key=value`` pairs joined by ``,`` as they were typed (characters outside
``[A-Za-z0-9._=,+-]`` become ``_``). A run with ``summary.json`` is reused, one with only
``config.yaml`` is resumed from its checkpoint, and the rest start afresh, so an interrupted
sweep run again does only what is missing. The runs are ``python -m gossamer run`` processes,
up to ``--jobs`` at once (the same machinery as ``gossamer compare``).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gossamer.config import first_difference
from gossamer.errors import UserError

KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")
UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]")
MAX_NAME = 120
RESUME_OVERRIDABLE = ("stop.", "output.progress")       # what `gossamer run --resume` accepts


def split_values(text: str) -> list[str]:
    """``text`` split at the commas outside brackets and quotes: ``[16],[32,16]`` is two values."""
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return parts


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    """``--grid`` flags as (key, value texts); one-line UserError on a malformed flag."""
    grid: list[tuple[str, list[str]]] = []
    for item in items:
        key, sep, rest = item.partition("=")
        key = key.strip()
        if not sep or not KEY.match(key):
            raise UserError(f"--grid {item!r}: expected key=v1,v2,..., e.g. local.lr=0.02,0.05")
        if key == "seed":
            raise UserError("--grid seed: use --seeds N (seeds cfg.seed, cfg.seed+1, ...)")
        if any(key == k for k, _ in grid):
            raise UserError(f"--grid {key}: given twice; put all its values in one flag")
        values = split_values(rest)
        if any(not v for v in values):
            raise UserError(f"--grid {item!r}: an empty value; give values separated by commas")
        if len(set(values)) != len(values):
            raise UserError(f"--grid {item!r}: a value is repeated")
        grid.append((key, values))
    return grid


def cells(grid: list[tuple[str, list[str]]]) -> list[list[tuple[str, str]]]:
    """The cartesian product of the grid, first flag slowest; one empty cell without a grid."""
    return [list(zip([k for k, _ in grid], combo, strict=True))
            for combo in itertools.product(*(values for _, values in grid))]


def cell_name(cell: list[tuple[str, str]]) -> str:
    """A stable, filesystem-safe directory name for a grid cell (``base`` without a grid)."""
    if not cell:
        return "base"
    name = UNSAFE.sub("_", ",".join(f"{k}={v}" for k, v in cell))
    if len(name) > MAX_NAME:                             # keep it short enough for any filesystem
        digest = hashlib.sha1(name.encode()).hexdigest()[:10]
        name = f"{name[:MAX_NAME - 11]}-{digest}"
    return name


def seed_values(base: int, n: int) -> list[int]:
    """The seeds of ``--seeds n``: ``base, base+1, ..., base+n-1``."""
    if n < 1:
        raise UserError(f"--seeds {n}: give at least 1")
    if base + n - 1 >= 2**32:
        raise UserError(f"--seeds {n}: seed {base} + {n - 1} passes 2**32 - 1; lower the config's seed")
    return [base + i for i in range(n)]


@dataclass
class Run:
    """One run of a sweep (or of ``compare --seeds``): where it goes and what it overrides."""

    label: str                    # printed, e.g. local.lr=0.05/seed=1
    run_dir: Path
    config: str
    overrides: list[str] = field(default_factory=list)

    def finished(self) -> bool:
        return (self.run_dir / "summary.json").exists()


def check_same_config(run: Run) -> None:
    """Refuse to reuse or resume a run directory that holds another experiment (``stop`` and
    ``output`` may differ: they do not change what a run computes up to where it stopped)."""
    from gossamer import config as config_mod

    stored = config_mod.load(run.run_dir / "config.yaml").to_dict()
    wanted = config_mod.load(run.config, run.overrides).to_dict()
    for section in ("stop", "output"):
        stored.pop(section, None)
        wanted.pop(section, None)
    if stored != wanted:
        raise UserError(f"{run.run_dir} holds a run of another config (it differs at "
                        f"{first_difference(wanted, stored)}); remove it or choose another --out")


def command(run: Run) -> list[str] | None:
    """The ``gossamer`` arguments (``run ...``) that complete ``run``, or None when it is
    finished."""
    has_config = (run.run_dir / "config.yaml").exists()
    if has_config:
        check_same_config(run)
    if run.finished():
        return None
    cmd = ["run", "--quiet"]
    if has_config:                                         # interrupted: continue it
        sets = [s for s in run.overrides if s.startswith(RESUME_OVERRIDABLE)]
        cmd += ["--resume", str(run.run_dir)]
    else:
        sets = run.overrides
        cmd += [run.config, "--out", str(run.run_dir)]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def execute(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run ``gossamer ARGS`` in a child process; its exit code and output (stdout and stderr
    as written). The child is forked from a forkserver that imported PyTorch once
    (gossamer/processes.py), so a short run does not pay the import each time."""
    from gossamer.processes import start

    fd, log = tempfile.mkstemp(prefix="gossamer-run-", suffix=".log")
    os.close(fd)
    try:
        code = start(args, env, log=Path(log)).wait()
        return code, Path(log).read_text(errors="replace")
    finally:
        os.unlink(log)


def run_jobs(jobs: list[tuple[Run, list[str]]], n_jobs: int) -> Iterator[tuple[Run, int, str]]:
    """Run the commands, up to ``n_jobs`` at once (one intra-op thread each when more than
    one); yield (run, exit code, last output line) as each finishes. On an interrupt the runs
    not started yet are dropped."""
    env = dict(os.environ)
    if n_jobs > 1:
        env.setdefault("OMP_NUM_THREADS", "1")

    def one(job: tuple[Run, list[str]]) -> tuple[Run, int, str]:
        code, output = execute(job[1], env)
        lines = output.strip().splitlines()
        return job[0], code, lines[-1] if lines else ""

    pool = ThreadPoolExecutor(max_workers=max(1, n_jobs))
    try:
        futures = [pool.submit(one, job) for job in jobs]
        for future in as_completed(futures):
            yield future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def complete(runs: list[Run], n_jobs: int, echo: Callable[[str], None] = print) -> list[Run]:
    """Run what is missing of ``runs``; return the runs that failed."""
    jobs = [(r, cmd) for r in runs if (cmd := command(r)) is not None]
    echo(f"{len(runs)} runs: {len(runs) - len(jobs)} finished, {len(jobs)} to run"
         + (f", {n_jobs} at once" if jobs and n_jobs > 1 else ""))
    failed = []
    for run, code, last in run_jobs(jobs, n_jobs):
        echo(f"{run.label}: {'ok' if code == 0 else f'failed (exit {code})'} {last}".rstrip())
        if code != 0:
            failed.append(run)
    return failed


@dataclass
class Sweep:
    """A planned sweep: the grid cells and, per cell, its runs (one per seed)."""

    config: str
    out: Path
    grid: list[tuple[str, list[str]]]
    seeds: list[int]
    cells: list[tuple[list[tuple[str, str]], list[Run]]]

    @property
    def runs(self) -> list[Run]:
        return [r for _, runs in self.cells for r in runs]


def plan(config: str, sets: list[str], grid_items: list[str], n_seeds: int, out: Path) -> Sweep:
    """Expand the grid and validate every cell's config up front (one line naming the cell)."""
    from gossamer import config as config_mod

    grid = parse_grid(grid_items)
    config_mod.load(config, sets)                          # a bad --set: the usual config error
    planned, names, seeds = [], {}, []
    for cell in cells(grid):
        name = cell_name(cell)
        overrides = list(sets) + [f"{k}={v}" for k, v in cell]
        try:
            cfg = config_mod.load(config, overrides)
        except config_mod.ConfigError as exc:
            raise UserError(f"--grid {name}: {exc}") from None
        if name in names:
            raise UserError(f"--grid: cells {names[name]!r} and {cell!r} share the directory {name}")
        names[name] = cell
        seeds = seed_values(cfg.seed, n_seeds)
        runs = [Run(f"{name}/seed={s}", out / name / f"seed={s}", config, overrides + [f"seed={s}"])
                for s in seeds]
        planned.append((cell, runs))
    return Sweep(config, out, grid, seeds, planned)


def write_results(sweep: Sweep, targets: list[float]) -> tuple[Path, list[dict[str, Any]]]:
    """``sweep.md`` (the table), ``sweep.csv`` and ``sweep.json`` (per-metric mean and CI
    half-width) and ``sweep.png`` (accuracy bands) in the sweep's folder, from its finished runs."""
    from gossamer.metrics.compare import aggregate, band_figure, ci_table, csv_text
    from gossamer.metrics.runstore import atomic_write_text

    keys = [k for k, _ in sweep.grid] or ["config"]
    rows, groups = [], []
    for cell, runs in sweep.cells:
        done = [r.run_dir for r in runs if r.finished()]
        label = dict(cell) if cell else {"config": Path(sweep.config).stem}
        rows.append(aggregate(label, done, targets))
        if done:
            groups.append((cell_name(cell), done))
    sweep.out.mkdir(parents=True, exist_ok=True)
    md = sweep.out / "sweep.md"
    atomic_write_text(md, ci_table(rows, keys, targets) + "\n")
    atomic_write_text(sweep.out / "sweep.csv", csv_text(rows))
    atomic_write_text(sweep.out / "sweep.json", json.dumps(
        {"config": sweep.config, "grid": dict(sweep.grid), "seeds": sweep.seeds, "targets": targets,
         "ci": "95%, Student t: mean ± t_{0.975,n-1} * sd / sqrt(n)", "rows": rows}, indent=1) + "\n")
    if groups:
        band_figure(groups, sweep.out / "sweep.png", targets)
    return md, rows
