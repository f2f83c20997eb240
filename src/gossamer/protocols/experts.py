"""The isolated-experts pattern (``isolated_experts``) without clock or transport: which node
trains which expert, the router's trainer, the islands' means and the routed evaluation.

The algorithm's pure parts are in ``algorithms/fl/isolated_experts.py``. Its executors,
``sim/drivers/experts.py`` (every node of every island in one batched call) and
``runtime/experts.py`` (a coordinator and one process per node), take every decision here, so a
run on real processes equals the simulator's round by round.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from gossamer.algorithms.fl.isolated_experts import route
from gossamer.models import ParamSpec, build_model, make_stacked_forward
from gossamer.training.trainer import BatchedTrainer


def islands(exp, algo) -> tuple[np.ndarray, np.ndarray]:
    """The nodes holding data (sorted) and each one's island, from their label counts."""
    trainer = exp.trainer
    nodes = np.flatnonzero(trainer.sizes > 0)
    labels = trainer.y.numpy()
    hist = np.stack([np.bincount(labels[trainer.shards[i, :trainer.sizes[i]]], minlength=exp.dataset.num_classes)
                     for i in nodes])
    return nodes, algo.island_of(hist, exp.cfg.seed)


def router_model(exp, algo) -> tuple[torch.nn.Module, ParamSpec]:
    """The router: the config's model with ``islands`` outputs, built on the host (as the
    experts' model), and its parameter layout (its initial row is ``spec.flatten(model)``)."""
    cfg = exp.cfg
    with torch.device("cpu"):
        model = build_model(cfg.model.name, exp.dataset.input_shape, algo.islands, cfg.seed, **cfg.model.params)
        return model, ParamSpec.from_module(model)


def router_trainer(exp, algo, nodes: np.ndarray, island: np.ndarray,
                   device: torch.device) -> tuple[BatchedTrainer, ParamSpec, torch.Tensor]:
    """The router's trainer (:func:`router_model`): each sample labelled with its node's
    island, the experts' rows, schedule and optimizer; with its layout and initial row."""
    cfg, trainer = exp.cfg, exp.trainer
    model, spec = router_model(exp, algo)
    with torch.device("cpu"):
        forward = make_stacked_forward(model, spec, exp.dataset.x_train[0], cfg.model.forward,
                                       cfg.model.conv, device, compile=cfg.model.compile)
        y = torch.zeros(len(trainer.y), dtype=torch.int64)
        for node, k in zip(nodes, island, strict=True):
            y[torch.from_numpy(trainer.shards[node, :trainer.sizes[node]])] = int(k)
    shards = [trainer.shards[i, :trainer.sizes[i]] for i in range(len(trainer.sizes))]
    router = BatchedTrainer(forward, spec, trainer.x, y, shards, trainer.schedule, trainer.optimizer,
                            cfg.seed, getattr(model, "stacked_kernel", None))
    router.place(device, trainer.autocast)
    return router, spec, spec.flatten(model).to(device)


def group_means(params: torch.Tensor, sizes: np.ndarray, group: np.ndarray, groups: int) -> torch.Tensor:
    """Each group's sample-weighted mean of ``params`` ``[M, P]`` (rows in node order), ``[groups, P]``:
    FedAvg within an island (the router: one group)."""
    device = params.device
    w = torch.from_numpy(np.asarray(sizes, dtype=np.float32)).to(device)
    idx = torch.from_numpy(np.asarray(group, dtype=np.int64)).to(device)
    total = torch.zeros(groups, device=device).index_add_(0, idx, w)
    means = torch.zeros(groups, params.shape[1], device=device).index_add_(0, idx, params * w[:, None])
    return means / total[:, None]


@torch.no_grad()
def evaluate(exp, algo, experts: torch.Tensor, router: torch.Tensor | None,
             router_spec: ParamSpec | None) -> dict[str, float]:
    """The routed ensemble on the test set: ``test_accuracy``/``test_loss`` with top-1 routing,
    ``topk_accuracy`` of the ``top_k`` mixture, ``best_expert_accuracy`` of the best expert alone
    (no router: every expert weighs the same)."""
    ev = exp.evaluator
    logp1, logpk = [], []
    correct = torch.zeros(algo.islands, device=experts.device)      # each expert on the whole test set
    for lo in range(0, len(ev.y), ev.batch_size):
        xb = ev.x[lo:lo + ev.batch_size]
        logits = ev.forward(exp.spec.views(experts), xb.unsqueeze(0).expand(algo.islands, *xb.shape))
        if router is None:
            router_logits = torch.zeros(len(xb), algo.islands, device=experts.device)
        else:
            router_logits = ev.forward(router_spec.views(router.reshape(1, -1)), xb.unsqueeze(0))[0]
        correct += (logits.argmax(-1) == ev.y[lo:lo + ev.batch_size]).sum(1)
        top1, mix = route(router_logits, logits, algo.top_k)
        logp1.append(top1)
        logpk.append(mix)
    logp1, logpk, y = torch.cat(logp1), torch.cat(logpk), ev.y
    return {"test_accuracy": float((logp1.argmax(-1) == y).float().mean()),
            "test_loss": float(F.nll_loss(logp1, y)),
            "topk_accuracy": float((logpk.argmax(-1) == y).float().mean()),
            "best_expert_accuracy": float(correct.max() / len(y))}       # float32, as the evaluator
