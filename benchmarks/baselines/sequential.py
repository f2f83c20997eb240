"""MNIST-5k FedAvg as a plain sequential PyTorch loop: one reusable model, clients one by one.

Usage: python benchmarks/baselines/sequential.py --clients 100 --rounds 20
Prints one JSON line: loop seconds (start of round 1 to end of last evaluation), accuracy per round.
"""

from __future__ import annotations

import time

import torch
from common import (
    BATCH_SIZE,
    LR,
    accuracy,
    client_indices,
    load_data,
    make_model,
    parse_args,
    report,
)
from torch import nn


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    x_train, y_train, x_test, y_test = load_data()
    parts = client_indices(args.clients)
    client_x = [x_train[torch.from_numpy(idx)] for idx in parts]
    client_y = [y_train[torch.from_numpy(idx)] for idx in parts]
    sizes = [len(idx) for idx in parts]
    total = float(sum(sizes))

    global_model = make_model()
    local_model = make_model()  # the ONE reusable client model
    optimizer = torch.optim.SGD(local_model.parameters(), lr=LR)
    loss_fn = nn.CrossEntropyLoss()
    global_params = list(global_model.parameters())
    local_params = list(local_model.parameters())

    accuracies: list[float] = []
    start = time.perf_counter()
    for _ in range(args.rounds):
        summed = [torch.zeros_like(p) for p in global_params]
        for x, y, n in zip(client_x, client_y, sizes, strict=True):
            with torch.no_grad():
                for lp, gp in zip(local_params, global_params, strict=True):
                    lp.copy_(gp)
            for lo in range(0, n, BATCH_SIZE):
                optimizer.zero_grad()
                loss = loss_fn(local_model(x[lo : lo + BATCH_SIZE]), y[lo : lo + BATCH_SIZE])
                loss.backward()
                optimizer.step()
            with torch.no_grad():
                for acc, lp in zip(summed, local_params, strict=True):
                    acc.add_(lp, alpha=n / total)
        with torch.no_grad():
            for gp, new in zip(global_params, summed, strict=True):
                gp.copy_(new)
        accuracies.append(accuracy(global_model, x_test, y_test))
    loop_s = time.perf_counter() - start
    report("sequential", loop_s, accuracies, threads=torch.get_num_threads())


if __name__ == "__main__":
    main()
