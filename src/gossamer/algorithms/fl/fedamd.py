"""FedAMD: anchor sampling for federated learning with partial client participation.

Feijie Wu, Song Guo, Zhihao Qu, et al., "Anchor Sampling for Federated Learning with Partial
Client Participation", ICML 2023, arXiv:2206.05891. The rules below follow the authors'
reference code (HarliWu/FedAMD, ``algo/fedamd.py`` and ``main_fmnist.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from gossamer import rng
from gossamer.algorithms.fl.fedavg import FedAvg, ServerState
from gossamer.algorithms.fl.payload import Payload
from gossamer.algorithms.local import LocalObjective

_ROLE_KEY = 0xA3D


@dataclass(frozen=True)
class FedAMD(FedAvg):
    """Each round's participants split at random into anchors and miners.

    An anchor (probability ``anchor_prob``) computes the gradient of its loss over its whole
    shard at the global model (its "bullseye") and uploads it; the server keeps the latest
    bullseye of every client. The global direction ``v`` is the mean of the bullseyes held
    and is broadcast with the model. A miner takes its local steps along a recursive
    estimate started at ``v``: ``d_0 = v``, ``d_k = d_{k-1} + g(w_k; b_k) - g(w_{k-1}; b_k)``
    (two gradients per step, so its compute counts twice its samples), and uploads its model;
    the server moves by ``server_lr`` times the (weighted) mean miner update, or stays when
    a round has no miner. In round 1 every participant is an anchor, which builds the table
    (the authors' code computes every client's bullseye before training; with full
    participation round 1 is exactly that, at its simulated cost). Roles are a
    counter-based draw of ``(seed, round, client)``, so a real client computes its own role.
    """

    anchor_prob: float = 0.2

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.anchor_prob <= 1:
            raise ValueError("anchor_prob must be in [0, 1]")
        if self.aggregator != "mean" or self.momentum_beta is not None or self.prox_mu:
            raise ValueError("fedamd supports aggregator: mean, without momentum_beta or prox_mu")

    split_roles = True

    download_names = ("direction",)            # the mean of the bullseyes held (Payload)

    def init_state(self, params: torch.Tensor, num_clients: int = 1) -> ServerState:
        state = super().init_state(params, num_clients)
        state.extra["bullseyes"] = torch.zeros(num_clients, params.numel(), dtype=params.dtype)
        state.extra["has_bullseye"] = torch.zeros(num_clients, dtype=torch.bool)
        return state

    def anchors(self, seed: int, round_: int, clients: np.ndarray) -> np.ndarray:
        """Bool per client: is it an anchor this round (every client in round 1)?"""
        clients = np.asarray(clients, dtype=np.int64)
        if round_ <= 1:
            return np.ones(len(clients), dtype=bool)
        return rng.uniform(seed, rng.STREAM_SELECT, _ROLE_KEY, round_, clients) < self.anchor_prob

    def task_samples(self, samples: np.ndarray, sizes: np.ndarray, anchors: np.ndarray) -> np.ndarray:
        """Samples whose gradient a task computes: an anchor's shard; twice a miner's batches."""
        return np.where(anchors, sizes, 2 * samples)

    def broadcast(self, state: ServerState) -> Payload:
        held = state.extra["has_bullseye"]
        direction = state.extra["bullseyes"][held].mean(0) if bool(held.any()) \
            else torch.zeros_like(state.params)
        return Payload(state.params, {"direction": direction})

    def local_objective(self, payload: Payload, client_state: torch.Tensor | None) -> LocalObjective:
        return LocalObjective(recursive_direction=payload["direction"])

    def aggregate(self, state: ServerState, uploads: torch.Tensor, num_samples: np.ndarray,
                  steps: np.ndarray | None = None, lr: float | None = None,
                  clients: np.ndarray | None = None, anchors: np.ndarray | None = None) -> ServerState:
        """``uploads`` rows are bullseyes (anchors) or models (miners) of ``clients``."""
        if clients is None or anchors is None:
            raise ValueError("fedamd needs the clients and their roles to aggregate")
        anchors = np.asarray(anchors, dtype=bool)
        extra = dict(state.extra)
        if anchors.any():
            table, held = extra["bullseyes"].clone(), extra["has_bullseye"].clone()
            ids = torch.from_numpy(np.asarray(clients, dtype=np.int64)[anchors])
            table[ids] = uploads[torch.from_numpy(anchors)]
            held[ids] = True
            extra["bullseyes"], extra["has_bullseye"] = table, held
        miners = ~anchors
        moved = super().aggregate(ServerState(state.params, state.round, extra),
                                  uploads[torch.from_numpy(miners)], np.asarray(num_samples)[miners])
        return moved
