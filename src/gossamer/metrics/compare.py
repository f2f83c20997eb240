"""``gossamer compare``: run several configs (or reuse finished runs) and tabulate them.

The table gives, per run, the simulated time (and bytes) to each target accuracy, the final
and best accuracy, total bytes and simulated time; the figure plots test accuracy against
simulated time and against bytes for every run. Times to a target are read from ``metrics.csv`` at the
evaluation rows, so their resolution is the run's ``eval.every``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from gossamer.metrics.plot import read_metrics


def time_to(cols: dict[str, list[float]], target: float) -> tuple[float | None, float | None]:
    """Simulated time and total bytes at the first evaluation reaching ``target``."""
    for i, acc in enumerate(cols["test_accuracy"]):
        if not math.isnan(acc) and acc >= target:
            return cols["sim_time_s"][i], cols["bytes_up"][i] + cols["bytes_down"][i]
    return None, None


def summarize(run_dir: Path, targets: list[float]) -> dict[str, Any]:
    cols = read_metrics(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    row: dict[str, Any] = {"run": run_dir.name, "algorithm": summary.get("algorithm", "?"),
                           "final_accuracy": cols["test_accuracy"][-1],
                           "best_accuracy": max(a for a in cols["test_accuracy"] if not math.isnan(a)),
                           "sim_time_s": cols["sim_time_s"][-1],
                           "bytes_total": cols["bytes_up"][-1] + cols["bytes_down"][-1],
                           "updates": int(cols["round"][-1])}
    for target in targets:
        t, b = time_to(cols, target)
        row[f"time_to_{target}"] = t
        row[f"bytes_to_{target}"] = b
    for key in ("mean_staleness", "mean_client_idle_s", "server_idle_s"):
        if key in summary:
            row[key] = summary[key]
    return row


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "not reached"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(rows: list[dict[str, Any]], targets: list[float]) -> str:
    head = ["run", "algorithm"] + [f"time to {t:.0%} (s)" for t in targets] + \
        [f"MB to {t:.0%}" for t in targets] + ["final acc", "best acc", "MB total", "server updates",
                                               "mean staleness", "mean client idle (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["run"], r["algorithm"]]
        cells += [_fmt(r[f"time_to_{t}"]) for t in targets]
        cells += [_fmt(None if r[f"bytes_to_{t}"] is None else r[f"bytes_to_{t}"] / 1e6) for t in targets]
        cells += [_fmt(r["final_accuracy"], 4), _fmt(r["best_accuracy"], 4), _fmt(r["bytes_total"] / 1e6),
                  str(r["updates"]), _fmt(r.get("mean_staleness"), 2), _fmt(r.get("mean_client_idle_s"), 1)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(run_dirs: list[Path], path: Path, targets: list[float]) -> None:
    """Test accuracy against simulated time (left) and against total bytes (right, log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_b) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for d in run_dirs:
        cols = read_metrics(d)
        ax_t.plot(cols["sim_time_s"], cols["test_accuracy"], label=d.name, linewidth=1.2)
        total = [(u + v) / 1e6 for u, v in zip(cols["bytes_up"], cols["bytes_down"], strict=True)]
        keep = [i for i, b in enumerate(total) if b > 0]          # the log axis drops round 0
        ax_b.plot([total[i] for i in keep], [cols["test_accuracy"][i] for i in keep],
                  label=d.name, linewidth=1.2)
    for ax in (ax_t, ax_b):
        for t in targets:
            ax.axhline(t, color="grey", linestyle=":", linewidth=0.8)
        ax.grid(alpha=0.3)
    ax_t.set_xlabel("simulated time (s)")
    ax_b.set_xlabel("bytes sent + received, all nodes (MB, log scale)")
    ax_b.set_xscale("log")
    ax_t.set_ylabel("test accuracy")
    ax_t.set_ylim(bottom=max(0.0, min(targets, default=0.5) - 0.3))
    ax_t.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare(run_dirs: list[Path], targets: list[float], out: Path) -> tuple[Path, Path]:
    """Write ``comparison.md`` (table), ``comparison.json`` and ``accuracy_vs_time.png`` (accuracy
    against simulated time and against bytes) into ``out``."""
    rows = [summarize(d, targets) for d in run_dirs]
    out.mkdir(parents=True, exist_ok=True)
    md = out / "comparison.md"
    md.write_text(table(rows, targets) + "\n")
    (out / "comparison.json").write_text(json.dumps(rows, indent=1) + "\n")
    fig = out / "accuracy_vs_time.png"
    figure(run_dirs, fig, targets)
    return md, fig


# --- several seeds per configuration: mean and 95% confidence interval ---------------------------

def t_quantile(n: int) -> float:
    """Student's t quantile t_{0.975, n-1}: the 95% two-sided interval over ``n`` samples."""
    from scipy.stats import t

    return float(t.ppf(0.975, n - 1))


def mean_ci(values: list[float | None]) -> tuple[float | None, float | None]:
    """Mean and 95% confidence half-width ``t_{0.975,n-1} * sd / sqrt(n)`` (sample sd, n-1) of
    the values that are not None or NaN; (None, None) without values, (mean, None) with one."""
    vals = [float(v) for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return None, None
    mean = sum(vals) / len(vals)
    if len(vals) == 1:
        return mean, None
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
    return mean, t_quantile(len(vals)) * sd / math.sqrt(len(vals))


AGGREGATED = ("final_accuracy", "best_accuracy", "sim_time_s", "bytes_total")


def aggregate(label: dict[str, Any], run_dirs: list[Path], targets: list[float]) -> dict[str, Any]:
    """One row over the seeds ``run_dirs`` of one configuration: ``<metric>_mean`` and
    ``<metric>_ci95`` (half-width) for final and best accuracy, simulated time and bytes; for
    each target the mean and CI of the time and bytes to it over the seeds that reached it, and
    ``reached_<target>``, how many did."""
    runs = [summarize(d, targets) for d in run_dirs]
    row: dict[str, Any] = dict(label)
    row["seeds"] = len(runs)
    row["algorithm"] = runs[0]["algorithm"] if runs else "?"
    for key in AGGREGATED:
        row[f"{key}_mean"], row[f"{key}_ci95"] = mean_ci([r[key] for r in runs])
    for target in targets:
        reached = [r for r in runs if r[f"time_to_{target}"] is not None]
        row[f"reached_{target}"] = len(reached)
        for kind in ("time_to", "bytes_to"):
            row[f"{kind}_{target}_mean"], row[f"{kind}_{target}_ci95"] = \
                mean_ci([r[f"{kind}_{target}"] for r in reached])
    return row


def _pm(mean: float | None, ci: float | None, digits: int, scale: float = 1.0) -> str:
    if mean is None:
        return "not reached"
    text = f"{mean / scale:.{digits}f}"
    return text if ci is None else f"{text} ± {ci / scale:.{digits}f}"


def ci_table(rows: list[dict[str, Any]], label_keys: list[str], targets: list[float]) -> str:
    """Markdown: one row per configuration, ``mean ± 95% CI`` over its seeds; a target column
    gives the mean over the seeds that reached it and (reached/seeds)."""
    head = list(label_keys) + ["seeds", "final acc", "best acc"] + \
        [f"time to {t:.0%} (s)" for t in targets] + [f"MB to {t:.0%}" for t in targets] + \
        ["sim time (s)", "MB total"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        n = r["seeds"]
        cells = [str(r[k]) for k in label_keys] + [str(n)]
        cells += [_pm(r["final_accuracy_mean"], r["final_accuracy_ci95"], 4),
                  _pm(r["best_accuracy_mean"], r["best_accuracy_ci95"], 4)]
        for kind, scale in (("time_to", 1.0), ("bytes_to", 1e6)):
            cells += [f"{_pm(r[f'{kind}_{t}_mean'], r[f'{kind}_{t}_ci95'], 1, scale)} "
                      f"({r[f'reached_{t}']}/{n})" for t in targets]
        cells += [_pm(r["sim_time_s_mean"], r["sim_time_s_ci95"], 1),
                  _pm(r["bytes_total_mean"], r["bytes_total_ci95"], 1, 1e6)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _band(ys: Any) -> tuple[Any, Any]:
    """Mean and 95% CI half-width across the rows of ``ys`` [seeds, points] (zero with one seed)."""
    import numpy as np

    n = ys.shape[0]
    mean = ys.mean(axis=0)
    if n == 1:
        return mean, np.zeros_like(mean)
    return mean, t_quantile(n) * ys.std(axis=0, ddof=1) / math.sqrt(n)


def seed_curves(run_dirs: list[Path], points: int = 200) -> dict[str, tuple[Any, Any, Any]]:
    """Test accuracy over the seeds ``run_dirs`` as (x, mean, CI half-width) against round (the
    evaluation rounds every seed has), simulated time and total bytes in MB (a common grid over
    the range every seed covers, each seed's curve linearly interpolated onto it)."""
    import numpy as np

    evals = []
    for d in run_dirs:
        cols = read_metrics(d)
        acc = np.asarray(cols["test_accuracy"])
        keep = ~np.isnan(acc)
        total = (np.asarray(cols["bytes_up"]) + np.asarray(cols["bytes_down"])) / 1e6
        evals.append({"round": np.asarray(cols["round"])[keep], "time": np.asarray(cols["sim_time_s"])[keep],
                      "bytes": total[keep], "acc": acc[keep]})
    out: dict[str, tuple[Any, Any, Any]] = {}
    common = sorted(set.intersection(*(set(e["round"].tolist()) for e in evals)))
    if common:
        ys = np.stack([e["acc"][np.searchsorted(e["round"], common)] for e in evals])
        out["round"] = (np.asarray(common), *_band(ys))
    for axis in ("time", "bytes"):
        xs = [e[axis][e[axis] > 0] if axis == "bytes" else e[axis] for e in evals]
        accs = [e["acc"][e[axis] > 0] if axis == "bytes" else e["acc"] for e in evals]
        if any(len(x) == 0 for x in xs):
            continue
        lo, hi = max(float(x[0]) for x in xs), min(float(x[-1]) for x in xs)
        if not lo < hi:
            continue
        grid = np.geomspace(lo, hi, points) if axis == "bytes" else np.linspace(lo, hi, points)
        ys = np.stack([np.interp(grid, x, a) for x, a in zip(xs, accs, strict=True)])
        out[axis] = (grid, *_band(ys))
    return out


def band_figure(groups: list[tuple[str, list[Path]]], path: Path, targets: list[float]) -> None:
    """Mean test accuracy over seeds with a shaded 95% CI band, against round, simulated time
    and total bytes (log scale); one curve per (name, seed run directories) group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5), sharey=True)
    panels = (("round", "round (server updates for async FL)"), ("time", "simulated time (s)"),
              ("bytes", "bytes sent + received, all nodes (MB, log scale)"))
    for k, (name, dirs) in enumerate(groups):
        color = f"C{k % 10}"
        curves = seed_curves(dirs)
        for ax, (axis, _) in zip(axes, panels, strict=True):
            if axis not in curves:
                continue
            x, mean, half = curves[axis]
            ax.plot(x, mean, color=color, linewidth=1.2, label=f"{name} (n={len(dirs)})")
            ax.fill_between(x, mean - half, mean + half, color=color, alpha=0.2, linewidth=0)
    for ax, (_, label) in zip(axes, panels, strict=True):
        for t in targets:
            ax.axhline(t, color="grey", linestyle=":", linewidth=0.8)
        ax.grid(alpha=0.3)
        ax.set_xlabel(label)
    axes[2].set_xscale("log")
    axes[2].xaxis.set_minor_formatter(NullFormatter())           # no crowded minor labels
    axes[0].set_ylabel("test accuracy (mean, 95% CI over seeds)")
    axes[0].set_ylim(bottom=max(0.0, min(targets, default=0.5) - 0.3))
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare_seeds(groups: list[tuple[str, list[Path]]], targets: list[float], out: Path) -> tuple[Path, Path]:
    """``compare`` over several seeds per configuration: ``comparison.md`` (mean ± 95% CI),
    ``comparison.json`` and ``comparison.csv`` (per-metric mean and CI half-width), and
    ``accuracy_vs_time.png`` with a band per configuration."""
    from gossamer.metrics.runstore import atomic_write_text

    rows = [aggregate({"run": name}, dirs, targets) for name, dirs in groups]
    out.mkdir(parents=True, exist_ok=True)
    md = out / "comparison.md"
    atomic_write_text(md, ci_table(rows, ["run", "algorithm"], targets) + "\n")
    atomic_write_text(out / "comparison.json", json.dumps(rows, indent=1) + "\n")
    atomic_write_text(out / "comparison.csv", csv_text(rows))
    fig = out / "accuracy_vs_time.png"
    band_figure(groups, fig, targets)
    return md, fig


def csv_text(rows: list[dict[str, Any]]) -> str:
    """Rows as CSV (columns of the first row; None as an empty field, floats to 8 digits)."""
    import csv
    import io

    from gossamer.metrics.runstore import format_value

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else [], lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: format_value(v) for k, v in r.items()})
    return buf.getvalue()
