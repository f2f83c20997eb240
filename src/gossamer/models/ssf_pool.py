"""A pool of SSF adapters on a frozen backbone, chosen per instance (FedIns's model).

Chun-Mei Feng, Kai Yu, Nian Liu, et al., "Towards Instance-adaptive Inference for Federated
Learning", ICCV 2023, arXiv:2308.06051. Every SSF site (the output of each linear or
convolutional layer of the backbone's trunk) holds ``M`` scale/shift vector pairs; there are
``M`` keys and ``M`` linear heads. An instance's query is the frozen trunk's feature (no SSF);
the ``top_k`` keys by cosine similarity select pool entries, whose scales, shifts and heads are
averaged into that instance's SSF and head. Only the pool is a parameter: the backbone is a
plain tensor attribute, shared by every row of the population and never trained or sent.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_TRUNK = (nn.Linear, nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.Flatten)
_SITES = (nn.Linear, nn.Conv2d)


def ssf(h: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """SSF (scale and shift): ``h * scale + shift`` per feature (``h`` ``[R, C]``) or per
    channel (``h`` ``[R, C, H, W]``), with ``scale``, ``shift`` ``[R, C]`` (one pair per row)."""
    if h.dim() == 4:
        scale, shift = scale[:, :, None, None], shift[:, :, None, None]
    return h * scale + shift


def select(query: torch.Tensor, keys: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Instance-wise selection: the cosine similarities ``[B, n, M]`` of queries ``[B, n, D]``
    with keys ``[B, M, D]``, and the averaging weights ``[B, n, M]``: ``1 / top_k`` on each
    instance's ``top_k`` most similar keys, 0 elsewhere (differentiable in neither input:
    gradients reach the keys through the matching loss only)."""
    cos = torch.einsum("bnd,bmd->bnm", F.normalize(query, dim=-1), F.normalize(keys, dim=-1))
    top = cos.detach().topk(top_k, dim=-1).indices
    weights = torch.zeros_like(cos, requires_grad=False).scatter(-1, top, 1.0 / top_k)
    return cos, weights


def trunk_layers(backbone: nn.Module) -> tuple[list[nn.Module], nn.Linear]:
    """The backbone's leaf layers in order, split into the trunk and its last linear layer (the
    head); ValueError (one line) for a backbone that is not such a chain with an SSF site."""
    leaves = [m for m in backbone.modules() if not list(m.children())]
    if not leaves or not isinstance(leaves[-1], nn.Linear):
        raise ValueError("the backbone must end in a linear head (the zoo's mlp or cnn)")
    bad = sorted({type(m).__name__ for m in leaves[:-1] if not isinstance(m, _TRUNK)})
    if bad:
        raise ValueError(f"the backbone has layers {bad}: FedIns runs a chain of Linear, Conv2d, "
                         "ReLU, MaxPool2d and Flatten layers (the zoo's mlp or cnn)")
    if not any(isinstance(m, _SITES) for m in leaves[:-1]):
        raise ValueError("the backbone has no layer before its head to adapt: use an mlp with a "
                         "hidden layer, or the cnn")
    return leaves[:-1], leaves[-1]


class SSFPool(nn.Module):
    """FedIns's model: SSF pools, keys and heads on a frozen ``backbone`` (its trunk; its last
    linear layer seeds every head). ``pool_size`` 1 is plain SSF: no keys, no matching loss.

    Parameters (the flat row, in this order): ``scale{s}``, ``shift{s}`` ``[M, C_s]`` per site
    ``s`` (SSF's init: N(1, 0.02) and N(0, 0.02)), ``keys`` ``[M, D]`` (N(0, 0.02), as the
    authors' code), ``head_weight`` ``[M, K, D]`` and ``head_bias`` ``[M, K]``.
    """

    def __init__(self, backbone: nn.Module, pool_size: int = 25, top_k: int = 3,
                 lam: float = 0.1, seed: int = 0) -> None:
        super().__init__()
        trunk, head = trunk_layers(backbone)
        for layer in trunk:
            layer.requires_grad_(False)
        self.trunk = tuple(trunk)                # a tuple: not registered, so not parameters
        self.pool_size, self.top_k, self.lam = pool_size, min(top_k, pool_size), lam
        self.query_center: torch.Tensor | None = None     # subtracted from every query ([D])
        gen = torch.Generator().manual_seed(seed)
        self.sites = 0
        for layer in trunk:
            if isinstance(layer, _SITES):
                width = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
                scale = 1 + 0.02 * torch.randn(pool_size, width, generator=gen)
                setattr(self, f"scale{self.sites}", nn.Parameter(scale))
                setattr(self, f"shift{self.sites}", nn.Parameter(0.02 * torch.randn(pool_size, width, generator=gen)))
                self.sites += 1
        if pool_size > 1:
            self.keys = nn.Parameter(0.02 * torch.randn(pool_size, head.in_features, generator=gen))
        w, b = head.weight.detach(), head.bias.detach()
        self.head_weight = nn.Parameter(w.expand(pool_size, *w.shape).clone())
        self.head_bias = nn.Parameter(b.expand(pool_size, *b.shape).clone())

    def features(self, params: dict[str, torch.Tensor] | None, x: torch.Tensor,
                 weights: torch.Tensor | None) -> torch.Tensor:
        """The trunk's features ``[B, n, D]`` of inputs ``[B, n, ...]``: with each instance's
        SSF (``weights`` ``[B, n, M]`` over the pool entries), or frozen (``weights`` None)."""
        b, n = x.shape[:2]
        h = x.reshape(b * n, *x.shape[2:])
        site = 0
        for layer in self.trunk:
            if isinstance(layer, nn.Linear) and h.dim() > 2:
                h = h.flatten(1)
            h = layer(h)
            if weights is not None and isinstance(layer, _SITES):
                scale = torch.einsum("bnm,bmc->bnc", weights, params[f"scale{site}"])
                shift = torch.einsum("bnm,bmc->bnc", weights, params[f"shift{site}"])
                h = ssf(h, scale.reshape(b * n, -1), shift.reshape(b * n, -1))
                site += 1
        return h.reshape(b, n, -1)

    def route(self, params: dict[str, torch.Tensor], x: torch.Tensor
              ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Each instance's cosine similarities with the keys ``[B, n, M]`` (None without a
        pool) and its averaging weights ``[B, n, M]``."""
        b, n = x.shape[:2]
        if self.pool_size == 1:
            return None, torch.ones(b, n, 1, dtype=params["head_bias"].dtype, device=params["head_bias"].device)
        with torch.no_grad():
            query = self.features(None, x, None)
            if self.query_center is not None:
                query = query - self.query_center
        return select(query, params["keys"], self.top_k)

    def _logits(self, params: dict[str, torch.Tensor], x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        h = self.features(params, x, weights)
        per_entry = torch.einsum("bnd,bmkd->bnmk", h, params["head_weight"]) + params["head_bias"][:, None]
        return torch.einsum("bnm,bnmk->bnk", weights, per_entry)

    def stacked_forward(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, n, K]`` of pools ``params`` (``[B, ...]`` each) on inputs ``[B, n, ...]``."""
        return self._logits(params, x, self.route(params, x)[1])

    def stacked_loss(self, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Each instance's training loss ``[B, n]``: ``(1 - lam) CE + lam (1 - mean cosine of
        its top_k keys)`` (plain cross-entropy without a pool)."""
        cos, weights = self.route(params, x)
        logits = self._logits(params, x, weights)
        ce = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(weights.shape[:2])
        if cos is None:
            return ce
        return (1 - self.lam) * ce + self.lam * (1 - (weights * cos).sum(-1))

    def center_queries(self, x: torch.Tensor) -> None:
        """Subtract from every query the mean frozen feature of inputs ``x`` ``[n, ...]`` (not in
        the paper: post-ReLU features all lie in one orthant, so raw queries pick the same keys)."""
        with torch.no_grad():
            self.query_center = self.features(None, x[None], None)[0].mean(0)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """The pool, then the frozen backbone (``backbone.<layer>.<name>``; ``model.pt`` holds
        both, so the saved model predicts on its own)."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for i, layer in enumerate(self.trunk):
            for name, p in layer.named_parameters():
                destination[f"{prefix}backbone.{i}.{name}"] = p if keep_vars else p.detach()
        if self.query_center is not None:
            destination[f"{prefix}query_center"] = self.query_center

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        for i, layer in enumerate(self.trunk):
            for name, p in layer.named_parameters():
                key = f"{prefix}backbone.{i}.{name}"
                if key in state_dict:
                    with torch.no_grad():
                        p.copy_(state_dict.pop(key))
                elif strict:
                    missing_keys.append(key)
        if f"{prefix}query_center" in state_dict:
            self.query_center = state_dict.pop(f"{prefix}query_center").clone()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = {name: p.unsqueeze(0) for name, p in self.named_parameters()}
        return self.stacked_forward(params, x.unsqueeze(0))[0]
