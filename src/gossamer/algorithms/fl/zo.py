"""Zeroth-order FedAvg with shared randomness: clients upload one scalar per perturbation.

Zelikman et al., "Just One Byte (per gradient): A Note on Low-Bandwidth Decentralized Language
Model Finetuning Using Shared Randomness", 2023, arXiv:2306.10015, building on MeZO (Malladi et
al., "Fine-Tuning Language Models with Just Forward Passes", NeurIPS 2023, arXiv:2305.17333)
and SPSA. Each round every selected client ``i`` takes, for each of ``K`` directions
``z_ik ~ N(0, I_P)``, the central difference on one mini-batch ``b_ik`` of its data

    g_ik = (L(x + eps z_ik; b_ik) - L(x - eps z_ik; b_ik)) / (2 eps)

(two forward passes, no backward) and uploads only the ``K`` scalars ``g_ik``, as float32 or
as ``quantize_bits``-bit codes on a scale every party knows. ``z_ik`` is a pure function of
``(seed, round, client, k)`` (``rng.STREAM_ZO``), so the server and every client regenerate
it; the server applies ``x <- x - lr * mean_ik g_ik z_ik`` without ever receiving a direction.
With ``directions: shared`` all clients of a round use ``z_k`` keyed by ``(round, k)``: the
server's update needs only the K per-direction means, which is all it broadcasts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from gossamer import rng, wire
from gossamer.algorithms.base import Algorithm

TAG_DIRECTION = 1       # z: keys (round, client or 0 when shared, k)
TAG_ROUNDING = 2        # stochastic rounding of the codes: keys (round, client, k)
DIRECTION_CHUNK = 1 << 22   # direction values generated at a time


def directions(seed: int, keys: np.ndarray, numel: int, device: torch.device | None = None) -> torch.Tensor:
    """Standard normal rows ``[D, numel]`` (float32), row ``d`` a pure function of ``keys[d]``.

    ``keys`` ``[D, C]`` int64. One splitmix64 hash per pair of coordinates (keyed by the row's
    prefix hash and the pair index) gives two 32-bit uniforms for Box-Muller, so any party
    holding ``(seed, keys[d])`` rebuilds row ``d`` bit for bit, whichever rows it builds with it.
    Drawn on the host (the same bits for every device), then moved to ``device``.
    """
    keys = np.asarray(keys, dtype=np.int64).reshape(len(keys), -1)
    prefix = rng.hash_u64(seed, rng.STREAM_ZO, TAG_DIRECTION, *(keys[:, c] for c in range(keys.shape[1])))
    pair = np.arange((numel + 1) // 2, dtype=np.uint64)
    h = rng.hash_u64(0, 0, prefix[:, None] ^ (pair[None, :] * np.uint64(0x9E3779B97F4A7C15)))
    u1 = torch.from_numpy(((h >> np.uint64(32)).astype(np.float64) + 0.5) * 2.0 ** -32)  # (0, 1)
    u2 = torch.from_numpy((h & np.uint64(0xFFFFFFFF)).astype(np.float64) * 2.0 ** -32)
    radius = torch.sqrt(-2.0 * torch.log(u1))
    angle = u2.mul_(2.0 * np.pi)                  # torch's float64 math: ~3x numpy's here
    z = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)[:, :numel].float()
    return z if device is None else z.to(device)


@dataclass(frozen=True)
class ZOFedAvg(Algorithm):
    """Zeroth-order FedAvg: ``perturbations`` (K) central differences per client per round.

    Each round a ``client_fraction`` of the available clients (at least ``min_clients``) takes
    one zeroth-order step at the global model: K directions, each on its own mini-batch of
    ``local.batch_size`` samples, step size ``local.lr``. ``eps`` is the perturbation radius.
    ``directions``: ``per_client`` (``z`` keyed by ``(round, client, k)``: a round explores
    ``M K`` directions) or ``shared`` (``(round, k)``: K directions, all clients estimate the
    same derivatives on their own data). ``quantize_bits`` (8 or 16; None = float32) sends each
    scalar as a signed code ``clip(round(g / quantize_scale))`` with unbiased stochastic
    rounding, ``quantize_scale`` fixed in the config so that no scale travels. ``broadcast``:
    ``model`` (each selected client downloads the model) or ``scalars`` (clients replay the
    rounds they missed from the scalars the server relays, or download the model when that
    is smaller).
    """

    family = "fl"
    pattern = "zo_fl"

    perturbations: int = 1
    eps: float = 1e-3
    client_fraction: float = 1.0
    min_clients: int = 1
    directions: Literal["per_client", "shared"] = "per_client"
    quantize_bits: Literal[8, 16] | None = None
    quantize_scale: float = 0.01
    broadcast: Literal["model", "scalars"] = "model"

    def __post_init__(self) -> None:
        if self.perturbations < 1:
            raise ValueError("perturbations must be >= 1")
        if not self.eps > 0:
            raise ValueError("eps must be > 0")
        if not 0 < self.client_fraction <= 1:
            raise ValueError("client_fraction must be in (0, 1]")
        if self.min_clients < 1:
            raise ValueError("min_clients must be >= 1")
        if not self.quantize_scale > 0:
            raise ValueError("quantize_scale must be > 0")

    # --- selection ---------------------------------------------------------------------------
    def select(self, candidates: np.ndarray, generator: np.random.Generator) -> np.ndarray:
        """``max(min_clients, round(fraction * |candidates|))`` clients, sorted by id."""
        k = max(self.min_clients, int(round(self.client_fraction * len(candidates))))
        if k >= len(candidates):
            return np.sort(candidates)
        return np.sort(generator.choice(candidates, size=k, replace=False))

    # --- the clients' side -------------------------------------------------------------------
    def direction_keys(self, round: int, clients: np.ndarray) -> np.ndarray:
        """Keys ``[M * K, 3]`` of the directions ``(round, client or 0, k)``, client-major."""
        clients = np.asarray(clients, dtype=np.int64)
        owner = clients if self.directions == "per_client" else np.zeros_like(clients)
        k = np.arange(self.perturbations, dtype=np.int64)
        return np.stack([np.full(len(clients) * len(k), round, dtype=np.int64),
                         np.repeat(owner, len(k)), np.tile(k, len(clients))], axis=1)

    def perturbed(self, params: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Rows ``[2D, P]``: ``x + eps z_d`` for every direction, then ``x - eps z_d``."""
        step = z * self.eps
        return torch.cat([params + step, params - step])

    def projected_gradients(self, losses: torch.Tensor) -> torch.Tensor:
        """``(L+ - L-) / (2 eps)`` ``[D]`` from the losses ``[2D]`` of :meth:`perturbed`'s rows."""
        plus, minus = losses.double().chunk(2)
        return ((plus - minus) / (2 * self.eps)).float()

    def encode(self, g: torch.Tensor, seed: int, round: int, clients: np.ndarray) -> torch.Tensor:
        """What client ``i`` sends: ``g`` ``[M, K]`` as float32, or as int codes with stochastic
        rounding keyed by ``(round, client, k)`` (so a lone client produces the same codes)."""
        if self.quantize_bits is None:
            return g.float()
        top = 2 ** (self.quantize_bits - 1) - 1
        keys = self.direction_keys(round, clients)
        keys[:, 1] = np.repeat(np.asarray(clients, dtype=np.int64), self.perturbations)
        u = rng.uniform(seed, rng.STREAM_ZO, TAG_ROUNDING, keys[:, 0], keys[:, 1], keys[:, 2])
        scaled = g.double() / self.quantize_scale + torch.from_numpy(u).to(g.device).view_as(g)
        return scaled.floor().clamp(-top, top).to(torch.int16)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """The scalars ``[M, K]`` the server (and every client) uses."""
        if self.quantize_bits is None:
            return codes.float()
        return (codes.double() * self.quantize_scale).float()

    # --- bytes -------------------------------------------------------------------------------
    @property
    def scalar_bytes(self) -> int:
        return 4 if self.quantize_bits is None else self.quantize_bits // 8

    def upload_bytes(self) -> int:
        """One client's upload: the wire header plus K scalars."""
        return wire.HEADER_BYTES + self.perturbations * self.scalar_bytes

    def record_bytes(self, contributors: int) -> int:
        """The server's relay of one round (``broadcast: scalars``): header plus, per direction
        key, what rebuilds the update: ``shared``: K float32 means; ``per_client``: each
        contributor's id (int32) and its K scalars."""
        if self.directions == "shared":
            return wire.HEADER_BYTES + 4 * self.perturbations
        return wire.HEADER_BYTES + contributors * (4 + self.perturbations * self.scalar_bytes)

    # --- the server's side -------------------------------------------------------------------
    def server_update(self, params: torch.Tensor, scalars: torch.Tensor, clients: np.ndarray,
                      round: int, seed: int, lr: float) -> torch.Tensor:
        """``x - lr * mean_ik g_ik z_ik`` with ``z`` regenerated from the seeds; ``scalars``
        ``[M, K]`` from ``clients`` ``[M]``. Every client holding ``x`` computes the same."""
        if len(clients) == 0:
            return params
        numel = params.shape[0]
        if self.directions == "shared":
            keys = self.direction_keys(round, np.asarray(clients[:1]))
            weights = scalars.double().mean(0)                                 # [K]
        else:
            keys = self.direction_keys(round, clients)
            weights = scalars.double().reshape(-1) / len(clients)              # [M K]
        weights = (weights / self.perturbations).float()
        step = torch.zeros(numel, dtype=torch.float32, device=params.device)
        weights = weights.to(params.device)
        chunk = max(1, DIRECTION_CHUNK // max(1, numel))
        for s in range(0, len(keys), chunk):      # bounded memory: ~2**22 values at a time
            step.addmv_(directions(seed, keys[s:s + chunk], numel, params.device).T, weights[s:s + chunk])
        return params - lr * step.to(params.dtype)


__all__ = ["ZOFedAvg", "directions"]
