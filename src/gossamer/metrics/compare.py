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
