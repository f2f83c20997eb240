"""MNIST-5k FedAvg in Apple's pfl-research (PyPI ``pfl``), run as BASELINES.md says is fair.

Usage: python benchmarks/baselines/pfl_fedavg.py --clients 100 --rounds 20
Every client once per round in id order (``MinimizeReuseUserSampler(range(K))``, cohort K),
one local epoch of batch 10 at lr 0.05 in each user's fixed row order, sample-weighted FedAvg
(``WeightByDatapoints``, a central SGD step of 1 on the averaged difference); same data, init
and evaluation as the sequential loop, so it must give the same accuracy curve. pfl evaluates
its users before and after training at its iteration 0 (``evaluation_frequency``); the loop
includes that, as it is pfl's own cost. pfl's one-time import of its optimizer machinery is
paid before the clock starts. Prints one JSON line: loop seconds (start of round 1 to end of
the last evaluation), accuracy per round.
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


class _Module(torch.nn.Module):
    """The standard MLP with the ``loss``/``metrics`` methods pfl's ``PyTorchModel`` asks for."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net
        self.cross_entropy = torch.nn.CrossEntropyLoss()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def loss(self, x: torch.Tensor, y: torch.Tensor, eval: bool = False) -> torch.Tensor:  # noqa: A002
        self.eval() if eval else self.train()
        return self.cross_entropy(self(x), y)

    @torch.no_grad()
    def metrics(self, x: torch.Tensor, y: torch.Tensor, eval: bool = True) -> dict:  # noqa: A002
        from pfl.metrics import Weighted

        self.eval() if eval else self.train()
        loss = torch.nn.functional.cross_entropy(self(x), y, reduction="sum").item()
        return {"loss": Weighted(loss, len(y))}


def main() -> None:
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.aggregate.weighting import WeightByDatapoints
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.callback.base import TrainingProcessCallback
    from pfl.data.dataset import Dataset
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.data.sampling import MinimizeReuseUserSampler
    from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
    from pfl.metrics import Metrics
    from pfl.model.pytorch import PyTorchModel

    args = parse_args(__doc__.splitlines()[0])
    torch.manual_seed(0)
    x_train, y_train, x_test, y_test = load_data()
    parts = client_indices(args.clients)
    users = {u: (x_train[torch.from_numpy(idx)], y_train[torch.from_numpy(idx)])
             for u, idx in enumerate(parts)}

    def make_dataset(user_id):
        x, y = users[user_id]
        return Dataset(raw_data=[x, y], user_id=str(user_id))

    federated = FederatedDataset(make_dataset, MinimizeReuseUserSampler(list(range(args.clients))),
                                 user_id_to_weight={u: len(parts[u]) for u in users})
    module = _Module(make_model())
    model = PyTorchModel(module, local_optimizer_create=torch.optim.SGD,
                         central_optimizer=torch.optim.SGD(module.parameters(), lr=1.0))
    torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=1.0).step()   # pfl's one-time costs

    accuracies: list[float] = []

    class Accuracy(TrainingProcessCallback):
        """The global model's test accuracy after each central iteration."""

        def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
            accuracies.append(accuracy(module.net, x_test, y_test))
            return False, Metrics()

    backend = SimulatedBackend(training_data=federated, val_data=federated,
                               postprocessors=[WeightByDatapoints()])
    params = NNAlgorithmParams(central_num_iterations=args.rounds,
                               evaluation_frequency=args.rounds + 1,
                               train_cohort_size=args.clients, val_cohort_size=0)
    train = NNTrainHyperParams(local_num_epochs=1, local_learning_rate=LR,
                               local_batch_size=BATCH_SIZE)
    start = time.perf_counter()
    FederatedAveraging().run(algorithm_params=params, backend=backend, model=model,
                             model_train_params=train,
                             model_eval_params=NNEvalHyperParams(local_batch_size=None),
                             callbacks=[Accuracy()], send_metrics_to_platform=False)
    loop_s = time.perf_counter() - start
    report("pfl", loop_s, accuracies, threads=torch.get_num_threads())


if __name__ == "__main__":
    main()
