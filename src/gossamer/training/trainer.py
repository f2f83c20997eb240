"""Batched local training: every node that acts at the same simulated moment, in one call.

The acting nodes' parameters are rows of a ``[B, P]`` tensor. Each local step gathers one
mini-batch per node (``[B, n, ...]``), runs the stacked forward, sums the per-node mean
losses and takes one autograd pass: since node ``b``'s loss depends only on row ``b``,
the gradient of the sum is every node's own gradient. Nodes with fewer batches than the
busiest node are masked, so unequal data sizes need no Python loop over nodes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from gossamer import devices, rng
from gossamer.algorithms.local import LocalObjective
from gossamer.models import ParamSpec, StackedForward
from gossamer.models.graph import graph_sample_loss
from gossamer.models.layerwise import LowRankWeight
from gossamer.models.zoo import DenseKernel
from gossamer.privacy.dp import TAG_SGD, clip_factors, gaussian


@dataclass(frozen=True)
class LocalSchedule:
    """How much a node trains per activation: whole ``epochs`` or a fixed number of ``steps``."""

    batch_size: int
    epochs: int | None = 1
    steps: int | None = None
    shuffle: bool = True


def local_steps(schedule: LocalSchedule, num_samples: np.ndarray) -> np.ndarray:
    """Local steps a node with ``num_samples`` samples takes per activation (what
    :meth:`BatchedTrainer.train` reports as ``steps``), from the schedule alone."""
    n = np.asarray(num_samples, dtype=np.int64)
    if schedule.steps is not None:
        return np.where(n > 0, schedule.steps, 0)
    return int(schedule.epochs or 1) * -(-n // schedule.batch_size)


@dataclass(frozen=True)
class SGD:
    """Plain SGD with optional heavy-ball momentum and weight decay (fresh state per activation).

    ``sam_rho`` > 0 makes it sharpness-aware (SAM): the mini-batch gradient ``g`` at ``w`` sets
    the ascent step ``e = sam_rho * g / (||g|| + 1e-12)`` (one norm per node over all its
    parameters), and the step uses the gradient at ``w + e`` on the same mini-batch in place
    of ``g``; weight decay, momentum and an algorithm's terms are unchanged (evaluated at
    ``w``). Both training paths support it (the fused kernel with two kernel steps).
    As used by DFedSAM: Shi et al., "Improving the Model Consistency of Decentralized
    Federated Learning", ICML 2023, arXiv:2302.04083.
    """

    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    sam_rho: float = 0.0


@dataclass(frozen=True)
class PrivateSGD:
    """Sample-level DP-SGD (Abadi et al. 2016, arXiv:1607.00133): every per-sample gradient
    clipped to L2 norm ``clip_norm`` (over all parameters), Gaussian noise of std
    ``noise_multiplier * clip_norm`` added to their sum, divided by the batch's sample count."""

    clip_norm: float
    noise_multiplier: float


@dataclass(frozen=True)
class AdamW:
    """AdamW (Loshchilov, Hutter, "Decoupled Weight Decay Regularization", ICLR 2019,
    arXiv:1711.05101) with ``torch.optim.AdamW``'s arithmetic: ``w *= 1 - lr wd``, ``m = b1 m
    + (1 - b1) g``, ``v = b2 v + (1 - b2) g^2``, ``w -= lr m / (1 - b1^t) / (sqrt(v / (1 -
    b2^t)) + eps)``, per node, masked like SGD (a node without a batch does not step).

    Its state (``m``, ``v``, the step count ``t``) is fresh per activation unless the
    algorithm passes rows of it in :attr:`LocalObjective.optimizer_state` (DiLoCo's workers
    keep their inner optimizer across outer steps). Autograd path only (no fused kernel)."""

    lr: float
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01
    momentum = 0.0        # (read by paths shared with SGD: no heavy-ball, no SAM)
    sam_rho = 0.0

    @staticmethod
    def state_width(numel: int) -> int:
        """Columns of one node's state row: ``m``, ``v`` (``numel`` each) and ``t``."""
        return 2 * numel + 1


# per leaf: the proximal anchor, the correction and the L1 coefficient (LocalObjective's terms)
Term = tuple[torch.Tensor | None, torch.Tensor | None, float]


def sample_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each sample's cross-entropy, ``labels.shape`` ``[B, n]``; a graph sample (labels
    ``[B, n, M]``, one per node, ``-1`` unlabelled) takes the mean over its labelled nodes."""
    if labels.dim() > 2:
        return graph_sample_loss(logits, labels)
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)


CHUNK_BYTES = 64 << 20     # autograd training: nodes per pass (BatchedTrainer.chunk_nodes)
WORKSPACE_BYTES = 1 << 30  # fused training: the most a parameter-major workspace may take
INPUTS_BYTES = 64 << 20    # fused training: a call's inputs gathered at once (and kept) up to this
CACHE_BYTES = 4 << 20      # fused training on a CPU: weights per thread stepped together (BatchedTrainer._cache_nodes)


@dataclass
class TrainResult:
    params: torch.Tensor | None   # [B, P] trained rows (None when only their mean was asked for)
    samples: np.ndarray           # [B] samples processed per node (drives compute time)
    steps: np.ndarray             # [B] optimizer steps per node
    loss: torch.Tensor            # [B] mean training loss per node over its steps
    mean: torch.Tensor | None = None   # [P] ``mean_weights @ rows``, when asked for


class BatchedTrainer:
    """Trains stacked rows of the population on their own data shards."""

    def __init__(self, forward: StackedForward, spec: ParamSpec, x: torch.Tensor, y: torch.Tensor,
                 shards: list[np.ndarray], schedule: LocalSchedule, optimizer: SGD | AdamW, seed: int,
                 kernel: DenseKernel | None = None, dp: PrivateSGD | None = None) -> None:
        self.forward, self.spec = forward, spec
        self.sample_loss = getattr(forward, "loss", None)     # a model's own training loss
        # the fused kernel never forms per-sample gradients: DP-SGD takes the autograd path
        self.kernel = kernel if isinstance(optimizer, SGD) and optimizer.momentum == 0 and dp is None else None
        self.dp = dp
        self.ledger = None              # a DPLedger recording DP-SGD steps (set by the driver)
        # BatchNorm running statistics in the rows: never stepped, updated by the forward
        self.stats: tuple[str, ...] = spec.stats
        self._stepped = [k for k, name in enumerate(spec.names) if name not in spec.stats]   # leaves
        if self.stats and dp is not None:
            raise ValueError("privacy.dp: sample-level DP-SGD needs per-sample gradients, which "
                             "a BatchNorm layer's batch statistics couple; use GroupNorm")
        self._buffer: torch.Tensor | None = None       # parameter-major workspace (reused)
        self._batch: torch.Tensor | None = None        # gathered inputs (reused storage)
        self._inputs: tuple[bytes, torch.Tensor, torch.Tensor] | None = None   # last _gather_all
        self._plan: tuple[tuple, tuple[np.ndarray, np.ndarray]] | None = None   # last batches()
        self.schedule, self.optimizer, self.seed = schedule, optimizer, seed
        # how wide an epoch's batches are when no node fills batch_size: "call", as wide as
        # the call's largest shard (fastest); "population", the bound population's largest
        # shard; "configured", batch_size. With the last two a node's arithmetic never depends
        # on the other nodes of its call (the sharded simulator and a registered population's
        # cohorts need that: its cohort is bound anew for every call, so "configured")
        self.batch_width: Literal["call", "population", "configured"] = "call"
        self.autocast: torch.dtype | None = None      # bf16 training (devices.autocast)
        # dense layers' weights on the autograd path (model.dense): "stacked", one [B, out, in]
        # tensor stepped in place; "low_rank", a shared start plus each node's steps
        # (LowRankWeight) where a call allows it; "auto", low-rank where its rows are few
        self.dense: Literal["auto", "stacked", "low_rank"] = "auto"
        self.low_rank_layers: set[str] = set()     # the weights a call has trained low-rank (summary.json)
        # how much a call may hold at once (the module constants on the CPU; a GPU's free
        # memory sets them in `place`)
        self.chunk_bytes, self.workspace_bytes, self.inputs_bytes = CHUNK_BYTES, WORKSPACE_BYTES, INPUTS_BYTES
        self.bind(x, y, shards)

    @property
    def device(self) -> torch.device:
        """Where the trainer computes: its data's device (:meth:`place`)."""
        return self.x.device

    def place(self, device: torch.device, autocast: torch.dtype | None = None,
              reserved: int = 0) -> None:
        """Train on ``device`` (the data rows move there; workspaces are made there), under
        ``autocast`` when given: the forward and backward in that dtype, weights and their
        updates in fp32. Autocast takes the autograd path (the fused kernel has no autocast).

        On a GPU the per-call budgets grow with its free memory less ``reserved`` bytes (the
        population the executor will allocate): an eighth for an autograd chunk's weights and
        gradients, a quarter for the fused workspace, a sixteenth for gathered inputs, so a
        ResNet trains dozens of nodes per pass instead of the CPU budget's one or two."""
        self.x, self.y, self.autocast = self.x.to(device), self.y.to(device), autocast
        self._buffer = self._batch = None
        self._inputs = None
        if autocast is not None:
            self.kernel = None
        spare = devices.spare_bytes(device, reserved)
        if spare is not None:
            self.chunk_bytes = max(CHUNK_BYTES, spare // 8)
            self.workspace_bytes = max(WORKSPACE_BYTES, spare // 4)
            self.inputs_bytes = max(INPUTS_BYTES, spare // 16)

    def _index(self, array: np.ndarray) -> torch.Tensor:
        """A host array (sample indices, masks) as a tensor on the trainer's device."""
        return devices.from_host(array, self.device)

    def bind(self, x: torch.Tensor, y: torch.Tensor, shards: list[np.ndarray],
             ids: np.ndarray | None = None) -> None:
        """Train on ``x``, ``y`` with node ``b``'s rows ``shards[b]``. ``ids``: the nodes' ids in
        the data-order draws (default: their positions), so that a lazy population's cohort
        (``training/cohort.py``), bound anew for every call, shuffles each client as its id says."""
        self.x, self.y, self.ids = x, y, ids
        self._plan = self._inputs = None
        self.sizes = np.array([len(s) for s in shards], dtype=np.int64)
        width = max(1, int(self.sizes.max(initial=0)))
        padded = np.zeros((len(shards), width), dtype=np.int64)
        for i, shard in enumerate(shards):
            padded[i, : len(shard)] = shard
        self.shards = padded

    # --- data schedule -------------------------------------------------------------------
    def _order(self, nodes: np.ndarray, keys: np.ndarray, epoch: int) -> np.ndarray:
        """Per-node sample order for one epoch ``[B, width]``; padding sorts last."""
        width = self.shards.shape[1]
        pos = np.arange(width)
        if not self.schedule.shuffle:
            return np.broadcast_to(pos, (len(nodes), width))
        named = nodes if self.ids is None else self.ids[nodes]
        u = rng.uniform(self.seed, rng.STREAM_DATA_ORDER, named[:, None], keys[:, None], epoch,
                        pos[None, :])
        u = np.where(pos[None, :] < self.sizes[nodes][:, None], u, 2.0)
        return np.argsort(u, axis=1, kind="stable")

    def batches(self, nodes: np.ndarray, keys: np.ndarray,
                steps: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Sample indices ``[B, T, n]`` and a validity mask of the same shape.

        ``keys`` (one per node, e.g. the round) select a fresh shuffle per activation.
        In epoch mode every epoch ends with a partial batch if the shard size is not a
        multiple of the batch size; in step mode batches run on across epochs. ``steps``
        (one count per node) overrides the schedule: node ``b`` takes ``steps[b]`` steps
        (step mode; the others are masked).

        The last plan is kept: :meth:`samples` (an executor pricing a round) and :meth:`train`
        of the same nodes and keys build it once. Callers only read the arrays.
        """
        key = (nodes.tobytes(),                      # without shuffling the keys change nothing
               np.asarray(keys).tobytes() if self.schedule.shuffle else None,
               None if steps is None else np.asarray(steps, dtype=np.int64).tobytes())
        if self._plan is not None and self._plan[0] == key:
            return self._plan[1]
        plan = self._plan_batches(nodes, keys, steps)
        self._plan = (key, plan)
        return plan

    def _plan_batches(self, nodes: np.ndarray, keys: np.ndarray,
                      steps: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        bs, sizes = self.schedule.batch_size, self.sizes[nodes]
        if steps is not None:
            per_node = np.asarray(steps, dtype=np.int64)
            if per_node.shape != nodes.shape or (per_node < 0).any():
                raise ValueError("steps must give one non-negative count per node")
            total = int(per_node.max(initial=0))
            idx, valid = self._step_batches(nodes, keys, max(total, 1), sizes, bs)
            valid = valid & (np.arange(idx.shape[1])[None, :, None] < per_node[:, None, None])
            return idx[:, :total], np.ascontiguousarray(valid[:, :total])
        if self.schedule.steps is not None:
            return self._step_batches(nodes, keys, self.schedule.steps, sizes, bs)
        return self._epoch_batches(nodes, keys, sizes, bs)

    def _step_batches(self, nodes: np.ndarray, keys: np.ndarray, steps: int, sizes: np.ndarray,
                      bs: int) -> tuple[np.ndarray, np.ndarray]:
        flat = np.arange(steps * bs)
        safe = np.maximum(sizes, 1)[:, None]
        epoch, within = flat[None, :] // safe, flat[None, :] % safe
        n_epochs = int(epoch.max(initial=0)) + 1
        orders = np.stack([self._order(nodes, keys, e) for e in range(n_epochs)], axis=1)
        pos = np.take_along_axis(orders.reshape(len(nodes), -1),
                                 epoch * orders.shape[2] + within, axis=1)
        idx = np.take_along_axis(self.shards[nodes], pos, axis=1).reshape(len(nodes), steps, bs)
        valid = np.broadcast_to((sizes > 0)[:, None, None], idx.shape)
        return idx, np.ascontiguousarray(valid)

    def _epoch_batches(self, nodes: np.ndarray, keys: np.ndarray, sizes: np.ndarray,
                       bs: int) -> tuple[np.ndarray, np.ndarray]:
        epochs = int(self.schedule.epochs or 1)
        # no node here fills a batch: batches as wide as the largest shard, not padded to bs
        # (D-PSGD at N = 1000: 4 samples per node trained as [N, 10, ...] before)
        if self.batch_width != "configured":
            widest = sizes if self.batch_width == "call" else self.sizes
            bs = max(1, min(bs, int(widest.max(initial=0))))
        per_epoch = -(-sizes // bs)                       # batches per epoch per node
        width = int(per_epoch.max(initial=0))
        slot = np.arange(width * bs).reshape(width, bs)
        idx_parts, valid_parts = [], []
        for e in range(epochs):
            order = self._order(nodes, keys, e)
            take = np.minimum(slot.reshape(1, -1), order.shape[1] - 1)
            pos = np.take_along_axis(order, np.broadcast_to(take, (len(nodes), take.shape[1])), axis=1)
            idx_parts.append(np.take_along_axis(self.shards[nodes], pos, axis=1).reshape(len(nodes), width, bs))
            valid_parts.append(slot[None] < sizes[:, None, None])
        idx, valid = np.concatenate(idx_parts, axis=1), np.concatenate(valid_parts, axis=1)
        if epochs > 1 and width > 0:                      # move each node's real steps first
            step_ok = valid.any(axis=2)
            order = np.argsort(~step_ok, axis=1, kind="stable")
            idx = np.take_along_axis(idx, order[:, :, None], axis=1)
            valid = np.take_along_axis(valid, order[:, :, None], axis=1)
            last = int(step_ok.sum(axis=1).max(initial=0))
            idx, valid = idx[:, :last], valid[:, :last]
        return idx, valid

    def reserve(self, nodes: np.ndarray, dtype: torch.dtype = torch.float32) -> None:
        """Allocate, and write once, the fused kernel's workspace and gathered inputs for a
        call that trains ``nodes`` (an executor's typical cohort, before its loop; parameters
        of ``dtype``), so that its first round does not pay their page faults inside the loop;
        hand-written batched code likewise allocates its stacked weights before its loop.
        Later calls still grow them."""
        nodes = np.asarray(nodes, dtype=np.int64)
        if self.kernel is None or len(nodes) == 0:
            return
        idx, _ = self.batches(nodes, np.zeros(len(nodes), dtype=np.int64))
        rows = min(len(nodes), self._chunk(True, idx.shape[1], True))
        if not self._in_rows(idx.shape[1], False):               # the workspace will be used
            need = rows * self.spec.numel
            if self._buffer is None or self._buffer.numel() < need or self._buffer.dtype != dtype:
                self._buffer = torch.empty(need, dtype=dtype, device=self.device).zero_()
        self._gather_all(idx[:rows])

    def samples(self, nodes: np.ndarray, keys: np.ndarray | int,
                steps: np.ndarray | None = None) -> np.ndarray:
        """Samples each node would process in :meth:`train` (its compute cost), without training."""
        nodes = np.asarray(nodes, dtype=np.int64)
        keys = np.broadcast_to(np.asarray(keys, dtype=np.int64), nodes.shape)
        return self.batches(nodes, keys, steps)[1].sum(axis=(1, 2))

    # --- training --------------------------------------------------------------------------
    def train(self, params: torch.Tensor, nodes: np.ndarray, keys: np.ndarray | int,
              inplace: bool = False, steps: np.ndarray | None = None,
              objective: LocalObjective | None = None,
              mean_weights: torch.Tensor | None = None,
              mean_groups: np.ndarray | None = None) -> TrainResult:
        """Run local training for the rows ``params`` ``[B, P]`` belonging to ``nodes``: see
        :meth:`_train`. With a :attr:`ledger` (sample-level DP outside synchronous FL) each
        node's DP-SGD steps are recorded there."""
        result = self._train(params, nodes, keys, inplace, steps, objective, mean_weights, mean_groups)
        if self.ledger is not None:
            self.ledger.sample_steps(np.asarray(nodes, dtype=np.int64), result.steps)
        return result

    def _train(self, params: torch.Tensor, nodes: np.ndarray, keys: np.ndarray | int,
               inplace: bool = False, steps: np.ndarray | None = None,
               objective: LocalObjective | None = None,
               mean_weights: torch.Tensor | None = None,
               mean_groups: np.ndarray | None = None) -> TrainResult:
        """Run local training for the rows ``params`` ``[B, P]`` belonging to ``nodes``.

        With ``inplace`` the trained rows are written back into ``params`` (a dense tensor,
        not an expanded view) and returned, saving a population-sized copy. ``steps``
        gives each node its own number of local steps (see :meth:`batches`); ``objective``
        adds an algorithm's terms to every gradient (:class:`LocalObjective`).

        Each parameter is trained as its own stacked leaf ``[B, *shape]`` (autograd through
        slices of one flat tensor would materialize a full ``[B, P]`` gradient per slice).

        With ``mean_weights`` ``[B]`` (summing to 1) only the weighted mean of the trained rows
        is returned (``TrainResult.mean``, ``params`` None): it is taken from the parameter-major
        leaves, block by block, so no ``[B, P]`` output is written (FedAvg's round). With
        ``mean_groups`` (positions ``0 = g_0 < ... < g_G = B``) it is one weighted sum per group
        ``[G, P]``, each a product over that group's rows alone (the sharded simulator's
        block sums); the call must fit one pass (:attr:`nodes_per_pass`).
        """
        if params.device != self.device:        # a runtime process: host rows, a GPU's compute
            return self._train_from_host(params, nodes, keys, inplace, steps, objective,
                                         mean_weights, mean_groups)
        nodes = np.asarray(nodes, dtype=np.int64)
        keys = np.broadcast_to(np.asarray(keys, dtype=np.int64), nodes.shape)
        objective = objective or LocalObjective()
        fused = (self.kernel is not None and not objective.recursive and not objective.frozen
                 and not objective.by_name)
        unknown = set(objective.frozen) - set(self.spec.names)
        if unknown:
            raise ValueError(f"frozen parameters {sorted(unknown)} are not the model's")
        idx, valid = self.batches(nodes, keys, steps)
        low_rows = {} if fused else self._low_rank(params, objective, idx.shape)
        chunk = self._chunk(fused, idx.shape[1], mean_weights is not None, low_rows)
        if mean_groups is not None and (mean_weights is None or len(nodes) > chunk):
            raise ValueError("mean_groups: give mean_weights, and at most nodes_per_pass nodes")
        if len(nodes) > chunk:
            return self._train_chunks(params, nodes, keys, inplace, steps, objective, mean_weights, chunk,
                                      means=bool(low_rows))
        if self.stats and objective.recursive:
            raise ValueError("FedAMD's recursive direction does not support BatchNorm; use GroupNorm")
        if objective.recursive and self.optimizer.sam_rho:
            raise ValueError("local.sam_rho: SAM does not combine with a recursive direction (FedAMD)")
        if self.dp is not None and (objective.recursive or self.optimizer.sam_rho):
            raise ValueError("privacy.dp: DP-SGD does not combine with SAM or FedAMD")
        if fused:
            return self._train_fused(params, idx, valid, inplace, objective, mean_weights, mean_groups)
        if self.stats:                      # running statistics: the forward's, not the optimizer's
            objective = replace(objective, frozen=(*objective.frozen, *self.stats))
        names = self.spec.names
        views = list(self.spec.views(params).values())
        low = {k: LowRankWeight(views[k][0].detach(), len(nodes), rows) for k, rows in low_rows.items()}
        self.low_rank_layers.update(names[k] for k in low)
        leaves = [v if k in low else v.detach().clone() for k, v in enumerate(views)]
        terms = self._objective_views(objective, None)
        direction = previous = None
        if objective.recursive:
            rows = objective.recursive_direction.reshape(-1, self.spec.numel).expand(len(nodes), -1)
            direction = [v.clone() for v in self.spec.views(rows).values()]
            previous = [leaf.clone() for leaf in leaves]
        opt = self.optimizer
        bufs = [torch.zeros_like(leaf) for leaf in leaves] if opt.momentum > 0 else None
        adam = self._adam_state(objective, len(nodes), params.dtype) if isinstance(opt, AdamW) else None
        loss_sum = torch.zeros(len(nodes), device=self.device)
        idx_t, valid_t = self._index(idx), self._index(valid)
        counts = valid_t.sum(dim=2).to(params.dtype)                  # [B, T]
        everyone = valid.any(axis=2).all(axis=0)       # [T] on the host: no device read per step
        for t in range(idx.shape[1]):
            weight = valid_t[:, t].to(params.dtype)                   # [B, n]
            active = counts[:, t] > 0                                 # [B]
            every = bool(everyone[t])
            xb, yb = self.x[idx_t[:, t]], self.y[idx_t[:, t]]
            if direction is not None:
                grads = self._recursive_direction(leaves, previous, direction, xb, yb, weight,
                                                  counts[:, t], active, loss_sum)
                previous = [leaf.clone() for leaf in leaves]
                self._step(leaves, grads, bufs, adam, active, None, None, every)
                continue
            if self.dp is not None:
                grads = self._dp_gradient(leaves, xb, yb, weight, counts[:, t], nodes, keys, t, loss_sum)
                self._step(leaves, grads, bufs, adam, active, objective, terms, every)
                continue
            if low:
                loss_sum += self._low_rank_step(leaves, low, xb, yb, weight, counts[:, t], active,
                                                objective, terms, every)
                continue
            self._trainable(leaves)
            per_sample = self._sample_losses(dict(zip(names, leaves, strict=True)), xb, yb, (weight, True))
            per_node = (per_sample.reshape(weight.shape) * weight).sum(1) / counts[:, t].clamp(min=1)
            # a gradient in another layout than its leaf (a channels-last convolution's)
            # makes the update a strided pass, several times slower than copying it first
            grads = [g if g.is_contiguous() else g.contiguous() for g in self._grads(per_node.sum(), leaves)]
            loss_sum += per_node.detach()
            leaves = [leaf.detach() for leaf in leaves]
            if opt.sam_rho:
                grads = self._sam_gradient(leaves, grads, xb, yb, weight, counts[:, t])
            self._step(leaves, grads, bufs, adam, active, objective, terms, every)
        if adam is not None and objective.optimizer_state is not None:     # kept by the caller
            self._store_adam(adam, objective.optimizer_state)
        if mean_weights is None:
            for k, w in low.items():
                leaves[k] = w.weights()
        else:                               # the mean needs no node's weight (weighted_sum)
            leaves = [low.get(k, leaf) for k, leaf in enumerate(leaves)]
        return self._result(params, leaves, valid, loss_sum, inplace, mean_weights, mean_groups)

    def _low_rank(self, params: torch.Tensor, objective: LocalObjective,
                  batches: tuple[int, ...]) -> dict[int, int]:
        """The dense layers this call trains as :class:`LowRankWeight`, by leaf index, each
        with the rows its factors take (``r``), for
        ``batches`` ``(B, T, n)``: where every node starts from the same row (an expanded start,
        as FedAvg's round gives, or a single node: a runtime client) and takes plain SGD steps (no momentum, SAM,
        DP-SGD, corrections, L1 or a proximal term toward another point on the layer, frozen
        layers, BatchNorm, a model's own loss or bf16).
        Each step then adds ``n`` rows (times the samples' positions, for a sequence) to the
        node's ``[r, in]`` and ``[r, out]`` factors instead of stepping its ``[out, in]`` weight;
        with ``model.dense: auto`` only where the ``r`` rows of all ``T`` steps cost at most a
        quarter of the weight (``4 r (in + out) <= in * out``: FedAvg's CNN, 3136 x 512 with 50
        rows, yes; a 784 x 64 first layer, no). Weight decay and a proximal term toward the
        start itself (FedProx's anchor, the global model) keep the form (:class:`LowRankWeight`)."""
        linears = getattr(self.forward, "linears", None)
        opt = self.optimizer
        if (self.dense == "stacked" or not linears or not isinstance(opt, SGD) or opt.momentum
                or opt.sam_rho or self.dp is not None or objective.recursive
                or objective.frozen or objective.correction is not None or self.stats
                or self.sample_loss is not None or self.autocast is not None
                or params.dim() != 2 or not len(params) or (len(params) > 1 and params.stride(0) != 0)):
            return {}
        _, steps, width = batches
        anchor = None
        if objective.prox_mu:        # one anchor for every node (FedProx's: the global model)
            rows = objective.anchor.reshape(-1, self.spec.numel)
            anchor = self.spec.views(rows[:1]) if len(rows) == 1 or rows.stride(0) == 0 else {}
        views = self.spec.views(params[:1]) if anchor else {}
        chosen = {}
        for k, name in enumerate(self.spec.names):
            if name not in linears or name in objective.l1:
                continue
            if anchor is not None and (not objective.prox_only or name in objective.prox_only) and (
                    name not in anchor or not torch.equal(anchor[name], views[name])):
                continue                          # a proximal term toward another point
            fin, fout, rest = linears[name]
            rows = steps * width * rest
            if self.dense == "auto" and 4 * rows * (fin + fout) > fin * fout:
                continue
            chosen[k] = rows
        return chosen

    def _low_rank_step(self, leaves: list[torch.Tensor], low: dict[int, LowRankWeight],
                       xb: torch.Tensor, yb: torch.Tensor, weight: torch.Tensor, count: torch.Tensor,
                       active: torch.Tensor, objective: LocalObjective, terms: list[Term],
                       every: bool) -> torch.Tensor:
        """One SGD step with ``low``'s layers as :class:`LowRankWeight`: their output
        gradients become their factors' new rows, the other leaves step in place (a node
        without a batch has a zero gradient there, so it does not move). Each node's loss."""
        rest = [k for k in range(len(leaves)) if k not in low]
        for k in rest:
            leaves[k].requires_grad_(True)
        per_node = self._per_node_loss([low.get(k, leaf) for k, leaf in enumerate(leaves)], xb, yb, weight, count)
        outs = [w.out for w in low.values()]
        grads = torch.autograd.grad(per_node.sum(), [leaves[k] for k in rest] + outs)
        lr = self.optimizer.lr
        for k, w, g in zip(low, low.values(), grads[len(rest):], strict=True):
            name = self.spec.names[k]
            mu = objective.prox_mu if not objective.prox_only or name in objective.prox_only else 0.0
            w.record(g, lr * objective.grad_scale, 1.0 - lr * (mu + self.optimizer.weight_decay), lr * mu,
                     None if every else active)
        for k in rest:
            leaves[k] = leaves[k].detach()
        self._sgd_step([leaves[k] for k in rest],
                       [g if g.is_contiguous() else g.contiguous() for g in grads[: len(rest)]],
                       None, active, objective, [terms[k] for k in rest], every)
        return per_node.detach()

    def _train_from_host(self, params: torch.Tensor, nodes: np.ndarray, keys: np.ndarray | int,
                         inplace: bool, steps: np.ndarray | None, objective: LocalObjective | None,
                         mean_weights: torch.Tensor | None, mean_groups: np.ndarray | None) -> TrainResult:
        """:meth:`train` of rows that live elsewhere (a runtime process keeps its messages and
        state on the host and trains on its GPU): the rows, the objective's tensors and the
        mean's weights move to the trainer's device, the result moves back (into ``params``
        with ``inplace``; the optimizer state into the caller's rows)."""
        home, dev = params.device, self.device
        moved = objective.to(dev) if objective is not None else None
        rows_in = (params[:1].to(dev).expand(params.shape)        # one model for every row: one copy
                   if params.dim() == 2 and len(params) and params.stride(0) == 0 else params.to(dev))
        result = self._train(rows_in, nodes, keys, False, steps, moved,
                             None if mean_weights is None else mean_weights.to(dev), mean_groups)
        if moved is not None and objective.optimizer_state is not None:
            objective.optimizer_state.copy_(moved.optimizer_state)
        rows = None
        if result.params is not None:
            rows = params.copy_(result.params) if inplace else result.params.to(home)
        return TrainResult(rows, result.samples, result.steps, result.loss.to(home),
                           None if result.mean is None else result.mean.to(home))

    @property
    def chunk_nodes(self) -> int:
        """Nodes trained together on the autograd path: as many as keep their weights,
        gradients and a copy within :data:`CHUNK_BYTES` (at least one), so a model of
        ResNet-18's size trains a node or two at a time instead of holding every node's
        gradients at once."""
        return max(1, self.chunk_bytes // (3 * self.spec.numel * self.x.element_size()))

    @property
    def nodes_per_pass(self) -> int:
        """Nodes one training pass holds gradients for (memory estimates)."""
        return self._chunk(self.kernel is not None, 1, False)

    @staticmethod
    def _in_rows(steps: int, mean: bool) -> bool:
        """Whether the fused kernel updates the given rows directly (one or two steps, rows
        wanted) instead of working in the parameter-major workspace."""
        return steps <= 2 and not mean

    def _chunk(self, fused: bool, steps: int, mean: bool, low: dict[int, int] | None = None) -> int:
        """Nodes per pass: :attr:`chunk_nodes` on the autograd path; on the fused kernel's,
        as many as fit the parameter-major workspace in :data:`WORKSPACE_BYTES` (when it
        updates the given rows directly there is no workspace, but its gradients take as much:
        D-PSGD on 10^6 nodes would hold a population-sized gradient otherwise)."""
        if not fused and low:          # low-rank layers hold their factors, not [out, in] per node
            held = self.spec.numel
            for k, rows in low.items():
                fin, fout, _ = self.forward.linears[self.spec.names[k]]      # type: ignore[attr-defined]
                held += rows * (fin + fout) - fin * fout
            return max(1, self.chunk_bytes // (3 * held * self.x.element_size()))
        if not fused:
            return self.chunk_nodes
        return max(1, self.workspace_bytes // (self.spec.numel * self.x.element_size()))

    def _cache_nodes(self, rows: int, steps: int) -> int:
        """Nodes the fused kernel steps through all their ``steps`` before the next nodes
        start: on a CPU, when there are several steps, as many as keep :data:`CACHE_BYTES` of
        weights per thread (the parameter-major workspace of FedAvg's 100 MNIST clients is
        20 MB, past the caches, and every step read and wrote all of it: 1.2x faster with 4
        steps on one thread); otherwise every node at once (one step reuses nothing, and
        smaller batched products cost more calls)."""
        if self.device.type != "cpu" or steps < 2:
            return rows
        per_node = self.spec.numel * self.x.element_size()
        return max(1, min(rows, torch.get_num_threads() * CACHE_BYTES // per_node))

    def _train_chunks(self, params: torch.Tensor, nodes: np.ndarray, keys: np.ndarray, inplace: bool,
                      steps: np.ndarray | None, objective: LocalObjective,
                      mean_weights: torch.Tensor | None, chunk: int, means: bool = False) -> TrainResult:
        """:meth:`train`, ``chunk`` nodes at a time (each node's result is its own); with
        ``means`` each chunk returns its share of the mean, not its rows (low-rank layers
        then never form a node's weight)."""
        total = len(nodes)
        out = None if mean_weights is not None else params if inplace else torch.empty_like(params, memory_format=torch.contiguous_format)
        mean, samples, taken, losses = None, [], [], []
        for lo in range(0, total, chunk):
            part = slice(lo, min(lo + chunk, total))
            r = self._train(params[part], nodes[part], keys[part], steps=None if steps is None else steps[part],
                            objective=objective.rows(part, total),
                            mean_weights=mean_weights[part] if means and mean_weights is not None else None)
            if mean_weights is None:
                out[part] = r.params
            else:
                share = r.mean if r.mean is not None else mean_weights[part].to(params.dtype) @ r.params
                mean = share if mean is None else mean + share
            samples.append(r.samples)
            taken.append(r.steps)
            losses.append(r.loss)
        return TrainResult(out, np.concatenate(samples), np.concatenate(taken), torch.cat(losses), mean)

    def _result(self, params: torch.Tensor, leaves: list[torch.Tensor] | None, valid: np.ndarray,
                loss_sum: torch.Tensor, inplace: bool, mean_weights: torch.Tensor | None,
                groups: np.ndarray | None = None) -> TrainResult:
        """The trained leaves (module order, ``[B, *shape]``) as rows, or only their mean;
        ``leaves`` None: ``params`` already holds the trained rows."""
        steps = valid.any(axis=2).sum(axis=1)
        loss = loss_sum / self._index(np.maximum(steps, 1)).to(loss_sum.dtype)
        if mean_weights is not None and groups is not None:    # one weighted sum per group
            spans = zip(groups[:-1].tolist(), groups[1:].tolist(), strict=True)
            mean = torch.stack([self._weighted_sum(mean_weights[a:b], leaves, slice(a, b)) for a, b in spans])
            return TrainResult(None, valid.sum(axis=(1, 2)), steps, loss, mean)
        if mean_weights is not None:
            return TrainResult(None, valid.sum(axis=(1, 2)), steps, loss, self._weighted_sum(mean_weights, leaves))
        if leaves is not None:
            out = params if inplace else torch.empty_like(params, memory_format=torch.contiguous_format)
            for view, leaf in zip(self.spec.views(out).values(), leaves, strict=True):
                view.copy_(leaf)
            params = out
        return TrainResult(params, valid.sum(axis=(1, 2)), steps, loss)

    def _dp_gradient(self, leaves: list[torch.Tensor], xb: torch.Tensor, yb: torch.Tensor,
                     weight: torch.Tensor, count: torch.Tensor, nodes: np.ndarray, keys: np.ndarray,
                     step: int, loss_sum: torch.Tensor) -> list[torch.Tensor]:
        """DP-SGD's noisy mean of clipped per-sample gradients, ``[B, *shape]`` per leaf.

        Per-sample gradients come from the same stacked forward: each sample becomes its own
        row (its node's parameters repeated), so one autograd pass gives every sample's
        gradient; nodes are processed in chunks of at most ~2**25 gradient values. Noise for
        node ``b`` is keyed by ``(node, key, step)``."""
        dp, names = self.dp, self.spec.names
        assert dp is not None
        b, n = weight.shape
        grads = [torch.empty_like(leaf) for leaf in leaves]
        chunk = max(1, (1 << 25) // max(1, n * self.spec.numel))
        for s in range(0, b, chunk):
            e = min(b, s + chunk)
            rows = [leaf[s:e].repeat_interleave(n, 0).requires_grad_(True) for leaf in leaves]
            x = xb[s:e].reshape((e - s) * n, 1, *xb.shape[2:])
            per_sample = self._sample_losses(dict(zip(names, rows, strict=True)), x,
                                             yb[s:e].reshape((e - s) * n, 1, *yb.shape[2:])).reshape(-1)
            sample_grads = torch.autograd.grad(per_sample.sum(), rows)
            sq = sum(g.flatten(1).square().sum(1) for g in sample_grads)
            factor = clip_factors(sq, dp.clip_norm) * weight[s:e].reshape(-1)
            for out, g in zip(grads, sample_grads, strict=True):
                scaled = g * factor.view(-1, *([1] * (g.dim() - 1)))
                out[s:e] = scaled.view(e - s, n, *g.shape[1:]).sum(1)
            loss = (per_sample.detach().view(e - s, n) * weight[s:e]).sum(1)
            loss_sum[s:e] += loss / count[s:e].clamp(min=1)
        if dp.noise_multiplier > 0:
            key_rows = np.stack([nodes, keys, np.full(b, step)], axis=1)
            noise = gaussian(self.seed, TAG_SGD, key_rows, self.spec.numel, leaves[0].device).to(leaves[0].dtype)
            noise.mul_(dp.noise_multiplier * dp.clip_norm)
            for out, z in zip(grads, self.spec.views(noise).values(), strict=True):
                out.add_(z)
        denom = count.clamp(min=1)
        return [g.div_(denom.view(-1, *([1] * (g.dim() - 1)))) for g in grads]

    def _sample_losses(self, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                       batch: tuple[torch.Tensor, bool] | None = None) -> torch.Tensor:
        """Every sample's training loss ``[B, n]`` for inputs ``[B, n, ...]`` and labels
        ``[B, n]`` (graph samples: ``[B, n, M]``): the model's own loss when it defines one
        (``stacked_loss``: FedIns adds its key-matching term), else :func:`sample_losses` of
        its logits. ``batch``: each sample's weight ``[B, n]`` (0 for padding) and whether
        BatchNorm layers update their running statistics (a model without them ignores it)."""
        with devices.autocast(self.device, self.autocast):
            if self.sample_loss is not None:
                return self.sample_loss(params, x, y).reshape(y.shape[:2]).float()
            if batch is not None and self.stats:
                return sample_losses(self.forward(params, x, batch=(batch[0] > 0, batch[1])).float(), y)
            return sample_losses(self.forward(params, x).float(), y)

    def _per_node_loss(self, leaves: list[torch.Tensor], xb: torch.Tensor, yb: torch.Tensor,
                       weight: torch.Tensor, count: torch.Tensor, update: bool | None = None) -> torch.Tensor:
        batch = None if update is None else (weight, update)
        per_sample = self._sample_losses(dict(zip(self.spec.names, leaves, strict=True)), xb, yb, batch)
        return (per_sample.reshape(weight.shape) * weight).sum(1) / count.clamp(min=1)

    def _trainable(self, leaves: list[torch.Tensor]) -> None:
        """Leaves that take gradients: all but BatchNorm's running statistics (the forward
        updates those in place)."""
        for k in self._stepped:
            leaves[k].requires_grad_(True)

    def _grads(self, loss: torch.Tensor, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
        """``d loss / d leaf`` for every leaf: zeros for running statistics (never stepped)."""
        if not self.stats:
            return list(torch.autograd.grad(loss, leaves))
        grads = dict(zip(self._stepped, torch.autograd.grad(loss, [leaves[k] for k in self._stepped]),
                         strict=True))
        return [grads[k] if k in grads else torch.zeros_like(leaf) for k, leaf in enumerate(leaves)]

    def _sam_gradient(self, leaves: list[torch.Tensor], grads: list[torch.Tensor], xb: torch.Tensor,
                      yb: torch.Tensor, weight: torch.Tensor, count: torch.Tensor) -> list[torch.Tensor]:
        """SAM: each node's gradient at ``w + rho * g / ||g||`` on the same mini-batch.

        Nodes without a batch have ``g = 0``, so no perturbation (and their step is masked)."""
        sq = sum(g.flatten(1).square().sum(1) for g in grads)
        scale = self.optimizer.sam_rho / (sq.sqrt() + 1e-12)                     # [B]
        perturbed = [leaf + g * scale.view(-1, *([1] * (g.dim() - 1)))
                     for leaf, g in zip(leaves, grads, strict=True)]
        self._trainable(perturbed)
        per_node = self._per_node_loss(perturbed, xb, yb, weight, count, update=False)
        return self._grads(per_node.sum(), perturbed)

    def _recursive_direction(self, leaves, previous, direction, xb, yb, weight, count, active,
                             loss_sum) -> list[torch.Tensor]:
        """``d += g(w_k; b) - g(w_{k-1}; b)`` in place (active nodes only); one stacked
        forward over ``[previous; current]`` gives both gradients."""
        both = [torch.cat([p, c]).requires_grad_(True) for p, c in zip(previous, leaves, strict=True)]
        two = lambda v: torch.cat([v, v])                              # noqa: E731
        per_node = self._per_node_loss(both, two(xb), two(yb), two(weight), two(count))
        grads = torch.autograd.grad(per_node.sum(), both)
        b = len(active)
        loss_sum += per_node.detach()[b:]
        for d, g in zip(direction, grads, strict=True):
            change = g[b:] - g[:b]
            mask = active.view(-1, *([1] * (d.dim() - 1)))
            d.add_(torch.where(mask, change, torch.zeros((), dtype=change.dtype, device=change.device)))
        return [d.clone() for d in direction]

    @devices.computes_here
    def full_gradient(self, params: torch.Tensor, nodes: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Each node's gradient of its mean loss over its whole shard at ``params`` ``[B, P]``
        (one batch per node; FedAMD's anchors), and that loss ``[B]``."""
        self._no_stats("a full-shard gradient (FedAMD, gradient coding)")
        nodes = np.asarray(nodes, dtype=np.int64)
        sizes = self.sizes[nodes]
        widest = self.sizes if self.batch_width == "population" else sizes     # ranks: fixed by the population
        width = max(1, int(widest.max(initial=0)))
        idx = self._index(self.shards[nodes, :width])
        weight = self._index(np.arange(width)[None, :] < sizes[:, None]).to(params.dtype)
        leaves = [v.detach().clone().requires_grad_(True) for v in self.spec.views(params).values()]
        per_node = self._per_node_loss(leaves, self.x[idx], self.y[idx], weight,
                                       self._index(sizes).to(params.dtype))
        grads = torch.autograd.grad(per_node.sum(), leaves)
        out = torch.empty(len(nodes), self.spec.numel, dtype=params.dtype, device=params.device)
        for view, g in zip(self.spec.views(out).values(), grads, strict=True):
            view.copy_(g)
        return out, per_node.detach()

    @torch.no_grad()
    @devices.computes_here
    def batch_losses(self, params: torch.Tensor, idx: np.ndarray, valid: np.ndarray,
                     budget: int = 1 << 24) -> torch.Tensor:
        """Forward only: row ``r`` of ``params`` ``[R, P]``'s mean loss on the samples
        ``idx[r]`` ``[R, n]`` where ``valid[r]`` (0 for a row without samples), ``[R]`` float64.

        One stacked forward per chunk of rows, chunks bounded by ``budget`` input values plus
        parameter values (zeroth-order training: two evaluations per perturbation)."""
        self._no_stats("zeroth-order training")
        rows, n = idx.shape
        per_row = n * max(1, self.x[0].numel()) + self.spec.numel
        chunk = max(1, budget // per_row)
        out = torch.zeros(rows, dtype=torch.float64, device=self.device)
        idx_t, valid_t = self._index(idx), self._index(valid)
        for s in range(0, rows, chunk):
            e = min(rows, s + chunk)
            weight = valid_t[s:e].to(params.dtype)
            leaves = list(self.spec.views(params[s:e]).values())
            xb, yb = self.x[idx_t[s:e]], self.y[idx_t[s:e]]
            out[s:e] = self._per_node_loss(leaves, xb, yb, weight, weight.sum(1)).double()
        return out

    def _no_stats(self, what: str) -> None:
        if self.stats:
            raise ValueError(f"{what} does not support BatchNorm (its running statistics would "
                             "never be updated); use GroupNorm")

    def _objective_views(self, objective: LocalObjective, kernel: DenseKernel | None
                         ) -> list[Term]:
        """Per-leaf ``(anchor, correction)`` views in the layout the training path uses."""
        def split(rows: torch.Tensor | None) -> list[torch.Tensor | None]:
            if rows is None:
                return [None] * len(self.spec.names)
            views = self.spec.views(rows.reshape(-1, self.spec.numel))
            return kernel.leaves(views) if kernel is not None else list(views.values())

        anchor = split(objective.anchor if objective.prox_mu else None)
        if objective.prox_only:                  # the proximal term on the named parameters only
            anchor = [a if name in objective.prox_only else None
                      for a, name in zip(anchor, self.spec.names, strict=True)]
        l1 = [objective.l1_mu if name in objective.l1 else 0.0 for name in self.spec.names]
        return list(zip(anchor, split(objective.correction), l1, strict=True))

    def _extra(self, leaf: torch.Tensor, term: Term,
               objective: LocalObjective) -> torch.Tensor | None:
        """``prox_mu * (w - anchor) + correction (+ l1_mu * sign(w))`` for one leaf (None when
        all are absent)."""
        anchor, correction, l1 = term
        out = None
        if anchor is not None:
            out = (leaf - anchor).mul_(objective.prox_mu)
        if correction is not None:
            out = correction.expand_as(leaf).clone() if out is None else out.add_(correction)
        if l1:
            out = torch.sign(leaf).mul_(l1) if out is None else out.add_(torch.sign(leaf), alpha=l1)
        return out

    def _adam_state(self, objective: LocalObjective, rows: int, dtype: torch.dtype
                    ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """AdamW's ``m`` and ``v`` per leaf ``[B, *shape]`` and ``t`` ``[B]``: copies of the
        rows in ``objective.optimizer_state`` (``[B, 2P + 1]``), or zeros."""
        numel = self.spec.numel
        state = objective.optimizer_state
        if state is None:
            state = torch.zeros(rows, AdamW.state_width(numel), dtype=dtype, device=self.device)
        elif state.shape != (rows, AdamW.state_width(numel)):
            raise ValueError(f"optimizer_state must be [{rows}, {AdamW.state_width(numel)}] "
                             f"(m, v, t per node), got {list(state.shape)}")
        m = [v.clone() for v in self.spec.views(state[:, :numel]).values()]
        v = [v.clone() for v in self.spec.views(state[:, numel:2 * numel]).values()]
        return m, v, state[:, 2 * numel].clone()

    def _store_adam(self, adam: tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor],
                    state: torch.Tensor) -> None:
        """Write AdamW's state back into the caller's rows ``[B, 2P + 1]`` in place."""
        numel = self.spec.numel
        m, v, t = adam
        for block, leaves in ((state[:, :numel], m), (state[:, numel:2 * numel], v)):
            for view, leaf in zip(self.spec.views(block).values(), leaves, strict=True):
                view.copy_(leaf)
        state[:, 2 * numel] = t

    def _step(self, leaves: list[torch.Tensor], grads: list[torch.Tensor],
              bufs: list[torch.Tensor] | None,
              adam: tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor] | None,
              active: torch.Tensor, objective: LocalObjective | None,
              terms: list[Term] | None, all_active: bool | None = None) -> None:
        """One optimizer step of every leaf; ``all_active``: whether every node has a batch
        (known on the host; read from ``active`` when not given)."""
        if objective is not None and objective.frozen:        # frozen leaves keep their values
            keep = [k for k, name in enumerate(self.spec.names) if name not in objective.frozen]
            sub = lambda items: None if items is None else [items[k] for k in keep]  # noqa: E731
            lists = [bufs] if adam is None else [adam[0], adam[1]]
            parts = [sub(x) for x in lists]           # the steps rebind their buffers' items
            if adam is None:
                self._sgd_step(sub(leaves), sub(grads), parts[0], active, objective, sub(terms), all_active)
            else:
                self._adamw_step(sub(leaves), sub(grads), (parts[0], parts[1], adam[2]), active,
                                 objective, sub(terms))
            for whole, part in zip(lists, parts, strict=True):
                if whole is not None:
                    for j, k in enumerate(keep):
                        whole[k] = part[j]
            return
        if adam is None:
            self._sgd_step(leaves, grads, bufs, active, objective, terms, all_active)
        else:
            self._adamw_step(leaves, grads, adam, active, objective, terms)

    def _with_terms(self, leaf: torch.Tensor, grad: torch.Tensor, k: int,
                    objective: LocalObjective | None,
                    terms: list[Term] | None) -> torch.Tensor:
        """Leaf ``k``'s gradient scaled and with the objective's terms added (the step's
        direction before the optimizer's own arithmetic)."""
        if objective is None:
            return grad
        if objective.grad_scale != 1.0:
            grad = grad * objective.grad_scale
        extra = self._extra(leaf, terms[k], objective) if terms else None
        return grad if extra is None else grad + extra

    def _adamw_step(self, leaves: list[torch.Tensor], grads: list[torch.Tensor],
                    adam: tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor],
                    active: torch.Tensor, objective: LocalObjective | None,
                    terms: list[Term] | None) -> None:
        """One masked AdamW step in place (:class:`AdamW`); an objective's terms are added to
        the gradient, as for SGD. Nodes without a batch keep their weights and state."""
        opt = self.optimizer
        assert isinstance(opt, AdamW)
        m, v, t = adam
        t.add_(active.to(t.dtype))
        steps = t.clamp(min=1).double()
        correct1 = (1 - opt.beta1 ** steps).to(t.dtype)                 # [B] bias corrections
        correct2 = (1 - opt.beta2 ** steps).sqrt().to(t.dtype)
        for k, (leaf, grad) in enumerate(zip(leaves, grads, strict=True)):
            shape = (-1, *([1] * (leaf.dim() - 1)))
            mask = active.view(shape)
            grad = self._with_terms(leaf, grad, k, objective, terms)
            new_m = m[k] * opt.beta1 + grad * (1 - opt.beta1)
            new_v = v[k] * opt.beta2 + grad * grad * (1 - opt.beta2)
            step = (new_m / correct1.view(shape)) / (new_v.sqrt() / correct2.view(shape) + opt.eps)
            moved = leaf * (1 - opt.lr * opt.weight_decay) - opt.lr * step
            m[k] = torch.where(mask, new_m, m[k])
            v[k] = torch.where(mask, new_v, v[k])
            leaf.copy_(torch.where(mask, moved, leaf))

    def _sgd_step(self, leaves: list[torch.Tensor], grads: list[torch.Tensor],
                  bufs: list[torch.Tensor] | None, active: torch.Tensor,
                  objective: LocalObjective | None = None,
                  terms: list[Term] | None = None, all_active: bool | None = None) -> None:
        """One masked SGD step in place: nodes without a batch at this step do not move."""
        opt = self.optimizer
        if all_active is None:
            all_active = bool(active.all())
        for k, (leaf, grad) in enumerate(zip(leaves, grads, strict=True)):
            mask = active.view(-1, *([1] * (leaf.dim() - 1)))
            grad = self._with_terms(leaf, grad, k, objective, terms)
            if opt.weight_decay:
                grad = grad + opt.weight_decay * leaf
            if bufs is not None:
                momentum = opt.momentum * bufs[k] + grad
                bufs[k] = momentum if all_active else torch.where(mask, momentum, bufs[k])
                grad = bufs[k]
            if all_active:
                leaf.sub_(grad, alpha=opt.lr)
            else:
                leaf.sub_(torch.where(mask, grad, torch.zeros((), dtype=grad.dtype, device=grad.device)),
                          alpha=opt.lr)

    def _fused_sam_step(self, leaves: list[torch.Tensor], buffers: list[tuple[torch.Tensor, torch.Tensor]],
                        xb: torch.Tensor, yb: torch.Tensor, weight: torch.Tensor, lr: float,
                        decay: torch.Tensor | None) -> torch.Tensor:
        """One SAM step through the fused kernel, which has no gradient tensors: a step of lr 1
        from ``w`` gives ``g = w - (w - g)``; then a step of ``lr`` from ``w + e`` and ``- e``
        give ``w - lr g(w + e)``; weight decay is applied at ``w`` (``decay``: 1 - lr wd, 1 for
        nodes without a batch). Returns the loss at ``w`` ``[B]``."""
        kernel = self.kernel
        assert kernel is not None
        for leaf, (start, _) in zip(leaves, buffers, strict=True):
            start.copy_(leaf)
        loss = kernel.sgd_step(leaves, xb, yb, weight, 1.0, None)
        sq = torch.zeros(len(weight), dtype=weight.dtype, device=weight.device)
        for leaf, (start, step) in zip(leaves, buffers, strict=True):
            torch.sub(start, leaf, out=step)                               # g
            sq += step.flatten(1).square().sum(1)
        scale = (self.optimizer.sam_rho / (sq.sqrt() + 1e-12)).view(-1, 1, 1)
        for leaf, (start, step) in zip(leaves, buffers, strict=True):
            step.mul_(scale)                                               # e
            torch.add(start, step, out=leaf)
        kernel.sgd_step(leaves, xb, yb, weight, lr, None)
        for leaf, (start, step) in zip(leaves, buffers, strict=True):
            leaf.sub_(step)
            if decay is not None:
                leaf.add_(start * (decay - 1).view(-1, 1, 1))
        return loss

    def _gather(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The inputs ``[*idx.shape, ...]`` and labels ``idx.shape`` for sample indices ``idx``,
        gathered into a reused buffer (the fused kernel only reads them)."""
        self._inputs = None                           # its storage is overwritten here
        count = idx.numel()
        row = self.x[0].numel()
        if self._batch is None or self._batch.numel() < count * row:
            self._batch = torch.empty(count * row, dtype=self.x.dtype, device=self.device)
        xb = self._batch[: count * row].view(count, *self.x.shape[1:])
        torch.index_select(self.x, 0, idx.reshape(-1), out=xb)
        return xb.view(*idx.shape, *self.x.shape[1:]), self.y[idx]

    def _gather_all(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Every step's inputs ``[T, B, n, ...]`` and labels ``[T, B, n]`` for the plan ``idx``
        ``[B, T, n]`` in one gather, or None when they would take more than ``INPUTS_BYTES``.
        They are kept: the next call with the same plan (no shuffling, the same nodes: every
        round of full-participation FedAvg) reads them without gathering again."""
        if idx.size * self.x[0].numel() * self.x.element_size() > self.inputs_bytes:
            return None
        key = repr(idx.shape).encode() + idx.tobytes()
        if self._inputs is None or self._inputs[0] != key:
            order = self._index(idx.transpose(1, 0, 2))
            xs, ys = self._gather(order)
            self._inputs = (key, xs, ys)
        return self._inputs[1], self._inputs[2]

    def _workspace(self, params: torch.Tensor, fill: bool = True) -> dict[str, torch.Tensor]:
        """A reused parameter-major buffer for rows ``[B, P]``: one contiguous ``[B, *shape]``
        block per parameter (reuse avoids page faults on every call), filled with the rows
        unless ``fill`` is False (the first step then writes every block)."""
        rows = params.shape[0]
        if (self._buffer is None or self._buffer.numel() < rows * self.spec.numel
                or self._buffer.dtype != params.dtype):
            self._buffer = torch.empty(rows * self.spec.numel, dtype=params.dtype, device=self.device)
        blocks = {}
        broadcast = params.stride(0) == 0                         # every row the same model
        for (name, view), offset in zip(self.spec.views(params).items(), self.spec.offsets, strict=True):
            size = view[0].numel()
            block = self._buffer[rows * offset: rows * (offset + size)].view(view.shape)
            if fill:
                block.copy_(view[:1].expand_as(view) if broadcast else view)
            blocks[name] = block
        return blocks

    def _train_fused(self, params: torch.Tensor, idx: np.ndarray, valid: np.ndarray,
                     inplace: bool, objective: LocalObjective,
                     mean_weights: torch.Tensor | None = None,
                     mean_groups: np.ndarray | None = None) -> TrainResult:
        """The same SGD through the model's fused kernel (hand-written backward, in place).

        An objective's extra terms are evaluated at the pre-step weights, like the gradient,
        and applied after the kernel's data step."""
        kernel, opt = self.kernel, self.optimizer
        assert kernel is not None
        in_rows = self._in_rows(idx.shape[1], mean_weights is not None)
        terms = self._objective_views(objective, kernel) if objective.adds_terms else None
        # rows that all start from one model (a broadcast) are not copied first: the first
        # step reads the shared model (cached, not B copies) and writes its result into the
        # blocks, the same arithmetic as copying, then stepping in place
        shared = not in_rows and params.stride(0) == 0 and idx.shape[1] > 0 and not opt.sam_rho
        # one weighted sum per group, on a CPU (the sharded simulator's 64-id blocks): each of a
        # group's spans (:meth:`_group_spans`) trains in a workspace of its own rows and is
        # summed while they are in the cache
        grouped = (mean_groups is not None and terms is None and not opt.sam_rho
                   and self.device.type == "cpu")
        if in_rows:           # few steps: update views of the output rows, no copy back
            out = params
            if not inplace:
                out = torch.empty_like(params, memory_format=torch.contiguous_format)
                out.copy_(params)
            leaves = kernel.leaves(self.spec.views(out))
        elif not grouped:     # many steps: contiguous blocks make every batched update faster
            leaves = kernel.leaves(self._workspace(params, fill=not shared))
        first = kernel.leaves(self.spec.views(params)) if shared else None   # the first step reads
        idx_t, valid_t = self._index(idx), self._index(valid)
        counts = valid_t.sum(dim=2).to(params.dtype)                  # [B, T]
        loss_sum = torch.zeros(len(idx), device=self.device)
        weights = valid_t.to(params.dtype) / counts.clamp(min=1).unsqueeze(2)   # [B, T, n]
        everyone = valid.any(axis=2).all(axis=0)       # [T] on the host: no device read per step
        gathered = self._gather_all(idx)
        sums = []
        with torch.no_grad():
            if grouped:       # each span trains in a workspace of its own and is summed at once
                for g_lo, g_hi in zip(mean_groups[:-1].tolist(), mean_groups[1:].tolist(), strict=True):
                    total = None
                    for lo, hi in self._group_spans(g_lo, g_hi, params.element_size()):
                        part = slice(lo, hi)
                        mine = kernel.leaves(self._workspace(params[part], fill=not shared))
                        self._fused_steps(mine, None if first is None else [leaf[part] for leaf in first],
                                          part, idx_t, gathered, weights, counts, everyone, loss_sum,
                                          terms, objective, [], params.dtype)
                        piece = self._weighted_sum(mean_weights[part], kernel.params(mine))
                        total = piece if total is None else total.add_(piece)
                    sums.append(total)
            else:
                # a few nodes take all their steps before the next few do (:meth:`_cache_nodes`):
                # their weights stay in the cache between steps; each node's arithmetic is the same
                span = (self._cache_nodes(len(idx), idx.shape[1]) if terms is None and not opt.sam_rho
                        else len(idx))
                sam_buffers = [(torch.empty_like(leaf), torch.empty_like(leaf)) for leaf in leaves] \
                    if opt.sam_rho else []
                for lo in range(0, len(idx), max(span, 1)):
                    part = slice(lo, min(lo + span, len(idx)))
                    mine = [leaf[part] for leaf in leaves]
                    self._fused_steps(mine, None if first is None else [leaf[part] for leaf in first],
                                      part, idx_t, gathered, weights, counts, everyone, loss_sum, terms,
                                      objective, sam_buffers, params.dtype)
        if in_rows:
            return self._result(out, None, valid, loss_sum, True, None)
        if grouped:
            steps = valid.any(axis=2).sum(axis=1)
            loss = loss_sum / self._index(np.maximum(steps, 1)).to(loss_sum.dtype)
            return TrainResult(None, valid.sum(axis=(1, 2)), steps, loss, torch.stack(sums))
        return self._result(params, kernel.params(leaves), valid, loss_sum, inplace, mean_weights, mean_groups)

    def _group_spans(self, lo: int, hi: int, itemsize: int) -> list[tuple[int, int]]:
        """Rows ``lo:hi`` of a mean group in equal spans of at most :data:`CACHE_BYTES` of
        weights each: a span takes all its steps and is summed while it is in the cache, and
        the group's sum adds the spans' in order. Fixed by the group's size and the model only
        (never by the rank count or the threads), so the sharded simulator's block sums keep
        their bits. With 64 clients of MNIST's MLP (13 MB) a rank trained the group in one
        workspace and summed it after: 1.5x on 2 ranks against 1; spans of 16: 1.6-1.8x."""
        cap = max(1, CACHE_BYTES // max(1, self.spec.numel * itemsize))
        pieces = -(-(hi - lo) // cap)
        return [(lo + (hi - lo) * k // pieces, lo + (hi - lo) * (k + 1) // pieces) for k in range(pieces)]

    def _fused_steps(self, mine: list[torch.Tensor], start: list[torch.Tensor] | None, part: slice,
                     idx_t: torch.Tensor, gathered: tuple[torch.Tensor, torch.Tensor] | None,
                     weights: torch.Tensor, counts: torch.Tensor, everyone: np.ndarray,
                     loss_sum: torch.Tensor, terms: list[Term] | None, objective: LocalObjective,
                     sam_buffers: list[tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype) -> None:
        """Every step of the nodes ``part`` of a fused call, in place on their leaves ``mine``
        (``start``: the weights their first step reads, when not ``mine``)."""
        kernel, opt = self.kernel, self.optimizer
        assert kernel is not None
        for t in range(idx_t.shape[1]):
            now = start if t == 0 and start is not None else mine    # the weights before step t
            extras = None
            if terms is not None:
                extras = [self._extra(leaf, term, objective) for leaf, term in zip(now, terms, strict=True)]
            weight = weights[part, t]
            decay = None
            if opt.weight_decay:
                decay = 1 - opt.lr * opt.weight_decay * (counts[part, t] > 0).to(dtype)
            if gathered is not None:
                xb, yb = gathered[0][t, part], gathered[1][t, part]
            else:
                xb, yb = self._gather(idx_t[part, t])
            if opt.sam_rho:
                loss_sum[part] += self._fused_sam_step(mine, sam_buffers, xb, yb, weight,
                                                       opt.lr * objective.grad_scale, decay)
            else:
                loss_sum[part] += kernel.sgd_step(now, xb, yb, weight, opt.lr * objective.grad_scale,
                                                  decay, out=mine if now is not mine else None)
            if extras is not None:
                active = counts[part, t] > 0
                all_active = bool(everyone[t])
                for leaf, extra in zip(mine, extras, strict=True):
                    if extra is None:
                        continue
                    if not all_active:
                        extra.mul_(active.view(-1, *([1] * (extra.dim() - 1))).to(extra.dtype))
                    leaf.sub_(extra, alpha=opt.lr)

    @staticmethod
    def _weighted_sum(weights: torch.Tensor, leaves: list[torch.Tensor | LowRankWeight],
                      part: slice = slice(None)) -> torch.Tensor:
        """``weights @`` the rows of nodes ``part`` that the parameter-major ``leaves`` (module
        order) hold, ``[P]``: one product per leaf, whether the leaves are a group's own
        workspace or its slice of a larger one (a :class:`LowRankWeight` forms its own)."""
        first = leaves[0]
        w = weights.to(first.w0.dtype if isinstance(first, LowRankWeight) else first.dtype)
        return torch.cat([leaf.weighted_sum(w, part) if isinstance(leaf, LowRankWeight)
                          else torch.mm(w.reshape(1, -1), leaf[part].reshape(len(w), -1))[0] for leaf in leaves])
