"""The metrics rows of the decentralized patterns, written once for both executors.

The simulator's drivers build a row from their population; the runtime's merger
(``runtime/dl_merge.py``) builds the same row from what the peers recorded. Both call these
builders, so a column means the same thing on either side. Pure functions over tensors and
arrays: no clock, no transport, no population storage.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from gossamer.algorithms.dl.random_walk import total_variation

BASE_COLUMNS = ["round", "sim_time_s", "bytes_up", "bytes_down", "test_accuracy", "test_loss",
                "train_loss"]
NODE_BYTES = ["bytes_per_node_mean", "bytes_per_node_max"]
SYNC_DL_COLUMNS = BASE_COLUMNS + ["acc_min", "acc_median", "acc_max", "avg_model_accuracy",
                                  "avg_model_loss", "consensus_distance", "online", "isolated",
                                  "lost_messages", "merges_skipped"] + NODE_BYTES
GOSSIP_COLUMNS = SYNC_DL_COLUMNS + ["events", "messages_dropped"]
MODEST_COLUMNS = BASE_COLUMNS + ["participants", "aggregators", "timeouts", "view_size"] + NODE_BYTES
WALK_COLUMNS = BASE_COLUMNS + ["acc_min", "acc_max", "avg_model_accuracy", "avg_model_loss",
                               "visits", "visit_tv", "visit_tv_token", "online", "token_skips",
                               "tokens_waiting", "lost_messages"]

# (models [B, P]) -> (accuracies [B], losses [B]): the executor's batched evaluator
Evaluate = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def accuracy_row(acc: torch.Tensor, loss: torch.Tensor, *, median: bool = True) -> dict[str, Any]:
    """Mean accuracy and loss of the evaluated models ``[B]`` and the accuracies' spread."""
    row = {"test_accuracy": float(acc.mean()), "test_loss": float(loss.mean()),
           "acc_min": float(acc.min()), "acc_max": float(acc.max())}
    if median:
        row["acc_median"] = float(acc.median())
    return row


def average_model_row(evaluate: Evaluate, mean: torch.Tensor) -> dict[str, Any]:
    """Accuracy and loss of the average model ``[1, P]``."""
    acc, loss = evaluate(mean)
    return {"avg_model_accuracy": float(acc[0]), "avg_model_loss": float(loss[0])}


def consensus_row(evaluate: Evaluate, models: torch.Tensor, average_model: bool) -> dict[str, Any]:
    """Consensus distance of ``models`` ``[N, P]`` and (``average_model``) their mean's accuracy."""
    mean = models.mean(0, keepdim=True)
    row = {"consensus_distance": consensus_distance(models, mean)}
    if average_model:
        row.update(average_model_row(evaluate, mean))
    return row


def consensus_distance(params: torch.Tensor, mean: torch.Tensor, chunk_bytes: int = 16 << 20) -> float:
    """(1/N) sum_i ||x_i - mean||^2, in row chunks so no population-sized temporary is made.

    Kong et al., "Consensus Control for Decentralized Deep Learning", ICML 2021.
    """
    rows = max(1, chunk_bytes // (params.shape[1] * params.element_size()))
    total = 0.0
    for start in range(0, params.shape[0], rows):
        diff = params[start:start + rows] - mean
        total += float(diff.square_().sum())
    return total / params.shape[0]


def node_bytes_row(node_bytes: np.ndarray) -> dict[str, Any]:
    """Bytes each node sent plus received ``[N]``: their mean and maximum."""
    return {"bytes_per_node_mean": float(np.mean(node_bytes)), "bytes_per_node_max": int(np.max(node_bytes))}


def visit_row(counts: np.ndarray, mu: np.ndarray) -> dict[str, Any]:
    """Random walks: visits so far, and the total variation between the visit frequencies
    (all tokens together, and the mean over tokens that moved) and the target ``mu``."""
    per_token = counts.sum(axis=1)
    total = int(per_token.sum())
    row: dict[str, Any] = {"visits": total}
    if total:
        row["visit_tv"] = float(total_variation(counts.sum(axis=0) / total, mu))
        seen = per_token > 0
        row["visit_tv_token"] = float(total_variation(counts[seen] / per_token[seen, None], mu).mean())
    return row
