"""A pure-PyTorch GCN over dense client subgraphs, and the masked layers of FED-PUB.

A graph sample is one whole (sub)graph packed as ``[M, M + F]``: its symmetric-normalized
adjacency ``D^-1/2 (A + I) D^-1/2`` (``[M, M]``, padding rows and columns zero) followed by its
node features (``[M, F]``). The model reads ``M`` from the input, so one model runs on every
client's padded subgraph and on FED-PUB's proxy graph alike, and returns one logit row per
graph node (``[..., M, C]``); the trainer's loss keeps the labelled nodes (label ``-1`` marks
the others). GCN: Thomas Kipf, Max Welling, "Semi-Supervised Classification with Graph
Convolutional Networks", ICLR 2017, arXiv:1609.02907.

Masked layers (``masked: true``) multiply every weight matrix elementwise by a learnable
``mask`` (same shape, initialised to 1; entries with ``|m| < prune`` count as 0), as FED-PUB's
clients do (Jinheon Baek, Wonyong Jeong, Jiongdao Jin, et al., "Personalized Subgraph
Federated Learning", ICML 2023, arXiv:2206.10206). Masked models also give FED-PUB's
functional embedding (:meth:`stacked_embedding`) on a fixed proxy input (:meth:`proxy_input`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gossamer import checks
from gossamer.models.zoo import MODELS, mlp_widths


def normalized_adjacency(adj: np.ndarray) -> np.ndarray:
    """``D^-1/2 (A + I) D^-1/2`` of a symmetric 0/1 adjacency ``[n, n]`` (GCN's propagation)."""
    a = adj.astype(np.float64) + np.eye(len(adj))
    scale = 1.0 / np.sqrt(a.sum(1))
    return (a * scale[:, None] * scale[None, :]).astype(np.float32)


def pack_graph(adj_norm: np.ndarray, features: np.ndarray, width: int) -> np.ndarray:
    """One graph sample ``[width, width + F]``: the normalized adjacency and the features,
    zero-padded from ``n`` to ``width`` nodes."""
    n, f = features.shape
    out = np.zeros((width, width + f), dtype=np.float32)
    out[:n, :n] = adj_norm
    out[:n, width:] = features
    return out


def proxy_graph(num_features: int, seed: int, graphs: int = 5, nodes: int = 100,
                p_in: float = 0.1) -> torch.Tensor:
    """FED-PUB's proxy input ``[1, graphs * nodes, graphs * nodes + F]``: ``graphs`` random
    graphs of ``nodes`` nodes, edges with probability ``p_in`` inside each and none between
    (the authors' ``random_partition_graph``), features drawn from N(0, 1)."""
    rng = np.random.default_rng([seed, 19, 1])
    n = graphs * nodes
    block = np.arange(n) // nodes
    upper = np.triu((rng.random((n, n)) < p_in) & (block[:, None] == block[None, :]), k=1)
    adj = upper | upper.T
    features = rng.standard_normal((n, num_features)).astype(np.float32)
    return torch.from_numpy(pack_graph(normalized_adjacency(adj), features, n))[None]


def _weight(params: dict[str, torch.Tensor], name: str, prune: float | None) -> torch.Tensor:
    """Layer ``name``'s weight ``[B, out, in]``, times its pruned mask when it has one."""
    w = params[f"{name}.weight"]
    if prune is None:
        return w
    m = params[f"{name}.mask"]
    return w * torch.where(m.abs() < prune, torch.zeros((), dtype=m.dtype, device=m.device), m)


def _linear(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``h W^T + b`` with a node axis: ``h`` ``[B, ..., in]``, ``w`` ``[B, out, in]``."""
    wt = w.transpose(1, 2).reshape(w.shape[0], *([1] * (h.dim() - 3)), w.shape[2], w.shape[1])
    return h @ wt + b.reshape(b.shape[0], *([1] * (h.dim() - 2)), b.shape[1])


class _Layer(nn.Module):
    """``weight`` ``[out, in]`` and ``bias`` ``[out]`` (``nn.Linear``'s default init, or glorot
    weights and zero bias for a graph convolution, as PyG's ``GCNConv``), plus a ``mask`` of ones
    when masked."""

    def __init__(self, d_in: int, d_out: int, masked: bool, glorot: bool) -> None:
        super().__init__()
        linear = nn.Linear(d_in, d_out)
        if glorot:
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)
        self.weight = nn.Parameter(linear.weight.detach().clone())
        self.bias = nn.Parameter(linear.bias.detach().clone())
        if masked:
            self.mask = nn.Parameter(torch.ones(d_out, d_in))


class GCN(nn.Module):
    """Two graph convolutions (ReLU after each) and a linear classifier on each node:
    ``H1 = relu(Â X W1^T + b1)``, ``H2 = Â H1 W2^T + b2`` (the embedding), logits
    ``relu(H2) W3^T + b3``. ``input_shape`` is ``(M, M + F)`` (see the module docstring)."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, hidden: int = 128,
                 masked: bool = False, prune: float = 1e-3) -> None:
        super().__init__()
        if len(input_shape) != 2 or input_shape[1] <= input_shape[0]:
            raise ValueError(f"model gcn needs graph samples [M, M + F] (dataset sbm), got "
                             f"input shape {tuple(input_shape)}")
        self.features = input_shape[1] - input_shape[0]
        self.prune = prune if masked else None
        self.conv1 = _Layer(self.features, hidden, masked, glorot=True)
        self.conv2 = _Layer(hidden, hidden, masked, glorot=True)
        self.clsif = _Layer(hidden, num_classes, masked, glorot=False)

    def _embed(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        m = x.shape[-2]
        adj, h = x[..., :m], x[..., m:]
        h = torch.relu(_linear(adj @ h, _weight(params, "conv1", self.prune), params["conv1.bias"]))
        return _linear(adj @ h, _weight(params, "conv2", self.prune), params["conv2.bias"])

    def stacked_forward(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, n, M, C]`` for stacked parameters and inputs ``[B, n, M, M + F]``."""
        h = torch.relu(self._embed(params, x))
        return _linear(h, _weight(params, "clsif", self.prune), params["clsif.bias"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = {k: v.unsqueeze(0) for k, v in self.named_parameters()}
        return self.stacked_forward(params, x.unsqueeze(0))[0]

    def stacked_embedding(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """FED-PUB's functional embedding ``[B, hidden]``: the last graph convolution's output
        (before its ReLU) averaged over the nodes of the inputs ``[B, n, M, M + F]``."""
        return self._embed(params, x).mean(dim=(1, 2))

    def proxy_input(self, seed: int) -> torch.Tensor:
        """FED-PUB's proxy graph for this model's features ``[1, 500, 500 + F]``."""
        return proxy_graph(self.features, seed)


class MaskedMLP(nn.Module):
    """An MLP (ReLU between layers, ``nn.Linear``'s init) whose weights are multiplied by
    learnable masks, for FED-PUB on non-graph data; its embedding is the last hidden layer's
    output (before its ReLU) averaged over the inputs."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...],
                 prune: float = 1e-3) -> None:
        super().__init__()
        widths = [math.prod(input_shape), *hidden, num_classes]
        self.input_shape, self.prune = tuple(input_shape), prune
        self.layers = nn.ModuleList(_Layer(a, b, True, glorot=False)
                                    for a, b in zip(widths[:-1], widths[1:], strict=True))

    def _hidden(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        h = x.reshape(x.shape[0], x.shape[1], -1)
        for i in range(len(self.layers) - 1):
            if i:
                h = torch.relu(h)
            h = _linear(h, _weight(params, f"layers.{i}", self.prune), params[f"layers.{i}.bias"])
        return h

    def stacked_forward(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        last = len(self.layers) - 1
        h = self._hidden(params, x)
        h = torch.relu(h) if last else h
        return _linear(h, _weight(params, f"layers.{last}", self.prune), params[f"layers.{last}.bias"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = {k: v.unsqueeze(0) for k, v in self.named_parameters()}
        return self.stacked_forward(params, x.unsqueeze(0))[0]

    def stacked_embedding(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The last hidden layer's output averaged over the inputs ``[B, n, ...]``: ``[B, H]``."""
        return self._hidden(params, x).mean(dim=1)

    def proxy_input(self, seed: int) -> torch.Tensor:
        """100 inputs drawn from N(0, 1), fixed by ``seed``."""
        g = torch.Generator().manual_seed(int(np.random.default_rng([seed, 19, 2]).integers(2**62)))
        return torch.randn(100, *self.input_shape, generator=g)


@MODELS.register("gcn")
def gcn(input_shape: tuple[int, ...], num_classes: int, hidden: int = 128, masked: bool = False,
        prune: float = 1e-3) -> nn.Module:
    checks.as_int("hidden", hidden, lo=1)
    if not isinstance(masked, bool):
        raise ValueError(f"masked must be true or false, got {masked!r}")
    return GCN(input_shape, num_classes, hidden, masked, float(prune))


@MODELS.register("masked_mlp")
def masked_mlp(input_shape: tuple[int, ...], num_classes: int,
               hidden: list[int] | tuple[int, ...] = (64,), prune: float = 1e-3) -> nn.Module:
    """The ``mlp`` with FED-PUB's masks on every weight matrix."""
    widths = mlp_widths(input_shape, num_classes, hidden)
    return MaskedMLP(input_shape, num_classes, tuple(widths[1:-1]), float(prune))


def graph_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over each graph sample's labelled nodes: ``logits`` ``[..., M, C]``,
    ``labels`` ``[..., M]`` (``-1``: not labelled); returns ``labels.shape[:-1]``."""
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                         reduction="none", ignore_index=-1).view_as(labels)
    return ce.sum(-1) / (labels >= 0).sum(-1).clamp(min=1)
