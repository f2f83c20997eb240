"""`gossamer plot`: the DL metrics figures against round and simulated time."""

import csv

from gossamer.metrics.plot import plot_runs

DL_COLUMNS = ["round", "sim_time_s", "bytes_up", "test_accuracy", "acc_min", "acc_median", "acc_max",
              "avg_model_accuracy", "consensus_distance", "bytes_per_node_mean", "bytes_per_node_max"]


def _write(run, columns, rows):
    run.mkdir()
    with (run / "metrics.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(rows)


def test_dl_metrics_are_plotted_against_round_and_time(tmp_path):
    _write(tmp_path / "dl", DL_COLUMNS,
           [[r, 1.5 * r, 1000 * r, 0.1 * r, 0.08 * r, 0.1 * r, 0.12 * r, 0.11 * r, 1.0 / (r + 1),
             500 * r, 800 * r] for r in range(5)])
    _write(tmp_path / "fl", ["round", "sim_time_s", "bytes_up", "test_accuracy"],
           [[r, 2.0 * r, 900 * r, 0.1 * r] for r in range(5)])
    written = plot_runs([tmp_path / "dl", tmp_path / "fl"], tmp_path / "figs")
    names = {p.name for p in written}
    assert {"dl_metrics_vs_round.png", "dl_metrics_vs_time.png", "accuracy_vs_round.png"} <= names
    assert all(p.stat().st_size > 1000 for p in written)


def test_fl_runs_get_no_dl_figure(tmp_path):
    _write(tmp_path / "fl", ["round", "sim_time_s", "bytes_up", "test_accuracy"],
           [[r, 2.0 * r, 900 * r, 0.1 * r] for r in range(3)])
    written = plot_runs([tmp_path / "fl"], tmp_path / "figs")
    assert sorted(p.name for p in written) == ["accuracy_vs_bytes.png", "accuracy_vs_round.png",
                                              "accuracy_vs_time.png"]
