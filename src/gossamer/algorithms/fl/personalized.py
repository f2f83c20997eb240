"""Personalized FL: every client keeps its own model besides (or instead of) the global one.

The synchronous FL driver holds the personal models of the whole population (``[N, P]``,
checkpointed), trains the selected clients' ones after each round's global training with
:meth:`personal_objective`, and evaluates every client's personal model on its own test rows
(``partition.test_fraction``). Algorithms never see the trainer: they only say what the
personal step is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from gossamer.algorithms.fl.fedavg import FedAvg
from gossamer.algorithms.local import LocalObjective


def head_parameters(spec, layers: int) -> tuple[tuple[str, ...], torch.Tensor]:
    """The parameter names of a model's last ``layers`` layers (modules, by name prefix) and
    their mask ``[P]`` in the flat vector, from its ``ParamSpec``; ValueError (one line) when
    no layer would be left to the shared body."""
    modules = list(dict.fromkeys(name.rsplit(".", 1)[0] for name in spec.names))
    if layers >= len(modules):
        raise ValueError(f"head_layers ({layers}) must leave at least one of the model's "
                         f"{len(modules)} layers to the shared body")
    return layer_entries(spec, set(modules[-layers:]))


def layer_entries(spec, layers: set[str]) -> tuple[tuple[str, ...], torch.Tensor]:
    """The names of the entries of the modules ``layers`` (by name prefix) and their mask
    ``[P]`` in the flat vector."""
    names = tuple(n for n in spec.names if n.rsplit(".", 1)[0] in layers)
    mask = torch.zeros(spec.numel, dtype=torch.bool, device="cpu")
    for name, shape, offset in zip(spec.names, spec.shapes, spec.offsets, strict=True):
        if name in names:
            mask[offset:offset + math.prod(shape)] = True
    return names, mask


@dataclass(frozen=True)
class Personalized(FedAvg):
    """What the driver asks of a personalized algorithm. ``head`` ``[P]`` (bool) marks the
    model's last ``head_layers`` layers, ``names`` are the model's parameter names and
    ``head_names`` the head's; algorithms that do not split the model ignore them."""

    personalized: ClassVar[bool] = True
    personal_training: ClassVar[bool] = True    # personal models take their own local steps
    server_personalizes: ClassVar[bool] = False  # the server sets them after aggregating (FedCAC)
    personal_first: ClassVar[bool] = False      # the personal step before the global training
    personal_epochs: ClassVar[int | None] = None    # its length: None = the local schedule
    # the model a client evaluates needs the current global model (FedRep: its body)
    evaluates_with_global: ClassVar[bool] = False
    # real processes run it (runtime/fl_server.py, fl_client.py): its client holds the
    # personal model, or the server sets it with ``personalize`` (FedCAC)
    runs_on_processes: ClassVar[bool] = False
    uses_embeddings: ClassVar[bool] = False     # the server reads functional embeddings (FED-PUB)
    # the personal entries stay in the client and replace the received ones before training
    # (FedBN's BatchNorm layers)
    local_entries: ClassVar[bool] = False

    def personal_entries(self, spec) -> tuple[tuple[str, ...], torch.Tensor]:
        """The names and mask ``[P]`` of the entries personal to a client: the last
        ``head_layers`` layers (FedRep's head; others ignore it)."""
        return head_parameters(spec, getattr(self, "head_layers", 1))

    def personal_objective(self, received: torch.Tensor, head_names: tuple[str, ...],
                           names: tuple[str, ...]) -> LocalObjective:
        return LocalObjective()

    def personal_start(self, received: torch.Tensor, personal: torch.Tensor,
                       head: torch.Tensor) -> torch.Tensor:
        """The rows ``[B, P]`` the personal step starts from."""
        return personal

    def personal_model(self, current: torch.Tensor, personal: torch.Tensor,
                       head: torch.Tensor) -> torch.Tensor:
        """The model ``[B, P]`` each client evaluates (and predicts with)."""
        return personal

    def global_frozen(self, head_names: tuple[str, ...], names: tuple[str, ...]) -> tuple[str, ...]:
        """Parameters the round's global training leaves alone."""
        return ()

    def personal_init(self, init: torch.Tensor) -> torch.Tensor:
        """A client's first personal row from the initial model ``[P]`` (FED-PUB keeps two
        models per client)."""
        return init

    def train_start(self, personal: torch.Tensor) -> torch.Tensor:
        """The rows ``[B, P]`` clients that train from their own rows start from (FedCAC,
        FED-PUB), from their personal rows."""
        return personal

    def start_objective(self, objective: LocalObjective | None, starts: torch.Tensor,
                        names: tuple[str, ...]) -> LocalObjective | None:
        """The round's local objective when clients train from their own rows ``starts``
        (FedCAC, FED-PUB)."""
        return objective


@dataclass(frozen=True)
class Ditto(Personalized):
    """Ditto (Tian Li, Shengyuan Hu, Ahmad Beirami, et al., "Ditto: Fair and Robust Federated
    Learning Through Personalization", ICML 2021, arXiv:2012.04221): the global model is
    FedAvg's; each selected client also takes local steps on its personal model ``v`` for
    ``F_k(v) + lam / 2 ||v - w||^2``, with ``w`` the global model it received this round (the
    same local schedule as the global update). ``v`` starts at the initial global model and is
    never sent. ``lam = 0`` is local training from the first global model; large ``lam`` keeps
    ``v`` at the global model."""

    runs_on_processes: ClassVar[bool] = True
    lam: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lam < 0:
            raise ValueError("lam must be >= 0")

    def personal_objective(self, received, head_names, names) -> LocalObjective:
        """The personal step's objective: the proximal term towards the received model."""
        return LocalObjective(prox_mu=self.lam, anchor=received) if self.lam else LocalObjective()


@dataclass(frozen=True)
class LocalOnly(Personalized):
    """Local training only: each selected client trains its own model on its own data, from
    the initial model, and nothing is ever sent (the lower baseline of personalized FL). The
    global model stays the initial one."""

    communicates: ClassVar[bool] = False


@dataclass(frozen=True)
class FedRep(Personalized):
    """FedRep (Liam Collins, Hamed Hassani, Aryan Mokhtari, et al., "Exploiting Shared
    Representations for Personalized Federated Learning", ICML 2021, arXiv:2102.07078): the
    model's last ``head_layers`` layers are each client's own head, the rest a shared body.
    A selected client first trains its head for ``head_epochs`` epochs with the received body
    frozen, then the body for the local schedule with its head frozen, and uploads; the server
    averages the bodies (the heads it receives are never used by a client). A client predicts
    with the current global body and its own head."""

    personal_first: ClassVar[bool] = True
    evaluates_with_global: ClassVar[bool] = True
    runs_on_processes: ClassVar[bool] = True
    head_layers: int = 1
    head_epochs: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.head_layers < 1:
            raise ValueError("head_layers must be >= 1")
        if self.head_epochs < 1:
            raise ValueError("head_epochs must be >= 1")

    @property
    def personal_epochs(self) -> int:              # the head's step takes head_epochs epochs
        return self.head_epochs

    def personal_objective(self, received, head_names, names) -> LocalObjective:
        return LocalObjective(frozen=tuple(n for n in names if n not in head_names))

    def personal_start(self, received, personal, head):
        return torch.where(head, personal, received)

    def personal_model(self, current, personal, head):
        return torch.where(head, personal, current)

    def global_frozen(self, head_names, names):
        return tuple(head_names)


@dataclass(frozen=True)
class FedBN(Personalized):
    """FedBN (Xiaoxiao Li, Meirui Jiang, Xiaofei Zhang, Michael Kamp, Qi Dou, "FedBN: Federated
    Learning on Non-IID Features via Local Batch Normalization", ICLR 2021, arXiv:2102.07623;
    the authors' code, ``med-air/FedBN``, averages every state-dict entry but those of
    BatchNorm layers). Each client keeps its BatchNorm layers local (weight, bias and running
    statistics): a selected client trains the received model with its own BatchNorm entries in
    place, keeps them, and uploads; the server averages the uploads as FedAvg does (the
    BatchNorm entries of that average are read by no client that has trained; a client's first
    round starts from them). A client predicts with the current global model and its own
    BatchNorm entries. The model must have BatchNorm layers (e.g. ``resnet8_bn``, ``mlp_bn``)."""

    personal_training: ClassVar[bool] = False
    local_entries: ClassVar[bool] = True
    evaluates_with_global: ClassVar[bool] = True
    runs_on_processes: ClassVar[bool] = True

    def personal_entries(self, spec) -> tuple[tuple[str, ...], torch.Tensor]:
        """Every entry of the model's BatchNorm layers; ValueError (one line) without any."""
        layers = {name.rsplit(".", 1)[0] for name in spec.stats}
        if not layers:
            raise ValueError("fedbn keeps each client's BatchNorm layers local, and the model has "
                             "none: use a model with BatchNorm (resnet8_bn, mlp_bn)")
        return layer_entries(spec, layers)

    def local_start(self, received: torch.Tensor, personal: torch.Tensor,
                    entries: torch.Tensor) -> torch.Tensor:
        """The rows ``[B, P]`` selected clients train from: the received model with their own
        BatchNorm entries."""
        return torch.where(entries, personal, received)

    def personal_model(self, current, personal, head):
        return torch.where(head, personal, current)


@dataclass(frozen=True)
class FedCAC(Personalized):
    """FedCAC (Xinghao Wu, Xuefeng Liu, Jianwei Niu, et al., "Bold but Cautious: Unlocking the
    Potential of Personalized Federated Learning through Cautiously Aggressive Collaboration",
    ICCV 2023, arXiv:2309.11103), as the authors' Fling code (``fedcac_client.py``,
    ``fedcac_group.py``) runs it. Each selected client trains from its personal model; its
    critical parameters are, per layer, the ``tau`` fraction with the largest
    ``|(w_after - w_before) * w_after|``. The server averages the trained models into the
    global model (FedAvg), and for each client the models of the clients whose critical
    parameters overlap its own by at least a threshold (``overlap(i, j) = 1 - |m_i - m_j|_1 /
    (2 |m_i|_1)``; threshold ``avg + (round / beta) (max - avg)`` over the round's pairs, so
    collaboration on critical parameters narrows as rounds pass) into its customized model
    (uniform mean, itself included). The client's next model takes its critical parameters
    from the customized model and the others from the global model."""

    personal_training: ClassVar[bool] = False
    server_personalizes: ClassVar[bool] = True
    runs_on_processes: ClassVar[bool] = True
    tau: float = 0.5
    beta: float = 100.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.tau <= 1:
            raise ValueError("tau must be in (0, 1]")
        if self.beta <= 0:
            raise ValueError("beta must be > 0")

    def critical(self, before: torch.Tensor, after: torch.Tensor,
                 layers: list[tuple[int, int]]) -> torch.Tensor:
        """Each row's critical parameters ``[K, P]`` (bool): per layer ``(offset, size)`` the
        ``ceil``-free ``int(tau * size)`` largest ``|(after - before) * after|`` (at least one;
        ties at the threshold included, as the authors' ``>=``)."""
        score = ((after - before) * after).abs()
        mask = torch.zeros_like(score, dtype=torch.bool)
        for offset, size in layers:
            block = score[:, offset:offset + size]
            k = max(1, int(self.tau * size))
            thresh = block.topk(k, dim=1).values[:, -1:]
            mask[:, offset:offset + size] = block >= thresh
        return mask

    def personalize(self, before: torch.Tensor, after: torch.Tensor, global_model: torch.Tensor,
                    layers: list[tuple[int, int]], round_: int) -> torch.Tensor:
        """The selected clients' next models ``[K, P]`` from where they started (``before``)
        and their trained models (``after``), given the new global model."""
        k = len(after)
        mask = self.critical(before, after, layers)
        if k == 1:
            customized = after
        else:
            m = mask.to(after.dtype)
            diff = torch.cdist(m, m, p=1)                                  # |m_i - m_j|_1
            overlap = 1 - diff / (2 * m.sum(1, keepdim=True))
            off = ~torch.eye(k, dtype=torch.bool, device=after.device)
            avg, top = overlap[off].mean(), overlap[off].max()
            threshold = avg + round_ / self.beta * (top - avg)
            together = (overlap >= threshold) | ~off                       # itself included
            customized = (together.to(after.dtype) @ after) / together.sum(1, keepdim=True)
        return torch.where(mask, customized, global_model.expand_as(after))
