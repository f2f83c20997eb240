"""A stacked forward built layer by layer, for models ``torch.func.vmap`` runs slowly.

``vmap`` turns every per-node layer into one batched kernel; for convolutions that is one
grouped convolution over ``[n, B * C, H, W]``, and pooling and activations then run in that
layout too. This executor traces the model once (``torch.fx``) and runs it with the node axis
folded into the batch (``[B * n, ...]``) for every operation that treats samples
independently (activations, pooling, flattening, sums of branches), unfolding only for the
layers that hold per-node parameters: linear (one batched GEMM), 2-d convolution (grouped,
in channels-last or the default layout, or one convolution per node: the fastest measured at
start-up once per machine and layer shape and kept in :func:`cache_path`, so the same config
runs the same kernels next time; or as pinned by ``model.conv``), GroupNorm and LayerNorm
(normalize folded, then each node's affine), BatchNorm (each node's statistics over its own
valid samples, each node's running statistics; :func:`_batch_norm`), and embeddings. A model whose graph uses anything else (an operation
that could mix samples, control flow fx cannot trace) is not run this way:
:func:`layerwise_forward` returns None and the caller keeps ``vmap``.
"""

from __future__ import annotations

import json
import math
import operator
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from gossamer.models.pooling import function_window, module_window, window_max

CONV_STRATEGIES = ("grouped", "channels_last", "per_node")
PROBE = "probe2"        # the timing's version in the cache key: a choice timed another way is timed again
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)   # run with per-node statistics

# modules without parameters that act on each sample alone: run on the folded batch
_SAMPLEWISE_MODULES = (nn.ReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.LeakyReLU, nn.ELU,
                       nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Identity,
                       nn.Dropout)
_SAMPLEWISE_FUNCTIONS = {operator.add, operator.mul, operator.sub, operator.truediv,
                         torch.add, torch.mul, torch.relu, torch.tanh, torch.sigmoid, F.relu,
                         F.gelu, F.silu, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
                         F.dropout}
_SAMPLEWISE_METHODS = {"relu", "sigmoid", "tanh", "add", "mul", "sub"}
# of those, the ones that act on each channel plane of each sample alone and draw nothing at
# random: they run on a grouped convolution's output in its layout (LayerwiseForward)
_LAYOUT_FREE_MODULES = (nn.ReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.LeakyReLU, nn.ELU,
                        nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Identity)
_LAYOUT_FREE_FUNCTIONS = {torch.relu, torch.tanh, torch.sigmoid, F.relu, F.gelu, F.silu,
                          F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d}
_LAYOUT_FREE_METHODS = {"relu", "sigmoid", "tanh"}


def _window(node: torch.fx.Node, modules: dict[str, nn.Module]) -> int | None:
    """The window of a max pooling :func:`window_max` runs (non-overlapping, no padding), else None."""
    if node.op == "call_module":
        return module_window(modules[node.target])
    if node.op == "call_function" and node.target is F.max_pool2d:
        return function_window(node.args, node.kwargs)
    return None


def _first_only(node: torch.fx.Node) -> bool:
    """Whether ``node``'s first argument is its only tensor."""
    return not any(isinstance(a, torch.fx.Node) for a in (*node.args[1:], *node.kwargs.values()))


def _is_relu(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    """A plain ReLU of its first argument (and nothing else a tensor), not in place (an
    in-place ReLU changes its input for that input's other readers: it runs as written)."""
    if not _first_only(node):
        return False
    if node.kwargs.get("inplace") or (len(node.args) > 1 and node.args[1] is True):
        return False
    if node.op == "call_module":
        return type(modules[node.target]) is nn.ReLU and not modules[node.target].inplace
    return ((node.op == "call_function" and node.target in (torch.relu, F.relu))
            or (node.op == "call_method" and node.target == "relu"))


def _flatten_ok(node: torch.fx.Node) -> bool:
    """``torch.flatten`` / ``x.flatten``: only from dimension 1 on (keeps the batch axis)."""
    start = node.kwargs.get("start_dim", node.args[1] if len(node.args) > 1 else 0)
    return isinstance(start, int) and start >= 1


_REDUCTION_METHODS = {"mean", "sum", "amax", "amin"}               # and as functions:
_REDUCTION_FUNCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin}   # (not builtins.sum)


def _reduction_ok(node: torch.fx.Node) -> bool:
    """``x.mean(dim=...)`` and the like over given dimensions, none of them the batch axis
    (negative ones resolved with the input's rank from shape propagation)."""
    dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    meta = getattr(node.args[0], "meta", {}).get("tensor_meta") if node.args else None
    if dims is None or meta is None:
        return False                                     # a reduction over everything mixes samples
    rank = len(meta.shape)
    dims = (dims,) if isinstance(dims, int) else dims
    return all(isinstance(d, int) and d % rank != 0 for d in dims)


def _call_ok(node: torch.fx.Node, flatten: object, samplewise: set, reductions: set) -> bool:
    """A function or method call (``node.target``: the function, or the method's name) that
    runs on the folded batch as it is: flattening from dimension 1, a sample-wise operation,
    or a reduction over given non-batch axes."""
    target = node.target
    return ((target == flatten and _flatten_ok(node)) or target in samplewise
            or (target in reductions and _reduction_ok(node)))


def _supported(gm: torch.fx.GraphModule) -> str | None:
    """None if every node can run folded or per node; else what cannot."""
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if node.op == "call_module":
            mod = modules[node.target]
            if isinstance(mod, nn.Embedding) and (mod.padding_idx is not None or mod.max_norm is not None
                                                  or mod.sparse or mod.scale_grad_by_freq):
                return f"embedding {node.target} with padding_idx/max_norm/sparse/scale_grad_by_freq"
            if isinstance(mod, (nn.Linear, nn.GroupNorm, nn.LayerNorm, nn.Embedding, *BATCH_NORMS)):
                continue
            if isinstance(mod, nn.Conv2d):
                if mod.padding_mode != "zeros":
                    return f"conv {node.target} pads with {mod.padding_mode}"
                continue
            if isinstance(mod, _SAMPLEWISE_MODULES):
                if isinstance(mod, nn.Flatten) and mod.start_dim < 1:
                    return f"{node.target} flattens the batch axis"
                continue
            return f"module {node.target} ({type(mod).__name__})"
        if node.op == "call_function":
            if _call_ok(node, torch.flatten, _SAMPLEWISE_FUNCTIONS, _REDUCTION_FUNCTIONS):
                continue
            return f"function {getattr(node.target, '__name__', node.target)}"
        if node.op == "call_method":
            if _call_ok(node, "flatten", _SAMPLEWISE_METHODS, _REDUCTION_METHODS):
                continue
            return f"method {node.target}"
        return f"{node.op} {node.target}"
    return None


# --- per-node parametric layers on folded activations [B * n, ...] ---------------------------
class LowRankWeight:
    """A dense layer's weights for ``B`` nodes that all started from ``w0`` ``[out, in]`` and
    have taken plain SGD steps since: node ``i``'s weight is ``alpha[i] w0 + d[i]^T a[i]``, where
    the rows of ``a[i]`` are the layer's inputs at node ``i``'s past steps and those of ``d[i]``
    the output gradients times ``-lr`` (each step's weight gradient is ``delta^T x``, so its
    rank is at most the step's rows). ``rows``: how many of ``a``'s and ``d``'s rows are filled.
    ``alpha`` is None (all ones) until a step shrinks the weight: weight decay ``wd`` and a
    proximal term ``mu (w - w0)`` toward the start (FedProx) make a step
    ``w <- (1 - lr (mu + wd)) w + lr mu w0 - lr g``, which scales the past rows and ``alpha``.

    Its forward, ``x w0^T + (x a[i]^T) d[i]``, reads ``w0`` once for every node, and no step
    reads or writes a per-node ``[out, in]`` weight or gradient; :meth:`record` takes a step
    from the gradient of ``out`` (the layer's output, kept by the forward) and ``inputs``, and
    :meth:`weights` forms each node's weight at the end (the trainer's low-rank dense path)."""

    def __init__(self, w0: torch.Tensor, nodes: int, capacity: int) -> None:
        out_features, in_features = w0.shape
        self.w0, self.rows = w0, 0
        self.a = w0.new_empty(nodes, capacity, in_features)
        self.d = w0.new_empty(nodes, capacity, out_features)
        self.out: torch.Tensor | None = None         # this step's output [B, rows, out]
        self.inputs: torch.Tensor | None = None      # and input [B, rows, in]
        self.alpha: torch.Tensor | None = None       # [B] w0's coefficient, once not 1

    def forward(self, h: torch.Tensor, b: torch.Tensor | None, nodes: int) -> torch.Tensor:
        rest, width = h.shape[1:-1], h.shape[-1]
        x = h.reshape(nodes, -1, width)                                       # [B, rows, in]
        # one product over every node's rows with the shared w0 (its backward, too): w0 is
        # packed once per call, not once per node as a batched product did (half its time at
        # 10 rows a node). Each row's bits equal the batched product's, and do not depend on
        # the call's other nodes (tests/training/test_low_rank.py); no BLAS promises either:
        # at 2 threads a call of one node's rows rounds differently, as it did batched
        z = torch.mm(h.reshape(-1, width), self.w0.T).view(nodes, -1, self.w0.shape[0])
        if self.alpha is not None:
            z = z * self.alpha.view(-1, 1, 1)
        if self.rows:
            z = z + torch.bmm(torch.bmm(x, self.a[:, : self.rows].transpose(1, 2)), self.d[:, : self.rows])
        if b is not None:
            z = z + b.unsqueeze(1)
        self.out, self.inputs = z, x.detach()
        return z.reshape(-1, *rest, z.shape[-1])

    def record(self, grad: torch.Tensor, lr: float, shrink: float = 1.0, pull: float = 0.0,
               active: torch.Tensor | None = None) -> None:
        """One SGD step: ``grad``, the loss's gradient at :attr:`out`; with ``shrink`` (``1 -
        lr (mu + wd)``) and ``pull`` (``lr mu``) the step also moves the weight as weight decay
        and a proximal term toward ``w0`` do, on the ``active`` nodes (``[B]`` bools; a node
        without a batch does not step: its ``grad`` is zero and it keeps its weight)."""
        assert self.inputs is not None
        if shrink != 1.0 or pull:
            nodes = self.a.shape[0]
            on = torch.ones(nodes, dtype=torch.bool, device=grad.device) if active is None else active
            one = torch.ones((), dtype=grad.dtype, device=grad.device)
            alpha = torch.ones(nodes, dtype=grad.dtype, device=grad.device) if self.alpha is None else self.alpha
            self.alpha = torch.where(on, alpha * shrink + pull, alpha)
            if self.rows:
                self.d[:, : self.rows] *= torch.where(on, one * shrink, one).view(-1, 1, 1)
        end = self.rows + grad.shape[1]
        self.a[:, self.rows:end] = self.inputs
        torch.mul(grad, -lr, out=self.d[:, self.rows:end])
        self.rows, self.out, self.inputs = end, None, None

    def weights(self) -> torch.Tensor:
        """Every node's weight now, ``[B, out, in]``."""
        nodes = self.a.shape[0]
        w0 = self.w0.unsqueeze(0).expand(nodes, -1, -1)
        if self.alpha is not None:
            w0 = w0 * self.alpha.view(-1, 1, 1)
        if not self.rows:
            return w0.clone()
        return torch.baddbmm(w0, self.d[:, : self.rows].transpose(1, 2), self.a[:, : self.rows])

    def weighted_sum(self, weights: torch.Tensor, part: slice = slice(None)) -> torch.Tensor:
        """``sum_i weights[i] * W_i`` over the nodes ``part`` (``weights`` one per node of
        ``part``), flattened ``[out * in]``, without forming any node's weight: ``(sum_i
        weights[i]) w0 + (weights-scaled d)^T a``, one product over every node's rows."""
        w = weights.to(self.w0.dtype)
        total = w.sum() if self.alpha is None else (w * self.alpha[part]).sum()
        if not self.rows:
            return (self.w0 * total).reshape(-1)
        d = self.d[part, : self.rows] * w.view(-1, 1, 1)
        a = self.a[part, : self.rows]
        return torch.addmm(self.w0, d.reshape(-1, d.shape[-1]).T, a.reshape(-1, a.shape[-1]),
                           beta=total).reshape(-1)


class _Dense(torch.autograd.Function):
    """Every node's ``w[i] @ x[i]^T (+ b[i])``, ``[B, out, rows]``, from ``x`` ``[B, rows, in]``,
    ``w`` ``[B, out, in]`` and ``b`` ``[B, out]`` or None. The weight's gradient, ``g @ x``, is
    autograd's; the input's is ``g^T @ w``, where autograd takes ``w^T @ g``, a transposed
    operand the batched product ran 3-6x slower here (LeNet's 400 -> 120 layer for 50 nodes:
    4.1 against 0.66 ms), equal up to rounding."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:  # noqa: D102
        ctx.save_for_backward(x, w)
        ctx.bias = b is not None
        xt = x.transpose(1, 2)
        return torch.bmm(w, xt) if b is None else torch.baddbmm(b.unsqueeze(2), w, xt)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        x, w = ctx.saved_tensors
        gx = torch.bmm(grad.transpose(1, 2), w) if ctx.needs_input_grad[0] else None
        gw = torch.bmm(grad, x) if ctx.needs_input_grad[1] else None
        gb = grad.sum(2) if ctx.bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb


def _linear(h: torch.Tensor, w: torch.Tensor | LowRankWeight, b: torch.Tensor | None,
            nodes: int) -> torch.Tensor:
    """``w @ x^T`` (then transposed): the weight's gradient comes out contiguous, as ``w``
    is; ``x @ w^T`` would give a transposed one, and the SGD update through it was ~10x slower
    (a 512 x 3136 layer). A :class:`LowRankWeight` runs its own forward."""
    if isinstance(w, LowRankWeight):
        return w.forward(h, b, nodes)
    rest = h.shape[1:-1]
    out = _Dense.apply(h.reshape(nodes, -1, h.shape[-1]), w, b)                # [B, out, n * rest]
    return out.transpose(1, 2).reshape(-1, *rest, w.shape[1])


def _to_grouped(h: torch.Tensor, nodes: int) -> torch.Tensor:
    """Folded ``[B * n, C, ...]`` (node-major) to the grouped layout ``[n, B * C, ...]``."""
    n = h.shape[0] // nodes
    return h.reshape(nodes, n, *h.shape[1:]).transpose(0, 1).reshape(n, nodes * h.shape[1], *h.shape[2:])


def _to_folded(g: torch.Tensor, nodes: int) -> torch.Tensor:
    """The grouped layout ``[n, B * C, ...]`` back to folded ``[B * n, C, ...]``."""
    n, c = g.shape[0], g.shape[1] // nodes
    return g.reshape(n, nodes, c, *g.shape[2:]).transpose(0, 1).reshape(nodes * n, c, *g.shape[2:])


def _grouped_conv(g: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, nodes: int,
                  mod: nn.Conv2d, strategy: str) -> torch.Tensor:
    """``mod``'s convolution of every node at once as one grouped convolution, input and
    output in the grouped layout ``[n, B * C, H, W]`` (channels-last with that strategy)."""
    weight = w.reshape(-1, *w.shape[2:])                                               # [B*O, C/g, k, k]
    if strategy == "channels_last":
        g = g.contiguous(memory_format=torch.channels_last)
        weight = weight.contiguous(memory_format=torch.channels_last)
    else:                              # (a channels-last input, from the layer before: as timed)
        g = g.contiguous()
    return F.conv2d(g, weight, None if b is None else b.reshape(-1), groups=nodes * mod.groups,
                    stride=mod.stride, padding=mod.padding, dilation=mod.dilation)


def _conv(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, nodes: int, mod: nn.Conv2d,
          strategy: str) -> torch.Tensor:
    """``mod``'s convolution with node ``i``'s weights ``w[i]`` on node ``i``'s samples,
    folded ``[B * n, C, H, W]`` in and out."""
    if strategy == "per_node":
        n = h.shape[0] // nodes
        x = h.reshape(nodes, n, *h.shape[1:])
        kw = {"stride": mod.stride, "padding": mod.padding, "dilation": mod.dilation}
        out = [F.conv2d(x[i], w[i], None if b is None else b[i], groups=mod.groups, **kw) for i in range(nodes)]
        # (one node, as an evaluation of the global model: its output as it is; stacking it
        # copied the whole activation, ~3% of a FedAvg CNN run)
        return out[0] if nodes == 1 else torch.stack(out).flatten(0, 1)
    return _to_folded(_grouped_conv(_to_grouped(h, nodes), w, b, nodes, mod, strategy), nodes)


def _affine(h: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None, nodes: int,
            channel_dim: bool) -> torch.Tensor:
    """Each node's elementwise affine of a normalization: ``w[i]``/``b[i]`` over its samples'
    channels (GroupNorm: dim 1) or last dimensions (LayerNorm)."""
    x = h.reshape(nodes, -1, *h.shape[1:])                             # [B, n, ...]
    if w is not None:
        shape = (nodes, 1, -1, *([1] * (h.dim() - 2))) if channel_dim else (nodes, *([1] * (x.dim() - w.dim())), *w.shape[1:])
        x = x * w.reshape(shape)
        if b is not None:
            x = x + b.reshape(shape)
    return x.reshape(h.shape)


def _batch_norm(h: torch.Tensor, mod: nn.Module, params: dict[str, torch.Tensor], name: str,
                nodes: int, batch: tuple[torch.Tensor, bool] | None) -> torch.Tensor:
    """BatchNorm with each node's own statistics (Ioffe, Szegedy, ICML 2015).

    Evaluation (``batch`` None): node ``i`` normalizes with its running mean and variance
    ``params[name + ".running_mean"][i]``. Training (``batch = (valid [B, n], update)``):
    with the mean and biased variance of node ``i``'s valid samples alone (padding rows of a
    short batch count for nothing), and with ``update`` its running statistics move by the
    layer's momentum toward them (the unbiased variance), in place, for nodes that have a
    sample; as ``torch.nn.BatchNorm`` does for one model on that node's batch."""
    x = h.reshape(nodes, -1, *h.shape[1:])                             # [B, n, C, *S]
    shape = (nodes, 1, -1, *([1] * (x.dim() - 3)))
    running_mean, running_var = params[f"{name}.running_mean"], params[f"{name}.running_var"]
    if batch is None:         # (a variance pushed below 0 by noise or an attack counts as 0)
        mean, var = running_mean, running_var.clamp(min=0)
    else:
        valid, update = batch
        m = valid.to(x.dtype).reshape(nodes, -1, *([1] * (x.dim() - 2)))
        dims = (1, *range(3, x.dim()))
        count = m.sum(1).reshape(nodes) * math.prod(x.shape[3:])      # values per channel [B]
        per = count.clamp(min=1).view(nodes, 1)
        mean = (x * m).sum(dims) / per                                 # [B, C]
        var = ((x - mean.reshape(shape)).square() * m).sum(dims) / per
        if update:
            with torch.no_grad():
                step = (mod.momentum * (count > 0).to(x.dtype)).view(nodes, 1)
                unbiased = var * (count / (count - 1).clamp(min=1)).view(nodes, 1)
                running_mean.mul_(1 - step).add_(step * mean)
                running_var.mul_(1 - step).add_(step * unbiased)
    out = (x - mean.reshape(shape)) * torch.rsqrt(var.reshape(shape) + mod.eps)
    weight, bias = params.get(f"{name}.weight"), params.get(f"{name}.bias")
    if weight is not None:
        out = out * weight.reshape(shape)
    if bias is not None:
        out = out + bias.reshape(shape)
    return out.reshape(h.shape)


def _embedding(idx: torch.Tensor, w: torch.Tensor, nodes: int) -> torch.Tensor:
    """Node ``i``'s rows of ``w[i]`` for its samples' ids: one lookup in the stacked tables."""
    vocab = w.shape[1]
    offsets = (torch.arange(nodes, device=idx.device) * vocab).view(nodes, *([1] * idx.dim()))
    flat = idx.long().reshape(nodes, -1, *idx.shape[1:]) + offsets
    return F.embedding(flat.reshape(-1, *idx.shape[1:]), w.reshape(-1, w.shape[-1]))


class LayerwiseForward:
    """``forward(params {name: [B, *shape]}, x [B, n, ...]) -> [B, n, ...]`` for a traced model;
    ``batch``: training's valid-sample mask and whether to update running statistics (models
    with BatchNorm; :func:`_batch_norm`)."""

    def __init__(self, gm: torch.fx.GraphModule, conv: dict[str, str]) -> None:
        self.gm, self.conv = gm, dict(conv)
        self.modules = dict(gm.named_modules())
        self.nodes = list(gm.graph.nodes)
        # each dense layer's weight: (in, out, rows per sample), from shape propagation; its
        # weight may be given as a LowRankWeight (the trainer's low-rank dense path), unless
        # the layer runs more than once a forward (a LowRankWeight keeps one output a step)
        self.linears: dict[str, tuple[int, int, int]] = {}
        calls = [n.target for n in self.nodes if n.op == "call_module"]
        for node in self.nodes:
            mod = self.modules.get(node.target) if node.op == "call_module" else None
            meta = node.args[0].meta.get("tensor_meta") if isinstance(mod, nn.Linear) else None
            if meta is not None and calls.count(node.target) == 1:
                self.linears[f"{node.target}.weight"] = (mod.in_features, mod.out_features,
                                                         math.prod(meta.shape[1:-1]))
        # 2x2 max poolings run by window_max, each with the ReLU it is the only reader of
        # fused in ({pool: fused}; the fused ReLU passes its input through)
        self.pools: dict[torch.fx.Node, bool] = {}
        self.fused: set[torch.fx.Node] = set()
        for node in self.nodes:
            source = node.args[0] if node.args else None
            if _window(node, self.modules) == 2 and isinstance(source, torch.fx.Node):
                self.pools[node] = _is_relu(source, self.modules) and len(source.users) == 1
                if self.pools[node]:
                    self.fused.add(source)

    def __call__(self, params: dict[str, torch.Tensor], x: torch.Tensor,
                 batch: tuple[torch.Tensor, bool] | None = None) -> torch.Tensor:
        nodes, n = x.shape[0], x.shape[1]
        env: dict[torch.fx.Node, object] = {}

        # values a grouped convolution left in the grouped layout [n, B * C, ...]: the
        # per-channel sample-wise operations after it (activations, pooling) run on them as
        # they are, and anything else gets them folded back first (each element the same
        # value either way, so the same bits; two copies fewer per convolution)
        grouped: set[torch.fx.Node] = set()

        def load(a, keep: torch.fx.Node | None = None):
            def get(node: torch.fx.Node):
                value = env[node]
                if node in grouped and node is not keep:
                    value = env[node] = _to_folded(value, nodes)
                    grouped.discard(node)
                return value
            return torch.fx.node.map_arg(a, get)

        out = None
        for node in self.nodes:
            source = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None
            if node.op == "placeholder":
                env[node] = x.reshape(nodes * n, *x.shape[2:])
            elif self._runs_grouped(node):
                mod, name = self.modules[node.target], node.target
                h = env[source] if source in grouped else _to_grouped(load(source), nodes)
                env[node] = _grouped_conv(h, params[f"{name}.weight"], params.get(f"{name}.bias"), nodes,
                                          mod, self.conv[name])
                grouped.add(node)
            elif source in grouped and self._keeps_layout(node):
                env[node] = self._run(node, params, load(node.args, keep=source), load(node.kwargs), nodes, batch)
                grouped.add(node)
            else:
                env[node] = self._run(node, params, load(node.args), load(node.kwargs), nodes, batch)
            if node.op == "output":
                out = env[node]
        assert isinstance(out, torch.Tensor)
        return out.reshape(nodes, n, *out.shape[1:])

    def _run(self, node: torch.fx.Node, params: dict[str, torch.Tensor], args, kwargs, nodes: int,
             batch: tuple[torch.Tensor, bool] | None):
        if node in self.fused:
            return args[0]
        if node in self.pools:
            return window_max(args[0], 2, relu=self.pools[node])
        if node.op == "call_module":
            return self._module(node, params, args, kwargs, nodes, batch)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.op == "output":
            return args[0]
        raise AssertionError(node.op)

    def _runs_grouped(self, node: torch.fx.Node) -> bool:
        """Whether ``node`` is a convolution run as one grouped convolution (:func:`_grouped_conv`)."""
        return (node.op == "call_module" and isinstance(self.modules[node.target], nn.Conv2d)
                and self.conv.get(node.target, "grouped") != "per_node")

    def _keeps_layout(self, node: torch.fx.Node) -> bool:
        """Whether ``node`` acts on each channel of each sample alone, with nothing but its
        first argument a tensor (so the grouped layout passes through it)."""
        if not _first_only(node):
            return False
        if node.op == "call_module":
            return isinstance(self.modules[node.target], _LAYOUT_FREE_MODULES)
        if node.op == "call_function":
            return node.target in _LAYOUT_FREE_FUNCTIONS
        return node.op == "call_method" and node.target in _LAYOUT_FREE_METHODS

    def _module(self, node: torch.fx.Node, params: dict[str, torch.Tensor], args, kwargs, nodes: int,
                batch: tuple[torch.Tensor, bool] | None = None):
        mod, name = self.modules[node.target], node.target
        weight, bias = params.get(f"{name}.weight"), params.get(f"{name}.bias")
        h = args[0]
        if isinstance(mod, nn.Linear):
            return _linear(h, weight, bias, nodes)
        if isinstance(mod, nn.Conv2d):
            return _conv(h, weight, bias, nodes, mod, self.conv.get(name, "grouped"))
        if isinstance(mod, nn.GroupNorm):
            return _affine(F.group_norm(h, mod.num_groups, None, None, mod.eps), weight, bias, nodes, True)
        if isinstance(mod, nn.LayerNorm):
            return _affine(F.layer_norm(h, mod.normalized_shape, None, None, mod.eps), weight, bias, nodes, False)
        if isinstance(mod, nn.Embedding):
            return _embedding(h, weight, nodes)
        if isinstance(mod, BATCH_NORMS):
            return _batch_norm(h, mod, params, name, nodes, batch)
        return mod(*args, **kwargs)                         # sample-wise, no parameters


CPU = torch.device("cpu")


def _time(fn: Callable[[], object], reps: int = 3, device: torch.device | None = None) -> float:
    sync = torch.cuda.synchronize if device is not None and device.type == "cuda" else (lambda: None)
    fn()
    sync()
    best = math.inf
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync()                                     # a GPU's kernels finish before the clock stops
        best = min(best, time.perf_counter() - start)
    return best


def layerwise_forward(module: nn.Module, sample: torch.Tensor, conv: str = "auto",
                      probe_nodes: int = 16, probe_samples: int = 10,
                      device: torch.device | None = None) -> tuple[LayerwiseForward | None, str]:
    """The layer-by-layer forward of ``module``, or ``(None, why)`` when its graph has an
    operation this executor does not run (the caller then uses ``vmap``). ``conv`` pins every
    convolution's strategy (one of :data:`CONV_STRATEGIES`); ``auto`` times each on a probe of
    ``probe_nodes`` nodes with ``probe_samples`` samples, forward and backward, on ``device``
    (the run's; default the CPU), and keeps the fastest per layer."""
    if conv != "auto" and conv not in CONV_STRATEGIES:
        raise ValueError(f"model.conv must be auto or one of {', '.join(CONV_STRATEGIES)}, got {conv!r}")
    try:
        gm = torch.fx.symbolic_trace(module)
    except Exception as exc:  # noqa: BLE001 - any tracing failure means: not this executor
        return None, f"not traceable by torch.fx ({type(exc).__name__})"
    try:             # ranks of every intermediate (reductions over negative dims need them)
        ShapeProp(gm).propagate(sample.unsqueeze(0).expand(2, *sample.shape).contiguous())
    except Exception as exc:  # noqa: BLE001 - a model that fails on its own sample: leave it to vmap
        return None, f"shape propagation failed ({type(exc).__name__})"
    why = _supported(gm)
    if why is not None:
        return None, why
    modules = dict(gm.named_modules())
    convs = {n.target: n for n in gm.graph.nodes if n.op == "call_module" and isinstance(modules[n.target], nn.Conv2d)}
    forward = LayerwiseForward(gm, {name: "grouped" if conv == "auto" else conv for name in convs})
    if conv == "auto" and convs:
        forward.conv = _fastest_convs(modules, convs, probe_nodes, probe_samples,
                                      CPU if device is None else device)
    return forward, ""


def _fastest_convs(modules: dict[str, nn.Module], convs: dict[str, torch.fx.Node], nodes: int,
                   samples: int, device: torch.device) -> dict[str, str]:
    """Per convolution, the strategy with the fastest forward + backward on an input of its
    shape (known from shape propagation); choices timed before on this machine are reused."""
    cache = _load_cache()
    chosen, timed = {}, False
    for name, node in convs.items():
        mod, shape = modules[name], node.args[0].meta["tensor_meta"].shape
        key = _cache_key(mod, shape, nodes, samples, device)
        if cache.get(key) in CONV_STRATEGIES:
            chosen[name] = cache[key]
            continue
        input_grad = node.args[0].op != "placeholder"           # training needs it past layer one
        chosen[name] = cache[key] = min(CONV_STRATEGIES, key=lambda s, mod=mod, shape=shape: _time_conv(
            mod, shape, nodes, samples, s, input_grad, device))
        timed = True
    if timed:                   # (choices timed by an earlier version of the probe are dropped)
        _save_cache({k: v for k, v in cache.items() if k.startswith(f"{PROBE}|")})
    return chosen


# --- the timed choices, kept per machine: the same config picks the same kernels next time --
def cache_path() -> Path:
    """``$GOSSAMER_CACHE_DIR`` (else ``$XDG_CACHE_HOME/gossamer``, ``~/.cache/gossamer``)
    ``/conv_strategies.json``."""
    root = os.environ.get("GOSSAMER_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "gossamer")
    return Path(root) / "conv_strategies.json"


def _cache_key(mod: nn.Conv2d, shape: torch.Size, nodes: int, samples: int,
               device: torch.device = CPU) -> str:
    """What the timing depends on: how it is timed (:data:`PROBE`), the library, the machine
    (its GPU's name on a GPU), threads, the layer and its input."""
    where = () if device.type == "cpu" else (device.type, torch.cuda.get_device_name(device))
    return "|".join(str(v) for v in (PROBE, *where,
        torch.__version__, platform.machine(), platform.processor(), os.cpu_count(), torch.get_num_threads(),
        tuple(shape[1:]), tuple(mod.weight.shape), mod.stride, mod.padding, mod.dilation, mod.groups,
        mod.bias is not None, nodes, samples))


def _load_cache() -> dict[str, str]:
    try:
        data = json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def _save_cache(cache: dict[str, str]) -> None:
    """Best effort (a read-only home only means timing again next run)."""
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass


def _time_conv(mod: nn.Conv2d, shape: torch.Size, nodes: int, samples: int, strategy: str,
               input_grad: bool, device: torch.device = CPU) -> float:
    """Seconds of one forward + backward of ``mod`` per node with ``strategy`` (best of 3). The
    backward takes a dense gradient of the output's shape and layout, as training gives it (not
    a ``.sum()``'s, one scalar expanded, which kernels read differently)."""
    h = torch.randn(nodes * samples, *shape[1:], device=device, requires_grad=input_grad)
    weight = mod.weight.detach().to(device)
    w = weight.unsqueeze(0).repeat(nodes, *([1] * weight.dim())).requires_grad_(True)
    b = None if mod.bias is None else mod.bias.detach().to(device).unsqueeze(0).repeat(nodes, 1).requires_grad_(True)
    with torch.no_grad():
        grad = torch.randn_like(_conv(h, w, b, nodes, mod, strategy))
    return _time(lambda: _conv(h, w, b, nodes, mod, strategy).backward(grad), device=device)
