"""``gossamer plot``: accuracy against round, simulated time and bytes, several runs per figure
(a G-Rank run, which has no accuracy: its mean NDCG).

Runs with decentralized metrics also get ``dl_metrics_vs_round.png`` and
``dl_metrics_vs_time.png``: consensus distance, accuracy of the averaged model, per-node
accuracy (median line, min-max band) and bytes per node (mean solid, max dashed).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

AXES = [("round", "round", "accuracy_vs_round.png"),
        ("sim_time_s", "simulated time (s)", "accuracy_vs_time.png"),
        ("bytes_up", "bytes sent (cumulative)", "accuracy_vs_bytes.png")]
DL_AXES = [("round", "round", "dl_metrics_vs_round.png"),
           ("sim_time_s", "simulated time (s)", "dl_metrics_vs_time.png")]
# One panel per DL metric family: (title, columns, y scale); a panel shows when a run has its first column.
DL_PANELS = [("consensus distance", ["consensus_distance"], "log"),
             ("accuracy of the averaged model", ["avg_model_accuracy"], "linear"),
             ("per-node accuracy (min, median, max)", ["acc_median", "acc_min", "acc_max"], "linear"),
             ("bytes per node (mean, max)", ["bytes_per_node_mean", "bytes_per_node_max"], "linear")]


def read_metrics(run_dir: Path) -> dict[str, list[float]]:
    path = run_dir / "metrics.csv"
    if not path.exists():
        from gossamer.errors import UserError

        raise UserError(f"RUN_DIR: {run_dir} has no metrics.csv")
    columns: dict[str, list[float]] = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                columns.setdefault(key, []).append(float(value) if value not in ("", None) else float("nan"))
    return columns


def plot_runs(run_dirs: list[Path], out: Path | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = out or run_dirs[0]
    out.mkdir(parents=True, exist_ok=True)
    data = [(d.name, read_metrics(d)) for d in run_dirs]
    # a ranking run (grank) has no accuracy: its curve is the mean NDCG over nodes
    measure = {name: "ndcg" if not _has(cols, "test_accuracy") and _has(cols, "ndcg") else "test_accuracy"
               for name, cols in data}
    ylabel = "mean NDCG" if set(measure.values()) == {"ndcg"} else "test accuracy"
    written = []
    for key, label, filename in AXES:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, cols in data:
            ax.plot(cols[key], cols[measure[name]], marker=".", label=name)
        ax.set_xlabel(label)
        ax.set_ylabel(ylabel)
        if key == "bytes_up":
            ax.set_xscale("symlog")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / filename
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    written += _plot_dl(plt, data, out)
    return written


def _has(cols: dict[str, list[float]], key: str) -> bool:
    return any(not math.isnan(v) for v in cols.get(key, []))


def _plot_dl(plt, data: list[tuple[str, dict[str, list[float]]]], out: Path) -> list[Path]:
    """The DL metrics of every run against round and simulated time (nothing if no run has any)."""
    panels = [p for p in DL_PANELS if any(_has(cols, p[1][0]) for _, cols in data)]
    if not panels:
        return []
    written = []
    for key, label, filename in DL_AXES:
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
        for ax, (title, columns, scale) in zip(axes[0], panels, strict=True):
            for i, (name, cols) in enumerate(data):
                if not _has(cols, columns[0]):
                    continue
                color = f"C{i}"
                x = cols[key]
                ax.plot(x, cols[columns[0]], marker=".", color=color, label=name)
                if columns[0] == "acc_median" and _has(cols, "acc_min"):
                    ax.fill_between(x, cols["acc_min"], cols["acc_max"], color=color, alpha=0.2)
                elif len(columns) == 2 and _has(cols, columns[1]):
                    ax.plot(x, cols[columns[1]], linestyle="--", color=color)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel(label)
            ax.set_yscale(scale)
            if scale == "log":              # a round-0 distance of ~0 (same init) would flatten the rest
                top = max(max((v for v in cols.get(columns[0], []) if v > 0), default=1.0)
                          for _, cols in data)
                ax.set_ylim(bottom=top * 1e-6)
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        path = out / filename
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written
