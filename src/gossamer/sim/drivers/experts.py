"""Isolated experts on the simulated clock: every island runs FedAvg over its own nodes, all
islands' nodes train in one batched call, and a router is trained by FedAvg over every node
(algorithms/fl/isolated_experts.py holds the decisions)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from gossamer import wire
from gossamer.algorithms.fl.isolated_experts import route
from gossamer.models import ParamSpec, build_model, make_stacked_forward
from gossamer.sim.drivers.base import Driver
from gossamer.sim.experiment import Experiment
from gossamer.training.trainer import BatchedTrainer


class ExpertsDriver(Driver):
    columns = Driver.columns + ["participants", "topk_accuracy", "best_expert_accuracy"]

    def __init__(self, exp: Experiment) -> None:
        super().__init__(exp)
        algo, cfg, trainer = exp.algorithm, exp.cfg, exp.trainer
        if (exp.faults is not None and exp.faults.enabled) or exp.availability.model != "always" \
                or (exp.adversary is not None and exp.adversary.model_attack):
            raise ValueError("isolated_experts: every node trains every round here; faults, "
                             "availability other than always and attacks are not modelled for it")
        self.algorithm = algo
        self.nodes = np.flatnonzero(trainer.sizes > 0)
        labels = trainer.y.numpy()
        classes = exp.dataset.num_classes
        hist = np.stack([np.bincount(labels[trainer.shards[i, :trainer.sizes[i]]], minlength=classes)
                         for i in self.nodes])
        self.island = algo.island_of(hist, cfg.seed)                 # per node of self.nodes
        init = exp.init_params.reshape(-1)
        self.experts = init.expand(algo.islands, -1).clone()        # [K, P]
        self.router = self.router_trainer = self.router_spec = None
        if algo.router:
            with torch.device("cpu"):              # built on the host, as the experts' model
                model = build_model(cfg.model.name, exp.dataset.input_shape, algo.islands, cfg.seed,
                                    **cfg.model.params)
                self.router_spec = spec = ParamSpec.from_module(model)
                forward = make_stacked_forward(model, spec, exp.dataset.x_train[0], cfg.model.forward,
                                               cfg.model.conv, self.device, compile=cfg.model.compile)
                y = torch.zeros(len(trainer.y), dtype=torch.int64)   # each sample: its node's island
                for node, island in zip(self.nodes, self.island, strict=True):
                    y[torch.from_numpy(trainer.shards[node, :trainer.sizes[node]])] = int(island)
            shards = [trainer.shards[i, :trainer.sizes[i]] for i in range(len(trainer.sizes))]
            self.router_trainer = BatchedTrainer(forward, spec, trainer.x, y, shards, trainer.schedule,
                                                 trainer.optimizer, cfg.seed,
                                                 getattr(model, "stacked_kernel", None))
            self.router_trainer.place(self.device, trainer.autocast)   # the experts' rows, its labels
            self.router = spec.flatten(model).to(self.device)
        numel = exp.spec.numel + (self.router_spec.numel if self.router_spec is not None else 0)
        self.message = wire.encoded_size(numel)                      # an expert and the router
        self.topk = self.best = float("nan")

    def _fedavg(self, trainer: BatchedTrainer, starts: torch.Tensor, group: np.ndarray,
                groups: int, r: int) -> tuple[torch.Tensor, np.ndarray, torch.Tensor]:
        """Train every node from its group's model; each group's sample-weighted mean."""
        result = trainer.train(starts[torch.from_numpy(group)], self.nodes, r)
        w = self._index(trainer.sizes[self.nodes].astype(np.float32))
        idx = self._index(group)
        total = torch.zeros(groups, device=self.device).index_add_(0, idx, w)
        means = torch.zeros(groups, result.params.shape[1], device=self.device).index_add_(
            0, idx, result.params * w[:, None])
        return means / total[:, None], result.samples, result.loss

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

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        exp, algo = self.exp, self.algorithm
        with self.timer("eval_s"):
            ev = exp.evaluator
            logp1, logpk = [], []
            correct = torch.zeros(algo.islands, device=self.device)  # each expert on the whole test set
            for lo in range(0, len(ev.y), ev.batch_size):
                xb = ev.x[lo:lo + ev.batch_size]
                logits = ev.forward(exp.spec.views(self.experts), xb.unsqueeze(0).expand(algo.islands, *xb.shape))
                if self.router is None:
                    router_logits = torch.zeros(len(xb), algo.islands, device=self.device)
                else:
                    router_logits = ev.forward(self.router_spec.views(self.router.reshape(1, -1)),
                                               xb.unsqueeze(0))[0]
                correct += (logits.argmax(-1) == ev.y[lo:lo + ev.batch_size]).sum(1)
                top1, mix = route(router_logits, logits, algo.top_k)
                logp1.append(top1)
                logpk.append(mix)
            logp1, logpk = torch.cat(logp1), torch.cat(logpk)
            y = ev.y
            self.best = float(correct.max() / len(y))               # float32, as the evaluator
            accuracy = float((logp1.argmax(-1) == y).float().mean())
            loss = float(F.nll_loss(logp1, y))
            self.topk = float((logpk.argmax(-1) == y).float().mean())
        row = self.base_row()
        row.update(test_accuracy=accuracy, test_loss=loss, participants=len(self.nodes),
                   topk_accuracy=self.topk, best_expert_accuracy=self.best)
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
