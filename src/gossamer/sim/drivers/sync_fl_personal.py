"""Personalized synchronous FL inside :class:`~gossamer.sim.drivers.sync_fl.SyncFLDriver`
(docs/personalization.md): every client's own model, its personal step, local-only rounds,
FED-PUB's embeddings and the per-client test accuracy. A part of the driver, in its own file."""

from __future__ import annotations

import numpy as np
import torch

from gossamer.algorithms.fl.fedavg import ServerState
from gossamer.algorithms.fl.fedpub import functional_embeddings, mask_parameters
from gossamer.training.evaluator import personal_summary
from gossamer.training.trainer import TrainResult


class PersonalRounds:
    """The personal parts of :class:`SyncFLDriver` (it mixes this class in)."""

    def _init_personal(self) -> None:
        """Personalized FL's state: every client's own model (Ditto's v, local-only's model,
        FedRep's head), FED-PUB's proxy input and mask entries, the personal metrics."""
        exp, algo = self.exp, self.algorithm
        self.personal: torch.Tensor | None = None
        if algo.personalized:
            self.personal = algo.personal_init(exp.init_params.reshape(-1)).expand(exp.num_nodes, -1).clone()
            self.head_names, self.head = algo.personal_entries(exp.spec)
            self.head = self.head.to(self.device)
        self.extra_up = 0                                  # FED-PUB: each upload's embedding bytes
        if algo.personalized and algo.uses_embeddings:   # FED-PUB: its proxy input and mask entries
            with torch.device("cpu"):          # drawn on the host: the same input on every device
                self.proxy = exp.model.proxy_input(exp.cfg.seed).to(self.device)
            self.mask_entries = mask_parameters(exp.spec)[1].to(self.device)
            self.extra_up = 4 * int(self._embeddings(exp.init_params.reshape(1, -1)).shape[1])
        self.personal_accuracy: np.ndarray | None = None   # each client's, at the last evaluation
        if exp.personal is not None:
            self.columns = self.columns + ["personal_accuracy", "personal_median", "personal_worst10"]

    def _personal_samples(self, clients: np.ndarray, samples: np.ndarray) -> np.ndarray:
        """Samples the personal step computes on: the local schedule's, or its epochs'."""
        epochs = self.algorithm.personal_epochs
        return samples if epochs is None else epochs * self.exp.trainer.sizes[clients]

    def _personal_step(self, r: int, clients: np.ndarray, received: torch.Tensor) -> None:
        """The clients' personal models take their local steps on the algorithm's personal
        objective (Ditto: towards the model they received; FedRep: the head alone)."""
        with self.timer("train_s"):
            result = self._personal_train(r, clients, received)
            self.personal[torch.from_numpy(clients)] = result.params
        self.node_steps += int(result.steps.sum())

    def _personal_train(self, r: int, clients: np.ndarray, received: torch.Tensor) -> TrainResult:
        """The personal models of ``clients`` after their personal steps (rows ``[K, P]``);
        the sharded simulator trains each client on its owner."""
        exp, algo = self.exp, self.algorithm
        idx = torch.from_numpy(clients)
        steps = None
        if algo.personal_epochs is not None:
            per_epoch = -(-exp.trainer.sizes[clients] // exp.cfg.local.batch_size)
            steps = algo.personal_epochs * per_epoch
        start = algo.personal_start(received, self.personal[idx], self.head)
        objective = algo.personal_objective(received, self.head_names, exp.spec.names)
        return exp.trainer.train(start.contiguous(), clients, r + (1 << 42), steps=steps, objective=objective)

    def _local_round(self, r: int, ids: np.ndarray) -> None:
        """Local-only training: the selected clients train their own models; nothing is sent,
        and the round lasts as long as the slowest of them computes."""
        exp = self.exp
        samples = self._personal_samples(ids, exp.trainer.samples(ids, r))
        compute_s = exp.system.compute_s(ids, samples)
        if exp.faults.enabled:
            compute_s = compute_s * exp.faults.slowdown(r, ids)
        self._personal_step(r, ids, self.state.params)
        self.accounting.completed(ids)
        self.sim_time += float(compute_s.max())
        self.state = ServerState(self.state.params, r, self.state.extra)
        self.round = r

    def _personal_row(self) -> dict[str, float]:
        """Every client's model (personal, else the global one; fine-tuned first with
        ``eval.personal_finetune_steps``) on its own test rows: mean, median, worst 10%."""
        nodes = self.exp.personal.nodes
        accuracy = self._personal_accuracy(nodes)
        self.personal_accuracy = np.full(self.exp.num_nodes, np.nan)
        self.personal_accuracy[nodes] = accuracy
        return personal_summary(accuracy)

    def _personal_accuracy(self, nodes: np.ndarray) -> np.ndarray:
        """The accuracy of ``nodes``' models on their own test rows (each client's alone: the
        sharded simulator measures each on its owner)."""
        exp = self.exp
        if self.personal is not None:
            models = self.algorithm.personal_model(self.state.params, self.personal[torch.from_numpy(nodes)],
                                                   self.head)
        else:
            models = self.state.params.reshape(1, -1).expand(len(nodes), -1)
        steps = exp.cfg.eval.personal_finetune_steps
        if steps:
            models = exp.trainer.train(models.contiguous(), nodes, self.round + (1 << 43),
                                       steps=np.full(len(nodes), steps)).params
        return exp.personal.evaluate(models, nodes).cpu().numpy()

    def _embeddings(self, models: torch.Tensor) -> torch.Tensor:
        """FED-PUB's functional embeddings ``[K, H]`` of models ``[K, P]`` on the proxy input."""
        return functional_embeddings(self.exp.model, self.exp.spec, self.proxy, models)
