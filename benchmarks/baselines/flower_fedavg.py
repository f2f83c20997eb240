"""MNIST-5k FedAvg on Flower's simulation engine (Ray backend), the way Flower's docs show it.

Usage: python benchmarks/baselines/flower_fedavg.py --clients 100 --rounds 20
K virtual SuperNodes (one per client), every client trains every round (fraction_train=1,
min_train_nodes=min_available_nodes=K), sample-weighted FedAvg (weighted by "num-examples"),
no client-side evaluation, centralized evaluation of the global model on the 1,000 test rows
after each round. Ray gets 2 CPUs and each client 1 CPU, so two clients train at a time.
Prints one JSON line: loop seconds (end of the round-0 evaluation to end of the last
evaluation), accuracy per round. Exits with status 3 when flwr is not installed.
"""

from __future__ import annotations

import os
import sys
import time
from functools import cache, lru_cache

import torch
from torch import nn

# Ray workers import `common` and `flower_fedavg` by name when they unpickle the ClientApp.
_HERE = os.path.dirname(os.path.abspath(__file__))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_HERE, os.environ.get("PYTHONPATH")) if p)

from common import (  # noqa: E402
    BATCH_SIZE,
    LR,
    accuracy,
    client_indices,
    load_data,
    make_model,
    parse_args,
    report,
)

try:
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation
except ImportError:  # the driver reports this exit status as "skipped"
    print("flwr not installed; pip install 'gossamer[bench]'", file=sys.stderr)
    sys.exit(3)

RAY_CPUS = 2
CLIENT_CPUS = 1


@lru_cache(maxsize=1)
def _train_data() -> tuple[torch.Tensor, torch.Tensor]:
    x_train, y_train, _, _ = load_data()
    return x_train, y_train


@cache
def _client_data(partition: int, num_clients: int) -> tuple[torch.Tensor, torch.Tensor]:
    x_train, y_train = _train_data()
    idx = torch.from_numpy(client_indices(num_clients)[partition])
    return x_train[idx], y_train[idx]


@lru_cache(maxsize=1)
def _local_model() -> nn.Sequential:
    return make_model()  # one reusable model per Ray actor; weights are overwritten each round


client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """One local epoch of plain SGD from the received global weights."""
    x, y = _client_data(
        int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    )
    model = _local_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    loss_fn = nn.CrossEntropyLoss()
    for lo in range(0, len(y), BATCH_SIZE):
        optimizer.zero_grad()
        loss_fn(model(x[lo : lo + BATCH_SIZE]), y[lo : lo + BATCH_SIZE]).backward()
        optimizer.step()
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord({"num-examples": len(y)}),
        }
    )
    return Message(content=content, reply_to=msg)


class StrictFedAvg(FedAvg):
    """FedAvg that fails the run when a client fails: Flower would drop it and carry on."""

    def __init__(self, num_clients: int, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.num_clients = num_clients

    def aggregate_train(self, server_round, replies):  # type: ignore[no-untyped-def]
        replies = list(replies)
        errors = [m.error for m in replies if m.has_error()]
        if len(replies) - len(errors) != self.num_clients:
            RUN["error"] = (
                f"round {server_round}: {len(replies) - len(errors)}/{self.num_clients} clients replied; errors: {errors[:3]}"
            )
            raise RuntimeError(RUN["error"])
        return super().aggregate_train(server_round, replies)


RUN: dict[str, object] = {}  # filled by main(); the ServerApp runs in a thread of this process
server_app = ServerApp()


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    num_clients, rounds = int(RUN["clients"]), int(RUN["rounds"])
    x_test, y_test = RUN["x_test"], RUN["y_test"]
    eval_model = make_model()
    accuracies: list[float] = []
    round_end_s: list[float] = RUN.setdefault("round_end_s", [])

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        eval_model.load_state_dict(arrays.to_torch_state_dict())
        acc = accuracy(eval_model, x_test, y_test)
        if server_round == 0:
            RUN["loop_start"] = time.perf_counter()
        else:
            accuracies.append(acc)
            RUN["loop_end"] = time.perf_counter()
            round_end_s.append(RUN["loop_end"] - RUN["loop_start"])
        return MetricRecord({"accuracy": acc})

    strategy = StrictFedAvg(
        num_clients,
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=num_clients,
        min_available_nodes=num_clients,
    )
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(make_model().state_dict()),
        num_rounds=rounds,
        evaluate_fn=evaluate,
    )
    RUN["accuracy"] = accuracies


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    _, _, x_test, y_test = load_data()
    client_indices(args.clients)  # validate K before starting Ray
    RUN.update(clients=args.clients, rounds=args.rounds, x_test=x_test, y_test=y_test)
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=args.clients,
        backend_config={
            "client_resources": {"num_cpus": CLIENT_CPUS, "num_gpus": 0.0},
            "init_args": {"num_cpus": RAY_CPUS, "num_gpus": 0},
        },
    )
    accuracies = RUN.get("accuracy")
    if not accuracies or len(accuracies) != args.rounds:
        print(
            f"flower run incomplete: {RUN.get('error')}; accuracies {accuracies!r}", file=sys.stderr
        )
        sys.exit(1)
    loop_s = float(RUN["loop_end"]) - float(RUN["loop_start"])
    import flwr

    report(
        "flower",
        loop_s,
        accuracies,
        flwr_version=flwr.__version__,
        ray_cpus=RAY_CPUS,
        round_end_s=RUN["round_end_s"],
    )


if __name__ == "__main__":
    # Run as the importable module `flower_fedavg`, not `__main__`, so Ray workers unpickle
    # the ClientApp's functions by reference.
    from flower_fedavg import main as module_main

    module_main()
