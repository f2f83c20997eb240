"""FedIns: FedAvg of a pool of SSF adapters on a frozen pre-trained backbone, chosen per instance.

Chun-Mei Feng, Kai Yu, Nian Liu, et al., "Towards Instance-adaptive Inference for Federated
Learning", ICCV 2023, arXiv:2308.06051 (code: chunmeifeng/FedIns). The model is
:class:`gossamer.models.ssf_pool.SSFPool` on the run's pre-trained model (``model.pretrain``
on the public rows ``partition.public_fraction``): its flat row is the pool alone (SSF scales
and shifts per site, keys, heads), so clients train, upload and the server averages only the
pool, and bytes count only the pool. The adaptivity is per instance, not per client: every
client predicts with the one global pool.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from gossamer.algorithms.fl.fedavg import FedAvg
from gossamer.models.ssf_pool import SSFPool


@dataclass(frozen=True)
class FedIns(FedAvg):
    """FedAvg of SSF pools: ``pool_size`` entries (``M``; 1 is plain SSF without keys), each
    instance averaging its ``top_k`` entries by key similarity; the local loss is ``(1 - lam)
    CE + lam (1 - mean matched cosine)``. ``center_queries`` (not in the paper) subtracts the
    public rows' mean feature from every query before matching. The server averages the pools with uniform client
    weights, as the authors' code (``weighting: samples`` weights them by sample counts)."""

    wraps_model: ClassVar[bool] = True      # the experiment hands its model to wrap_model
    pool_size: int = 25
    top_k: int = 3
    lam: float = 0.1
    center_queries: bool = False
    weighting: Literal["samples", "uniform"] = "uniform"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pool_size < 1:
            raise ValueError("pool_size must be >= 1")
        if not 1 <= self.top_k <= self.pool_size:
            raise ValueError(f"top_k must be in [1, pool_size = {self.pool_size}]")
        if not 0 <= self.lam < 1:
            raise ValueError("lam must be in [0, 1)")

    def wrap_model(self, backbone: nn.Module, seed: int, public: torch.Tensor | None = None) -> SSFPool:
        """The pool on ``backbone`` (frozen from here on), initialized from ``seed``; with
        ``center_queries`` the queries are centred on the mean feature of ``public`` (the
        public rows' inputs)."""
        model = SSFPool(backbone, self.pool_size, self.top_k, self.lam, seed)
        if self.center_queries and public is not None:
            model.center_queries(public)
        return model
