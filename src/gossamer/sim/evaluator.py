"""Batched evaluation of one or many models on the test set."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gossamer.models import ParamSpec, StackedForward


class BatchedEvaluator:
    """Accuracy and loss of stacked models ``[M, P]`` on a shared test set.

    Work is chunked over models and test rows so memory stays bounded by ``budget``
    activations, whatever the number of nodes.
    """

    def __init__(self, forward: StackedForward, spec: ParamSpec, x: torch.Tensor, y: torch.Tensor,
                 batch_size: int = 1000, budget: int = 2_000_000) -> None:
        self.forward, self.spec, self.x, self.y = forward, spec, x, y
        self.batch_size, self.budget = batch_size, budget

    @torch.no_grad()
    def evaluate(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-model test accuracy and mean cross-entropy, both ``[M]``."""
        models, n = params.shape[0], self.x.shape[0]
        rows = min(self.batch_size, n)
        chunk = max(1, self.budget // (rows * max(1, self.x[0].numel())))
        correct = torch.zeros(models)
        loss = torch.zeros(models, dtype=torch.float64)
        for m0 in range(0, models, chunk):
            sub = params[m0:m0 + chunk]
            views = self.spec.views(sub)
            for r0 in range(0, n, rows):
                xb, yb = self.x[r0:r0 + rows], self.y[r0:r0 + rows]
                xs = xb.unsqueeze(0).expand(sub.shape[0], *xb.shape)
                logits = self.forward(views, xs)
                correct[m0:m0 + chunk] += (logits.argmax(-1) == yb).sum(1).float()
                ce = F.cross_entropy(logits.flatten(0, 1), yb.repeat(sub.shape[0]), reduction="none")
                loss[m0:m0 + chunk] += ce.view(sub.shape[0], -1).sum(1).double()
        return correct / n, (loss / n).float()
