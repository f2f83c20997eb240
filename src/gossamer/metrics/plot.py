"""``gossamer plot``: accuracy against round, simulated time and bytes, several runs per figure."""

from __future__ import annotations

import csv
from pathlib import Path

AXES = [("round", "round", "accuracy_vs_round.png"),
        ("sim_time_s", "simulated time (s)", "accuracy_vs_time.png"),
        ("bytes_up", "bytes sent (cumulative)", "accuracy_vs_bytes.png")]


def read_metrics(run_dir: Path) -> dict[str, list[float]]:
    path = run_dir / "metrics.csv"
    if not path.exists():
        from gossamer.cli import UserError

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
    written = []
    for key, label, filename in AXES:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, cols in data:
            ax.plot(cols[key], cols["test_accuracy"], marker=".", label=name)
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy")
        if key == "bytes_up":
            ax.set_xscale("symlog")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / filename
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written
