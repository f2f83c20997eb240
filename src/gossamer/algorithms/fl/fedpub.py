"""FED-PUB: similarity-weighted personalized aggregation with local masks.

Jinheon Baek, Wonyong Jeong, Jiongdao Jin, et al., "Personalized Subgraph Federated
Learning", ICML 2023, arXiv:2206.10206 (code: JinheonBaek/FED-PUB).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from gossamer.algorithms.fl.adam_state import KeptAdamState
from gossamer.algorithms.fl.personalized import Personalized
from gossamer.algorithms.local import LocalObjective


def mask_parameters(spec) -> tuple[tuple[str, ...], torch.Tensor]:
    """The names of a model's masks (parameters named ``*.mask``) and their entries ``[P]``
    (bool) in the flat vector, from its ``ParamSpec``."""
    names = tuple(n for n in spec.names if n.rsplit(".", 1)[-1] == "mask")
    entries = torch.zeros(spec.numel, dtype=torch.bool, device="cpu")
    for name, shape, offset in zip(spec.names, spec.shapes, spec.offsets, strict=True):
        if name in names:
            entries[offset:offset + math.prod(shape)] = True
    return names, entries


def functional_embeddings(model: torch.nn.Module, spec, proxy: torch.Tensor,
                          models: torch.Tensor) -> torch.Tensor:
    """FED-PUB's functional embeddings ``[K, H]`` of models ``[K, P]``: the model's
    ``stacked_embedding`` on the fixed ``proxy`` input (the simulator's driver and a client
    process compute them the same way)."""
    proxy = proxy.unsqueeze(0).expand(len(models), *proxy.shape)
    with torch.no_grad():
        return model.stacked_embedding(spec.views(models), proxy)


def similarity_weights(embeddings: torch.Tensor, tau: float) -> torch.Tensor:
    """FED-PUB's aggregation weights ``[K, K]`` from the clients' functional embeddings
    ``[K, H]``: ``alpha_ij = exp(tau S_ij) / sum_k exp(tau S_ik)`` with ``S`` the cosine
    similarities (each row sums to 1; identical embeddings get identical weights)."""
    e = torch.nn.functional.normalize(embeddings.double(), dim=1)
    return torch.softmax(tau * (e @ e.T), dim=1)


@dataclass(frozen=True)
class FedPub(KeptAdamState, Personalized):
    """FED-PUB (Baek et al., ICML 2023, arXiv:2206.10206). Each client's model multiplies its
    weight matrices by learnable masks that never leave it (a masked model: ``gcn`` or
    ``masked_mlp`` with masks). A selected client trains from the personalized model the server
    last made for it (its own masks) with an L1 penalty ``l1`` on the masks and a proximal term
    ``loc_l2`` pulling the other parameters towards the received ones, and uploads its model
    with its functional embedding: the model's last hidden layer on a fixed random proxy input
    (a random graph for the GCN), averaged. The server weighs the round's models by
    ``softmax(tau * cosine similarity)`` of the embeddings, row by row, into each client's own
    personalized model (the client keeps its masks), and averages them by size into the global
    model (FedAvg), as the authors' server does."""

    personal_training: ClassVar[bool] = False
    server_personalizes: ClassVar[bool] = True
    uses_embeddings: ClassVar[bool] = True
    runs_on_processes: ClassVar[bool] = True
    tau: float = 10.0
    l1: float = 1e-3
    loc_l2: float = 1e-3
    keep_optimizer_state: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.tau >= 0:
            raise ValueError("tau must be >= 0")
        if not self.l1 >= 0 or not self.loc_l2 >= 0:
            raise ValueError("l1 and loc_l2 must be >= 0")

    # --- the clients' Adam state (keep_optimizer_state) ------------------------------------------
    @property
    def local_optimizer(self) -> str | None:
        return "adamw" if self.keep_optimizer_state else None

    @property
    def keeps_adam_state(self) -> bool:
        return self.keep_optimizer_state

    missing_state = "fedpub with keep_optimizer_state needs the clients' Adam state"

    def personal_init(self, init: torch.Tensor) -> torch.Tensor:
        """Two models per client ``[2P]``: the one it evaluates (its last trained model) and the
        one it trains from next (the server's personalized model with its own masks)."""
        return torch.cat([init, init])

    def train_start(self, personal: torch.Tensor) -> torch.Tensor:
        return personal[:, personal.shape[1] // 2:]

    def personal_model(self, current: torch.Tensor, personal: torch.Tensor,
                       head: torch.Tensor) -> torch.Tensor:
        """A client is judged with its model after its last local training, as the authors
        report it."""
        return personal[:, :personal.shape[1] // 2]

    def start_objective(self, objective: LocalObjective | None, starts: torch.Tensor,
                        names: tuple[str, ...]) -> LocalObjective:
        """The local objective: L1 on the masks, the proximal term towards ``starts`` (the
        received personalized models ``[B, P]``) on everything else."""
        masks = tuple(n for n in names if n.rsplit(".", 1)[-1] == "mask")
        weights = tuple(n for n in names if n not in masks)
        return replace(objective or LocalObjective(), prox_mu=self.loc_l2, anchor=starts,
                       prox_only=weights, l1_mu=self.l1, l1=masks)

    def personalize(self, before: torch.Tensor, after: torch.Tensor, global_model: torch.Tensor,
                    layers: list[tuple[int, int]], round_: int, *, embeddings: torch.Tensor,
                    masks: torch.Tensor, trained: torch.Tensor | None = None) -> torch.Tensor:
        """The round's clients' personal rows ``[K, 2P]``: their trained models (``trained``,
        default ``after``: the uploads as the server holds them) and their next models ``sum_j
        alpha_ij after_j`` from the embeddings ``[K, H]``, each keeping its own mask entries
        (``masks`` ``[P]``) of ``trained``."""
        own = after if trained is None else trained
        alpha = similarity_weights(embeddings, self.tau).to(after.dtype)
        return torch.cat([own, torch.where(masks, own, alpha @ after)], dim=1)
