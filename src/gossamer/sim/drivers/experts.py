"""Isolated experts on the simulated clock: every island runs FedAvg over its own nodes, all
islands' nodes train in one batched call, and a router is trained by FedAvg over every node
(the decisions: ``protocols/experts.py`` and algorithms/fl/isolated_experts.py)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from gossamer import wire
from gossamer.protocols import experts as protocol
from gossamer.sim.drivers.base import Driver
from gossamer.sim.experiment import Experiment
from gossamer.training.trainer import BatchedTrainer


class ExpertsDriver(Driver):
    columns = Driver.columns + ["participants", "topk_accuracy", "best_expert_accuracy"]

    def __init__(self, exp: Experiment) -> None:
        super().__init__(exp)
        algo = exp.algorithm
        if (exp.faults is not None and exp.faults.enabled) or exp.availability.model != "always" \
                or (exp.adversary is not None and exp.adversary.model_attack):
            raise ValueError("isolated_experts: every node trains every round here; faults, "
                             "availability other than always and attacks are not modelled for it")
        self.algorithm = algo
        self.nodes, self.island = protocol.islands(exp, algo)
        self.experts = exp.init_params.reshape(-1).expand(algo.islands, -1).clone()   # [K, P]
        self.router = self.router_trainer = self.router_spec = None
        if algo.router:
            self.router_trainer, self.router_spec, self.router = protocol.router_trainer(
                exp, algo, self.nodes, self.island, self.device)
        numel = exp.spec.numel + (self.router_spec.numel if self.router_spec is not None else 0)
        self.message = wire.encoded_size(numel)                      # an expert and the router

    def _fedavg(self, trainer: BatchedTrainer, starts: torch.Tensor, group: np.ndarray,
                groups: int, r: int) -> tuple[torch.Tensor, np.ndarray, torch.Tensor]:
        """Train every node from its group's model; each group's sample-weighted mean."""
        result = trainer.train(starts[torch.from_numpy(group)], self.nodes, r)
        means = protocol.group_means(result.params, trainer.sizes[self.nodes], group, groups)
        return means, result.samples, result.loss

    def run_round(self) -> None:
        exp, r = self.exp, self.round + 1
        with self.timer("train_s"):
            self.experts, samples, loss = self._fedavg(exp.trainer, self.experts, self.island,
                                                       self.algorithm.islands, r)
            if self.router_trainer is not None:
                one = np.zeros(len(self.nodes), dtype=np.int64)
                router, router_samples, _ = self._fedavg(self.router_trainer, self.router.reshape(1, -1),
                                                         one, 1, r)
                self.router = router[0]
                samples = samples + router_samples                   # both models' compute
        self.train_loss = float(loss.mean())
        self.node_steps += len(self.nodes)
        system = exp.system
        arrival = (system.download_s(self.nodes, self.message) + system.compute_s(self.nodes, samples)
                   + system.upload_s(self.nodes, self.message))
        self.sim_time += float(arrival.max())
        self.bytes_up += self.message * len(self.nodes)
        self.bytes_down += self.message * len(self.nodes)
        self.round = r

    def evaluate(self) -> dict[str, Any]:
        with self.timer("eval_s"):
            scores = protocol.evaluate(self.exp, self.algorithm, self.experts, self.router, self.router_spec)
        row = self.base_row()
        row.update(participants=len(self.nodes), **scores)
        return row

    def global_params(self) -> torch.Tensor:
        """Island 0's expert (``model.pt`` holds one model); every expert and the router are
        in the checkpoint."""
        return self.experts[0]

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(experts=self.experts.clone(), router=None if self.router is None else self.router.clone())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.experts = state["experts"].to(self.device, copy=True)       # loaded on the host
        if state.get("router") is not None:
            self.router = state["router"].to(self.device, copy=True)
