"""Batched evaluation of one or many models on the test set, and scoring candidate models on
a node's own training rows (:func:`local_losses`)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from gossamer import devices
from gossamer.models import ParamSpec, StackedForward
from gossamer.training.trainer import sample_losses


class BatchedEvaluator:
    """Accuracy and loss of stacked models ``[M, P]`` on a shared test set.

    Work is chunked over models and test rows so memory stays bounded by ``budget``
    activations, whatever the number of nodes.
    """

    def __init__(self, forward: StackedForward, spec: ParamSpec, x: torch.Tensor, y: torch.Tensor,
                 batch_size: int = 1000, budget: int = 2_000_000) -> None:
        self.forward, self.spec, self.x, self.y = forward, spec, x, y
        self.batch_size, self.budget = batch_size, budget
        self.autocast: torch.dtype | None = None      # bf16 evaluation (devices.autocast)

    def place(self, device: torch.device, autocast: torch.dtype | None = None,
              reserved: int = 0) -> None:
        """Evaluate on ``device`` (the test rows move there), under ``autocast`` if given. On
        a GPU the activation budget grows to a sixteenth of its free memory less ``reserved``
        bytes (the population), so thousands of models are evaluated in a few chunks."""
        self.x, self.y, self.autocast = self.x.to(device), self.y.to(device), autocast
        spare = devices.spare_bytes(device, reserved)
        if spare is not None:
            self.budget = max(self.budget, spare // (16 * 4))

    @property
    def num_batches(self) -> int:
        """Test batches of ``batch_size`` rows (the last may be shorter)."""
        n = self.x.shape[0]
        return -(-n // min(self.batch_size, n)) if n else 0

    @torch.no_grad()
    @devices.computes_here
    def evaluate(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-model test accuracy and mean cross-entropy, both ``[M]`` (on ``params``'s
        device; computed on the evaluator's)."""
        return self.totals(*self.batch_scores(params))

    @torch.no_grad()
    @devices.computes_here
    def batch_scores(self, params: torch.Tensor, batches: range | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each model's correct predictions (float32) and summed cross-entropy (float64) on
        each test batch of ``batches`` (default: all), ``[M, len(batches)]``: what
        :meth:`totals` adds up, so batches scored apart (on other ranks) give the same bits."""
        models, n = params.shape[0], self.x.shape[0]
        rows = min(self.batch_size, n)
        batches = range(self.num_batches) if batches is None else batches
        chunk = max(1, self.budget // (rows * max(1, self.x[0].numel())))
        correct = torch.zeros(models, len(batches), device=self.x.device)
        loss = torch.zeros(models, len(batches), dtype=torch.float64, device=self.x.device)
        for m0 in range(0, models, chunk):
            sub = params[m0:m0 + chunk]
            views = self.spec.views(sub)
            for j, b in enumerate(batches):
                xb, yb = self.x[b * rows:(b + 1) * rows], self.y[b * rows:(b + 1) * rows]
                xs = xb.unsqueeze(0).expand(sub.shape[0], *xb.shape)
                with devices.autocast(self.x.device, self.autocast):
                    logits = self.forward(views, xs).float()
                if yb.dim() > 1:                    # graph samples: every labelled node counts
                    correct[m0:m0 + chunk, j], loss[m0:m0 + chunk, j] = _graph_scores(logits, yb)
                    continue
                correct[m0:m0 + chunk, j] = (logits.argmax(-1) == yb).sum(1).float()
                ce = F.cross_entropy(logits.flatten(0, 1), yb.repeat(sub.shape[0]), reduction="none")
                loss[m0:m0 + chunk, j] = ce.view(sub.shape[0], -1).sum(1).double()
        return correct, loss

    def totals(self, correct: torch.Tensor, loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Accuracy and mean cross-entropy ``[M]`` from every batch's scores (:meth:`batch_scores`
        over all batches), added in batch order."""
        hits = torch.zeros(correct.shape[0], device=correct.device)
        total = torch.zeros(loss.shape[0], dtype=torch.float64, device=loss.device)
        for j in range(correct.shape[1]):
            hits += correct[:, j]
            total += loss[:, j]
        n = self.x.shape[0] if self.y.dim() == 1 else int((self.y >= 0).sum())
        return hits / n, (total / n).float()


def _graph_scores(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Correct predictions and summed cross-entropy per model over the labelled nodes of graph
    samples: ``logits`` ``[K, n, M, C]``, ``labels`` ``[n, M]`` (``-1``: not a target)."""
    y = labels.expand(logits.shape[:-1])
    labelled = y >= 0
    hits = ((logits.argmax(-1) == y) & labelled).flatten(1).sum(1).float()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none",
                         ignore_index=-1)
    return hits, ce.view(len(y), -1).sum(1).double()


class PersonalEvaluator:
    """Accuracy of each node's own model on that node's own test rows (personalized FL).

    ``tests``: each node's test row indices into ``x``/``y`` (``partition.test_fraction``);
    rows are padded to the widest node and masked, nodes are chunked to keep memory within
    ``budget`` activations."""

    def __init__(self, forward: StackedForward, spec: ParamSpec, x: torch.Tensor, y: torch.Tensor,
                 tests: list[np.ndarray], budget: int = 2_000_000) -> None:
        self.forward, self.spec, self.x, self.y, self.budget = forward, spec, x, y, budget
        self.autocast: torch.dtype | None = None
        self.sizes = np.array([len(t) for t in tests], dtype=np.int64)
        width = max(1, int(self.sizes.max(initial=0)))
        self.rows = np.zeros((len(tests), width), dtype=np.int64)
        for i, t in enumerate(tests):
            self.rows[i, :len(t)] = t
        # what accuracy is over: each node's test rows, or a graph's labelled test nodes
        self.targets = self.sizes if y.dim() == 1 else np.array(
            [int((y[torch.from_numpy(np.asarray(t, dtype=np.int64))] >= 0).sum()) for t in tests],
            dtype=np.int64)

    def place(self, device: torch.device, autocast: torch.dtype | None, x: torch.Tensor,
              y: torch.Tensor) -> None:
        """Evaluate on ``device`` with ``x``, ``y`` (the trainer's placed rows: one copy)."""
        assert x.device == device and x.shape == self.x.shape
        self.x, self.y, self.autocast = x, y, autocast

    @property
    def nodes(self) -> np.ndarray:
        """The nodes that have test rows."""
        return np.flatnonzero(self.sizes > 0)

    @torch.no_grad()
    @devices.computes_here
    def hits(self, params: torch.Tensor, nodes: np.ndarray) -> torch.Tensor:
        """Correct predictions ``[B]`` (float) of model ``params[b]`` on node ``nodes[b]``'s
        test rows: what a client process reports (runtime)."""
        nodes = np.asarray(nodes, dtype=np.int64)
        width = self.rows.shape[1]
        chunk = max(1, self.budget // (width * max(1, self.x[0].numel())))
        device = self.x.device
        out = torch.zeros(len(nodes), device=device)
        for c0 in range(0, len(nodes), chunk):
            part = nodes[c0:c0 + chunk]
            idx = devices.from_host(self.rows[part], device)
            valid = devices.from_host(np.arange(width)[None, :] < self.sizes[part][:, None], device)
            with devices.autocast(device, self.autocast):
                logits = self.forward(self.spec.views(params[c0:c0 + chunk]), self.x[idx]).float()
            if self.y.dim() > 1:                # graph samples: [B, width, M], -1 not a target
                y = self.y[idx]
                hit = (logits.argmax(-1) == y) & valid[..., None] & (y >= 0)
                out[c0:c0 + chunk] = hit.flatten(1).sum(1).float()
                continue
            out[c0:c0 + chunk] = ((logits.argmax(-1) == self.y[idx]) & valid).sum(1).float()
        return out

    def accuracy(self, hits: torch.Tensor, nodes: np.ndarray) -> torch.Tensor:
        """``hits`` ``[B]`` as accuracies on each node's test rows (graph data: its labelled
        test nodes)."""
        targets = devices.from_host(self.targets[np.asarray(nodes, dtype=np.int64)], hits.device)
        return hits / targets.clamp(min=1).float()

    def evaluate(self, params: torch.Tensor, nodes: np.ndarray) -> torch.Tensor:
        """Accuracy ``[B]`` of model ``params[b]`` on node ``nodes[b]``'s test rows."""
        return self.accuracy(self.hits(params, nodes), nodes)


def personal_summary(accuracy: np.ndarray) -> dict[str, float]:
    """Mean, median and the mean of the worst 10% (at least one client) of per-client
    accuracies."""
    acc = np.sort(np.asarray(accuracy, dtype=np.float64))
    worst = acc[: max(1, int(np.ceil(0.1 * len(acc))))]
    return {"personal_accuracy": float(acc.mean()), "personal_median": float(np.median(acc)),
            "personal_worst10": float(worst.mean())}


def clients_table(sizes: np.ndarray, accuracy: np.ndarray) -> str:
    """``clients.csv``: each client's test rows and accuracy at the last evaluation (empty
    where it has none)."""
    lines = ["client,test_rows,accuracy"] + [
        f"{i},{int(sizes[i])},{'' if np.isnan(a) else f'{a:.8g}'}" for i, a in enumerate(accuracy)]
    return "\n".join(lines) + "\n"


# losses(candidates [G, k, P], receivers [G]) -> [G, k], each candidate on the receiver's data
Losses = Callable[[torch.Tensor, np.ndarray], torch.Tensor]


def local_losses(trainer, samples: int = 64) -> Losses:
    """A :data:`Losses` that scores candidates by cross-entropy on up to ``samples`` of the
    receiver's own training rows (the first ones of its shard: fixed, so scores are comparable
    across rounds). Receivers without data score every candidate 0."""

    def score(held: torch.Tensor, receivers: np.ndarray) -> torch.Tensor:
        if held.device != trainer.x.device:    # host rows (a runtime peer): compute there
            return score(held.to(trainer.x.device), receivers).to(held.device)
        g, k, p = held.shape
        m = min(samples, trainer.shards.shape[1])
        take = devices.from_host(trainer.shards[receivers, :m], trainer.device)          # [g, m]
        valid = devices.from_host(np.arange(m)[None, :] < trainer.sizes[receivers, None], trainer.device)
        x = trainer.x[take].repeat_interleave(k, dim=0)                          # [g*k, m, ...]
        y = trainer.y[take].repeat_interleave(k, dim=0)
        with torch.no_grad():
            logits = trainer.forward(trainer.spec.views(held.reshape(g * k, p)), x)
            ce = sample_losses(logits, y)                        # [g*k, m]
        mask = valid.repeat_interleave(k, dim=0).to(ce.dtype)
        return ((ce * mask).sum(1) / mask.sum(1).clamp(min=1)).view(g, k)

    return score
