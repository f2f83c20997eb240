"""The DL metrics rows: what each column holds, on both executors."""

import numpy as np
import pytest
import torch

from gossamer.protocols import dl_metrics


def test_the_accuracy_row_is_the_mean_and_spread_of_the_evaluated_models():
    row = dl_metrics.accuracy_row(torch.tensor([0.5, 0.75, 1.0, 0.25]), torch.tensor([2.0, 1.0, 0.0, 3.0]))
    assert row == {"test_accuracy": 0.625, "test_loss": 1.5, "acc_min": 0.25, "acc_max": 1.0,
                   "acc_median": 0.5}
    assert "acc_median" not in dl_metrics.accuracy_row(torch.ones(2), torch.ones(2), median=False)


def test_consensus_distance_is_the_mean_squared_distance_to_the_average_in_any_chunking():
    models = torch.tensor([[0.0, 0.0], [2.0, 0.0], [4.0, 6.0]])
    mean = models.mean(0, keepdim=True)                         # [2, 2]
    expected = (8.0 + 4.0 + 20.0) / 3
    assert dl_metrics.consensus_distance(models, mean) == pytest.approx(expected)
    assert dl_metrics.consensus_distance(models, mean, chunk_bytes=1) == pytest.approx(expected)

    def evaluate(rows):
        return rows[:, 0] / 10, rows[:, 1]

    row = dl_metrics.consensus_row(evaluate, models, average_model=True)
    assert row["avg_model_accuracy"] == pytest.approx(0.2) and row["avg_model_loss"] == 2.0
    assert set(dl_metrics.consensus_row(evaluate, models, average_model=False)) == {"consensus_distance"}


def test_visit_statistics_compare_visit_frequencies_with_the_target():
    counts = np.array([[2, 2, 0, 0], [0, 0, 0, 0]])             # the second token never moved
    row = dl_metrics.visit_row(counts, np.full(4, 0.25))
    assert row == {"visits": 4, "visit_tv": 0.5, "visit_tv_token": 0.5}
    assert dl_metrics.visit_row(np.zeros((1, 4), dtype=int), np.full(4, 0.25)) == {"visits": 0}
    assert dl_metrics.node_bytes_row(np.array([1, 2, 6])) == {"bytes_per_node_mean": 3.0,
                                                             "bytes_per_node_max": 6}


def test_the_simulators_drivers_write_the_protocols_columns():
    from gossamer.sim.drivers import driver_for

    assert driver_for("sync_dl").columns == dl_metrics.SYNC_DL_COLUMNS
    assert driver_for("gradient_tracking").columns == dl_metrics.SYNC_DL_COLUMNS
    assert driver_for("async_gossip").columns == dl_metrics.GOSSIP_COLUMNS
    assert driver_for("sampled_dl").columns == dl_metrics.MODEST_COLUMNS
    assert driver_for("random_walk").columns == dl_metrics.WALK_COLUMNS
    assert dl_metrics.BASE_COLUMNS == driver_for("sync_fl").columns[:len(dl_metrics.BASE_COLUMNS)]
