"""FedCompass: a computing-power-aware scheduler that synchronizes client arrivals in groups.

Li et al., "FedCompass: Efficient Cross-Silo Federated Learning on Heterogeneous Client
Devices Using a Computing Power-Aware Scheduler", ICLR 2024, arXiv:2309.14675. The rules
follow the authors' scheduler in APPFL (``SchedulerCompass``; ``CompassScheduler`` and
``FedCompassAggregator`` in later releases), run here on the simulated clock:

- **Speed.** The server keeps each client's time per local step. Every arrival measures
  ``(arrival - dispatch) / steps`` of that task; the first measurement sets the estimate,
  later ones update it as ``(1 - m) * old + m * new`` with ``m = speed_momentum`` (the
  authors' code; the new measurement gets weight ``m``).
- **First task.** A client without an estimate trains ``Q_max = max_local_steps`` steps in
  no group; its first arrival is applied at once as a *single update*, then it is assigned.
- **Assignment at time t** (:meth:`FedCompass.assign`). *Join*: for every open group,
  ``q = floor((expected_arrival - t) / speed_i)``; a group is eligible when
  ``Q_min <= q <= floor(max_steps_bound_factor * Q_max)``; the client joins the group
  giving the most steps (ties: the newer group). *Create* otherwise: for every open group
  with ``latest_arrival > t``, ``est = latest_arrival + (fastest member's speed) * Q_max``
  and ``q = floor((est - t) / speed_i)`` counts when ``q <= Q_max``; the client takes the
  largest such ``q`` raised to ``Q_min`` (``Q_max`` when there is none) and a new group with
  ``expected_arrival = t + q speed_i`` and ``latest_arrival = t + q speed_i lambda``
  (``lambda = latest_time_factor``). ``Q_min = max(floor(q_ratio Q_max), 1)``.
- **Arrivals.** A client arriving at or after its group's latest arrival time (or after the
  group was aggregated) leaves the group; its update goes to a general buffer, applied with
  the next group aggregation, and it is re-assigned at once. Otherwise it waits in the
  group. A group aggregates when all its members have arrived, or at its latest arrival
  time (a timer) if at least one has: ``x <- x + sum_i alpha p_i s(staleness_i) Delta_i``
  over the group's and the general buffer's updates, ``Delta_i`` = trained minus start
  model, ``p_i = n_i / sum_j n_j`` (``weighting``). The group's arrived clients are then
  re-assigned fastest first and sent the new model; members still training will be late.

Staleness is the server version at arrival minus the start version (the buffered weight is
fixed on arrival, as in the authors' original scheduler; their later aggregator computes it
at aggregation). Not implemented: the authors' client learning-rate decay
(``lr * 0.995^floor(total_steps / Q_max)``); clients train with ``local.lr``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from gossamer.algorithms.fl.async_fl import AsyncFL, AsyncServerState, Weighting, importance


@dataclass
class ArrivalGroup:
    """Clients scheduled to arrive together: ``members`` still train, ``arrived`` wait."""

    created_s: float
    expected_s: float
    latest_s: float
    members: list[int] = field(default_factory=list)
    arrived: list[int] = field(default_factory=list)
    open: bool = True            # False once aggregated (or its timer found nobody): later arrivals are late


@dataclass
class CompassSchedule:
    """The scheduler's state: per-client speed estimates and group, and the arrival groups."""

    speed: np.ndarray                     # [N] seconds per local step; nan: no estimate yet
    group: np.ndarray                     # [N] group of the client's current task, -1: none
    groups: dict[int, ArrivalGroup] = field(default_factory=dict)
    next_group: int = 0

    @classmethod
    def empty(cls, n: int) -> CompassSchedule:
        return cls(np.full(n, np.nan), np.full(n, -1, dtype=np.int64))

    def leave(self, client: int) -> int:
        """Take ``client`` out of its group's members (the group goes once nobody is left in
        it); returns the group id, -1 if it had none."""
        g = int(self.group[client])
        self.group[client] = -1
        if g >= 0 and g in self.groups:
            group = self.groups[g]
            if client in group.members:
                group.members.remove(client)
            if not group.members and not group.arrived:
                del self.groups[g]
        return g

    def release(self, g: int) -> list[int]:
        """Close group ``g`` (its arrived clients leave it; members still training will be
        late); returns the arrived clients."""
        group = self.groups[g]
        arrived, group.arrived, group.open = group.arrived, [], False
        self.group[arrived] = -1
        if not group.members:
            del self.groups[g]
        return arrived

    # --- checkpoints: arrays and plain values --------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        ids = sorted(self.groups)
        gs = [self.groups[g] for g in ids]
        pairs = lambda attr: np.array([(g, c) for g in ids for c in getattr(self.groups[g], attr)],  # noqa: E731
                                      dtype=np.int64).reshape(-1, 2)
        return {"speed": self.speed.copy(), "group": self.group.copy(), "next_group": self.next_group,
                "ids": np.array(ids, dtype=np.int64),
                "times": np.array([[x.created_s, x.expected_s, x.latest_s] for x in gs],
                                  dtype=np.float64).reshape(-1, 3),
                "open": np.array([x.open for x in gs], dtype=bool),
                "members": pairs("members"), "arrived": pairs("arrived")}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> CompassSchedule:
        arr = {k: v.numpy() if hasattr(v, "numpy") else v for k, v in state.items()}
        out = cls(np.array(arr["speed"], dtype=np.float64), np.array(arr["group"], dtype=np.int64),
                  next_group=int(arr["next_group"]))
        for g, (c, e, lt), o in zip(arr["ids"].tolist(), arr["times"].tolist(), arr["open"].tolist(), strict=True):
            out.groups[g] = ArrivalGroup(c, e, lt, open=bool(o))
        for attr in ("members", "arrived"):
            for g, c in arr[attr].tolist():
                getattr(out.groups[g], attr).append(c)
        return out


@dataclass(frozen=True)
class FedCompass(AsyncFL):
    """FedCompass (Li et al., ICLR 2024, arXiv:2309.14675): see the module docstring.

    Tasks carry their own number of local steps (``local.epochs``/``local.steps`` are not
    used; ``local.batch_size`` and ``local.lr`` are). Cross-silo: by default every client is
    always working (``concurrency`` null).
    """

    trigger = "group"
    max_local_steps: int = field(kw_only=True)           # Q_max
    concurrency: int | None = None
    q_ratio: float = 0.2
    max_steps_bound_factor: float = 1.2
    latest_time_factor: float = 1.5                     # lambda
    speed_momentum: float = 0.9
    alpha: float = 0.9
    weighting: Weighting = "samples"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_local_steps < 1:
            raise ValueError("max_local_steps must be >= 1")
        if not 0 < self.q_ratio <= 1:
            raise ValueError("q_ratio must be in (0, 1]")
        if self.max_steps_bound_factor < 1:
            raise ValueError("max_steps_bound_factor must be >= 1")
        if self.latest_time_factor < 1:
            raise ValueError("latest_time_factor must be >= 1")
        if not 0 < self.speed_momentum <= 1:
            raise ValueError("speed_momentum must be in (0, 1]")
        if not 0 < self.alpha <= 1:
            raise ValueError("alpha must be in (0, 1]")

    @property
    def min_local_steps(self) -> int:
        """``Q_min = max(floor(q_ratio Q_max), 1)``."""
        return max(math.floor(self.q_ratio * self.max_local_steps), 1)

    @property
    def steps_bound(self) -> int:
        """Most steps a client may get when joining a group: ``floor(factor Q_max)``."""
        return math.floor(self.max_steps_bound_factor * self.max_local_steps)

    def update_speed(self, old: float, measured: float) -> float:
        """New time-per-step estimate: the first measurement, then ``(1 - m) old + m measured``."""
        if math.isnan(old):
            return measured
        return (1.0 - self.speed_momentum) * old + self.speed_momentum * measured

    def assign(self, sched: CompassSchedule, client: int, t: float) -> int:
        """Assign ``client`` (with a speed estimate) at time ``t`` to a group; returns its steps."""
        speed = float(sched.speed[client])
        best_g, best_q = -1, -1
        for g in sorted(sched.groups):                    # join: the group giving the most steps
            group = sched.groups[g]
            if not group.open:
                continue
            q = math.floor((group.expected_s - t) / speed)
            if self.min_local_steps <= q <= self.steps_bound and q >= best_q:
                best_g, best_q = g, q
        if best_g >= 0:
            sched.groups[best_g].members.append(client)
            sched.group[client] = best_g
            return best_q
        q_new = -1                                        # create: arrive one Q_max after a group's latest
        for g in sorted(sched.groups):
            group = sched.groups[g]
            if not group.open or group.latest_s <= t:
                continue
            fastest = float(np.min(sched.speed[group.members + group.arrived]))
            q = math.floor((group.latest_s + fastest * self.max_local_steps - t) / speed)
            if q <= self.max_local_steps:
                q_new = max(q_new, q)
        q_new = self.max_local_steps if q_new < 0 else max(q_new, self.min_local_steps)
        g = sched.next_group
        sched.next_group += 1
        sched.groups[g] = ArrivalGroup(t, t + q_new * speed, t + q_new * speed * self.latest_time_factor, [client])
        sched.group[client] = g
        return q_new

    def aggregate(self, state: AsyncServerState, messages: torch.Tensor, staleness: np.ndarray,
                  clients: np.ndarray, sizes: np.ndarray, lr: float | None = None,
                  **context: Any) -> AsyncServerState:
        """``x <- x + sum_i alpha p_i s(staleness_i) Delta_i`` over a group's and the general
        buffer's updates (or one client's single update)."""
        w = self.alpha * importance(self.weighting, clients, sizes) * self.weights(np.asarray(staleness))
        step = torch.as_tensor(w, dtype=messages.dtype, device=messages.device) @ messages
        return AsyncServerState(state.params + step, state.version + 1)
