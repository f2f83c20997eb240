"""Asynchronous FL: the server updates the model as client updates arrive, not in rounds.

Server rules over one execution pattern (``async_fl``): FedAsync mixes every arrival into
the model, FedBuff applies a buffer of ``buffer_size`` arrivals, FedFix aggregates what
arrived in each fixed period; FedCompass (``fedcompass.py``) and Anarchic FL
(``anarchic.py``) also choose each task's number of local steps. All take Papaya's controls
(Huba et al., "Papaya: Practical, Private, and Scalable Federated Learning", MLSys 2022,
arXiv:2111.04877): ``concurrency`` (clients training at once) and ``max_staleness`` (staler
updates are dropped).

Staleness of an update = server version when it arrives minus the version it started from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from gossamer.algorithms.base import Algorithm

StalenessFn = Literal["constant", "polynomial", "hinge"]
Trigger = Literal["arrival", "buffer", "period", "group"]
Weighting = Literal["samples", "uniform"]


def staleness_weight(staleness: np.ndarray | int, fn: StalenessFn = "constant", a: float = 0.5,
                     b: float = 4.0) -> np.ndarray:
    """Weight ``s(staleness)`` in (0, 1] of an update, non-increasing in its staleness.

    The functions of Xie et al. 2019 (arXiv:1903.03934, Section 5.2): ``constant`` 1,
    ``polynomial`` ``(staleness + 1)^-a``, ``hinge`` 1 up to ``b`` then ``1 / (a (staleness - b) + 1)``.
    FedBuff's ``1 / sqrt(1 + staleness)`` is ``polynomial`` with ``a = 0.5``.

    >>> staleness_weight(np.array([0, 3]), "polynomial", a=0.5).tolist()
    [1.0, 0.5]
    """
    s = np.asarray(staleness, dtype=np.float64)
    if fn == "constant":
        return np.ones_like(s)
    if fn == "polynomial":
        return (s + 1.0) ** (-a)
    if fn == "hinge":
        return np.where(s <= b, 1.0, 1.0 / (a * (s - b) + 1.0))
    raise ValueError(f"unknown staleness function {fn!r}")


def importance(weighting: Weighting, clients: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Client importance ``p_i`` of ``clients`` ``[B]`` given every client's sample count ``sizes``
    ``[N]``: ``samples`` is ``n_i / sum_j n_j`` over all N clients, ``uniform`` is 1 / (clients
    with data)."""
    sizes = np.asarray(sizes, dtype=np.float64)
    if weighting == "samples":
        return sizes[np.asarray(clients, dtype=np.int64)] / sizes.sum()
    return np.full(len(clients), 1.0 / max(1, int((sizes > 0).sum())))


@dataclass
class AsyncServerState:
    """The server's model ``[P]`` and its version (number of model updates so far).

    Rules with more server state subclass this; the driver checkpoints every field."""

    params: torch.Tensor
    version: int = 0


@dataclass(frozen=True)
class AsyncFL(Algorithm):
    """Papaya's controls, shared by the three rules; subclasses define ``aggregate``.

    ``trigger`` says when the server updates: on every accepted arrival, after a full
    buffer, at the end of each period, or when an arrival group completes (FedCompass).
    ``client_message`` is what a client uploads (the update ``trained - start`` unless a
    rule says otherwise). ``self_dispatch``: clients decide themselves when to work
    (:meth:`think_time`); :meth:`task_steps` gives each task its own number of local steps
    (None: the ``local`` schedule). ``concurrency`` null means every client. The protocol
    (``protocols/async_fl.py``) asks :meth:`due` when a buffer is full; rules with several
    models (FedAST) or pulls at period ends (FAVANO) override :meth:`pick_models`,
    :meth:`model_params`, :meth:`model_version` and ``pull_probability``.
    """

    family = "fl"
    pattern = "async_fl"
    trigger: ClassVar[Trigger]
    self_dispatch: ClassVar[bool] = False
    # what a client that did not move would upload: its start model (True) or zeros (an
    # update or a direction); compressed uploads encode the message minus this base
    uploads_model: ClassVar[bool] = False
    # a server update is a weighted sum (weights at most 1) of a fixed number of updates, to
    # which client-level DP adds its noise (``aggregate(..., noise=)``: DP-FedBuff)
    private_sum: ClassVar[bool] = False

    concurrency: int | None = 10
    max_staleness: int | None = None
    staleness_fn: StalenessFn = "polynomial"
    a: float = 0.5
    b: float = 4.0

    def __post_init__(self) -> None:
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError("concurrency must be >= 1 or null (every client)")
        if self.max_staleness is not None and self.max_staleness < 0:
            raise ValueError("max_staleness must be >= 0 or null")
        if self.a < 0 or self.b < 0:
            raise ValueError("staleness parameters a and b must be >= 0")

    def init_state(self, params: torch.Tensor) -> AsyncServerState:
        return AsyncServerState(params.clone())

    def accepts(self, staleness: int) -> bool:
        """Whether the server keeps an update of this staleness (Papaya's ``max_staleness``)."""
        return self.max_staleness is None or staleness <= self.max_staleness

    def weights(self, staleness: np.ndarray) -> np.ndarray:
        """``s(staleness)`` per update ``[B]`` with this rule's staleness function."""
        return staleness_weight(staleness, self.staleness_fn, self.a, self.b)

    def task_steps(self, seed: int, clients: np.ndarray, counts: np.ndarray) -> np.ndarray | None:
        """Local steps of each client's next task (``counts``: tasks each client started so far);
        None: every task follows the ``local`` schedule."""
        return None

    def think_time(self, seed: int, clients: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Seconds a self-dispatching client waits before starting its next task."""
        return np.zeros(len(clients))

    @property
    def num_models(self) -> int:
        """Models the server trains at once (FedAST: several)."""
        return 1

    @property
    def pull_probability(self) -> float | None:
        """FAVANO: the chance that the server pulls a client at a period end (None: no pulls)."""
        return None

    def due(self, model: int) -> int | None:
        """Accepted updates of ``model`` that make a server update (None: not a buffer rule)."""
        if self.trigger == "arrival":
            return 1
        return getattr(self, "buffer_size", None) if self.trigger == "buffer" else None

    def pick_models(self, count: int, active: list[int]) -> list[int]:
        """Which model each of ``count`` new tasks trains (``active``: models of the tasks in
        flight; empty when :attr:`num_models` is 1)."""
        return [0] * count

    def model_params(self, state: AsyncServerState, model: int) -> torch.Tensor:
        """The current parameters ``[P]`` of ``model``."""
        return state.params

    def model_version(self, state: AsyncServerState, model: int) -> int:
        """The version of ``model`` (updates applied to it), against which staleness is counted."""
        return state.version

    def client_message(self, trained: torch.Tensor, start: torch.Tensor, steps: np.ndarray | None = None,
                       lr: float | None = None) -> torch.Tensor:
        """What each client uploads ``[B, P]``: its update, trained model minus start model.

        ``steps`` ``[B]`` (local steps taken) and ``lr`` (local learning rate) are for rules
        whose upload is normalized by them (Anarchic FL)."""
        return trained - start

    def aggregate(self, state: AsyncServerState, messages: torch.Tensor, staleness: np.ndarray,
                  clients: np.ndarray, sizes: np.ndarray, lr: float | None = None,
                  **context: Any) -> AsyncServerState:
        """One server update from the accepted ``messages`` ``[B, P]`` since the previous one.

        ``staleness`` and ``clients`` are ``[B]``; ``sizes`` ``[N]`` are every client's sample counts;
        ``lr`` is the local learning rate (for rules with two-sided learning rates). ``context``
        (from the protocol): ``task_s`` ``[B]`` seconds each task took (arrival minus dispatch),
        ``steps`` ``[B]`` local steps assigned (0: the local schedule), ``model`` (FedAST).
        """
        raise NotImplementedError


@dataclass(frozen=True)
class FedAsync(AsyncFL):
    """FedAsync: on each arrival ``x <- (1 - a_t) x + a_t x_client``, ``a_t = alpha s(staleness)``.

    Xie, Koyejo, Gupta, "Asynchronous Federated Optimization", 2019, arXiv:1903.03934
    (Algorithm 1; ``staleness_fn``/``a``/``b`` as in its Section 5.2, whose experiments use
    ``polynomial`` with ``a = 0.5`` and ``hinge`` with ``a = 10, b = 4``). Clients upload models.
    The paper's proximal term in the local objective is not applied (plain local SGD).
    """

    trigger = "arrival"
    alpha: float = 0.6

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.alpha <= 1:
            raise ValueError("alpha must be in (0, 1]")

    uploads_model = True

    def client_message(self, trained: torch.Tensor, start: torch.Tensor, steps: np.ndarray | None = None,
                       lr: float | None = None) -> torch.Tensor:
        """FedAsync clients upload their trained model ``[B, P]``."""
        return trained

    def aggregate(self, state: AsyncServerState, messages: torch.Tensor, staleness: np.ndarray,
                  clients: np.ndarray, sizes: np.ndarray, lr: float | None = None,
                  **context: Any) -> AsyncServerState:
        """Mix the client models in arrival order (the driver passes one at a time)."""
        x = state.params
        for model, w in zip(messages, self.weights(staleness), strict=True):
            mix = self.alpha * float(w)
            x = (1.0 - mix) * x + mix * model
        return AsyncServerState(x, state.version + 1)


@dataclass(frozen=True)
class FedBuff(AsyncFL):
    """FedBuff: after ``buffer_size`` (K) accepted updates, ``x <- x + server_lr * sum_i s_i d_i / K``.

    Nguyen et al., "Federated Learning with Buffered Asynchronous Aggregation", AISTATS 2022,
    arXiv:2106.06639 (Algorithm 1). ``d_i`` is a client's update (trained minus start model),
    ``s_i = s(staleness_i)``, by default the paper's ``1 / sqrt(1 + staleness)``.
    """

    trigger = "buffer"
    private_sum = True
    buffer_size: int = 5
    server_lr: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.buffer_size < 1:
            raise ValueError("buffer_size must be >= 1")
        if self.server_lr <= 0:
            raise ValueError("server_lr must be > 0")

    def aggregate(self, state: AsyncServerState, messages: torch.Tensor, staleness: np.ndarray,
                  clients: np.ndarray, sizes: np.ndarray, lr: float | None = None,
                  **context: Any) -> AsyncServerState:
        """Apply one full buffer (``B == buffer_size`` updates); ``context["noise"]`` ``[P]``
        (client-level DP) is added to the weighted sum."""
        if messages.shape[0] != self.buffer_size:
            raise ValueError(f"FedBuff applies exactly {self.buffer_size} updates, got {messages.shape[0]}")
        w = torch.as_tensor(self.weights(staleness), dtype=messages.dtype, device=messages.device)
        total = w @ messages
        if context.get("noise") is not None:
            total = total + context["noise"]
        step = total / self.buffer_size
        return AsyncServerState(state.params + self.server_lr * step, state.version + 1)


@dataclass(frozen=True)
class FedFix(AsyncFL):
    """FedFix: every ``delta_t_s`` simulated seconds, ``x <- x + server_lr * sum_i d_i Delta_i``.

    Fraboni et al., "A General Theory for Federated Optimization with Asynchronous and
    Heterogeneous Clients Updates", JMLR 24(110) 2023, arXiv:2206.10189. The sum runs over the
    updates ``Delta_i`` (trained minus start model) that arrived in the period. The weights
    are the authors' reference code's (Accenture/Labs-Federated-Learning, ``FL/server.py``,
    FedFix with ``weight`` aggregation): ``d_i = ceil(tau_i / delta_t) p_i``, with ``tau_i``
    the client's update time and ``p_i`` its importance (``samples``: ``n_i / sum_j n_j`` over
    all N clients; ``uniform``: 1 / number of clients with data). A client served at a period
    boundary that returns ``ceil(tau_i / delta_t)`` periods later arrives with staleness
    ``ceil(tau_i / delta_t) - 1``, so the simulator uses ``d_i = (staleness_i + 1) p_i``, which
    equals the paper's weight when update times are fixed and stays defined when they vary
    (stragglers, delays). The scaling makes a slow client's rarer updates count as much, in
    expectation, as a fast one's. ``staleness_fn`` (default ``constant``) multiplies ``d_i`` by
    ``s(staleness)``; the paper has no such factor.
    """

    trigger = "period"
    delta_t_s: float = 1.0
    server_lr: float = 1.0
    weighting: Weighting = "samples"
    staleness_fn: StalenessFn = "constant"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.delta_t_s > 0:
            raise ValueError("delta_t_s must be > 0")
        if self.server_lr <= 0:
            raise ValueError("server_lr must be > 0")

    def importance(self, clients: np.ndarray, sizes: np.ndarray) -> np.ndarray:
        """``p_i`` of ``clients`` ``[B]`` given every client's sample count ``sizes`` ``[N]``."""
        return importance(self.weighting, clients, sizes)

    def aggregate(self, state: AsyncServerState, messages: torch.Tensor, staleness: np.ndarray,
                  clients: np.ndarray, sizes: np.ndarray, lr: float | None = None,
                  **context: Any) -> AsyncServerState:
        """Aggregate the period's updates (possibly none: the model stays, the version advances)."""
        if messages.shape[0] == 0:
            return AsyncServerState(state.params, state.version + 1)
        staleness = np.asarray(staleness)
        d = self.importance(np.asarray(clients), sizes) * (staleness + 1) * self.weights(staleness)
        step = torch.as_tensor(d, dtype=messages.dtype, device=messages.device) @ messages
        return AsyncServerState(state.params + self.server_lr * step, state.version + 1)
