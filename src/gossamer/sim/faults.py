"""Fault models on the simulated clock: crashes, churn, scheduled removals, partitions,
message loss, delay spikes and stragglers.

`Faults` is a pure schedule. Every random draw is counter-based (``rng.STREAM_FAULTS`` with
one sub-key per purpose): the k-th churn session of node i is a function of (seed, i, k), a
message's loss of (seed, key, src, dst), an event's choice of (seed, event index). Answers
therefore never depend on how often, or in which pattern, a driver asks, and the small
state (phases, counters, queue positions) is all a checkpoint needs.

The alive set changes only at known times (the earliest pending churn switch, crash or
event), so ``alive(t)`` returns a cached copy until ``t`` reaches the next one.

Every node transition ``alive`` applies is recorded (``transitions``): crashes, churn
switches of nodes neither crashed nor removed, and each node of a remove or restore event,
with its exact scheduled time and the round the driver was running (``round``, set by the
runner). The record is per-transition arrays, checkpointed with the rest of the state, and
bounded (``MAX_RECORDED`` rows; the counts stay exact beyond it).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from gossamer import rng
from gossamer.config import ConfigError, Distribution, ExperimentConfig, FaultsConfig
from gossamer.population.profiles import quantile
from gossamer.sim.fault_checks import check_events, check_partitions, num_groups, read_trace

# Sub-keys of rng.STREAM_FAULTS, one per purpose, so draws for one never shift another.
_CRASH_PICK, _CRASH_TIME, _CHURN_PICK, _CHURN_SESSION = 1, 2, 3, 4
_EVENT, _PARTITION, _LOSS, _DELAY, _STRAGGLER = 5, 6, 7, 8, 9
_NO_NODES = np.zeros(0, dtype=np.int64)

# Recorded transitions: kind codes (index into KINDS) and the state each leaves the node in.
KINDS = ("crash", "churn", "remove", "restore")
_K_CRASH, _K_CHURN, _K_REMOVE, _K_RESTORE = range(4)
MAX_RECORDED = 1_000_000        # rows kept (~25 MB of checkpoint); counts are exact beyond it
_RECORD_FIELDS = (("t", np.float64), ("node", np.int64), ("kind", np.int8), ("up", bool),
                  ("round", np.int64))


def _pick(seed: int, n: int, fraction: float, *keys: int) -> np.ndarray:
    """Bool mask [n] of round(fraction * n) nodes drawn at random, keyed by ``keys``."""
    mask = np.zeros(n, dtype=bool)
    mask[rng.generator(seed, rng.STREAM_FAULTS, *keys).permutation(n)[: int(fraction * n + 0.5)]] = True
    return mask


class _Churn:
    """Per-node on/off phases: sessions drawn from distributions, or switch times from a trace."""

    def __init__(self, n: int, seed: int, on_s: Distribution | None = None,
                 off_s: Distribution | None = None, members: np.ndarray | None = None,
                 start_online: bool = True, trace: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        self.seed, self.specs, self.trace = seed, (off_s, on_s), trace
        self.on = np.ones(n, dtype=bool)
        self.counter = np.zeros(n, dtype=np.int64)
        self.next_switch = np.full(n, np.inf)
        if trace is not None:
            self.next_switch = self._trace_next(np.arange(n))
        elif members is not None:
            nodes = np.flatnonzero(members)
            self.on[nodes] = start_online
            self.next_switch[nodes] = self._duration(nodes)

    def _duration(self, nodes: np.ndarray) -> np.ndarray:
        """Length of each node's current session (its ``counter``-th), then count it."""
        u = rng.uniform(self.seed, rng.STREAM_FAULTS, _CHURN_SESSION, nodes, self.counter[nodes])
        self.counter[nodes] += 1
        out = np.empty(len(nodes))
        for phase in (False, True):
            sel = self.on[nodes] == phase
            out[sel] = quantile(self.specs[phase], u[sel], nodes[sel])
        return out

    def _trace_next(self, nodes: np.ndarray) -> np.ndarray:
        times, ptr = self.trace
        index = ptr[nodes] + self.counter[nodes]
        return np.where(index < ptr[nodes + 1], times[np.minimum(index, len(times) - 1)], np.inf) \
            if len(times) else np.full(len(nodes), np.inf)

    def advance(self, t: float, down: np.ndarray, note=None) -> None:
        """Apply every switch at or before ``t``; mark nodes that went offline in ``down``;
        ``note(times, nodes, on)`` hears of each batch of switches."""
        while True:
            due = np.flatnonzero(self.next_switch <= t)
            if due.size == 0:
                return
            self.on[due] = ~self.on[due]
            down[due[~self.on[due]]] = True
            if note is not None:
                note(self.next_switch[due], due, self.on[due])
            if self.trace is None:
                self.next_switch[due] += self._duration(due)
            else:
                self.counter[due] += 1
                self.next_switch[due] = self._trace_next(due)


class Faults:
    """The fault schedule of one run; see the module docstring and ``FaultsConfig``.

    Args of ``from_config``: ``n`` nodes; ``degrees`` int [N] of the topology (None in FL);
    ``has_data`` bool [N] (False for relay-only nodes).
    """

    def __init__(self, cfg: FaultsConfig, n: int, seed: int, degrees: np.ndarray | None,
                 has_data: np.ndarray, trace: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        self.cfg, self.n, self.seed = cfg, n, seed
        self.degrees, self.has_data = degrees, np.asarray(has_data, dtype=bool)
        self.enabled = cfg.configured
        self.rejoin_fresh = cfg.rejoin == "fresh"
        self._crash_time = np.full(n, np.inf)
        if cfg.crash is not None:
            crashing = np.flatnonzero(_pick(seed, n, cfg.crash.fraction, _CRASH_PICK))
            u = rng.uniform(seed, rng.STREAM_FAULTS, _CRASH_TIME, crashing)
            self._crash_time[crashing] = quantile(cfg.crash.at_s, u, crashing)
        self._crash_order = np.argsort(self._crash_time, kind="stable")[: int(np.isfinite(self._crash_time).sum())]
        self._crash_sorted = self._crash_time[self._crash_order]
        churn = cfg.churn
        if churn is not None and churn.trace is None:
            members = _pick(seed, n, churn.fraction, _CHURN_PICK)
            self._churn = _Churn(n, seed, churn.on_s, churn.off_s, members, churn.start_online)
        else:
            self._churn = _Churn(n, seed, trace=trace)
        self._event_order = sorted(range(len(cfg.events)), key=lambda i: cfg.events[i].at_s)
        self._groups = [self._split(i, p) for i, p in enumerate(cfg.partitions)]
        self._straggler_cache: tuple[int, np.ndarray] | None = None
        self._time = -math.inf
        self._crashed = np.zeros(n, dtype=bool)
        self._removed = np.zeros(n, dtype=bool)
        self._crash_ptr = self._event_ptr = 0
        self._mask = self._churn.on.copy()
        self._rejoined = _NO_NODES
        self._applied: list[dict] = []
        self.round = 0                          # the round being run; the runner sets it
        self._record: list[dict[str, np.ndarray]] = []
        self._recorded = 0
        self._counts = np.zeros((len(KINDS), 2), dtype=np.int64)    # [kind, up]
        self._next = self._next_time()

    @classmethod
    def from_config(cls, cfg: ExperimentConfig, n: int, *, degrees: np.ndarray | None,
                    has_data: np.ndarray) -> Faults:
        """Build the schedule, with the checks that need ``n``, the graph or the stop rule."""
        f = cfg.faults
        check_events(f, n, degrees, cfg.stop.max_sim_time_s)
        check_partitions(f, n, cfg.stop.max_sim_time_s)
        specs = []
        if f.crash is not None:
            specs.append(("faults.crash.at_s", f.crash.at_s))
        if f.churn is not None and f.churn.trace is None:
            specs += [("faults.churn.on_s", f.churn.on_s), ("faults.churn.off_s", f.churn.off_s)]
        for field, spec in specs:
            if spec.dist == "per_node" and len(spec.values) != n:
                raise ConfigError(field, f"per_node needs {n} values (one per node), got {len(spec.values)}")
        trace = read_trace(Path(f.churn.trace), n) if f.churn is not None and f.churn.trace else None
        return cls(f, n, cfg.seed, None if degrees is None else np.asarray(degrees), has_data, trace)

    # --- the alive set ---------------------------------------------------------------------
    def alive(self, t: float) -> np.ndarray:
        """Bool [N]: not crashed, not removed and churn-online at ``t`` (non-decreasing ``t``)."""
        if t < self._time:
            raise ValueError(f"faults must be queried at non-decreasing times ({t} < {self._time})")
        self._time = t = float(t)
        self._rejoined = _NO_NODES
        if t < self._next:
            return self._mask.copy()
        down = ~self._mask
        while self._event_ptr < len(self._event_order):
            index = self._event_order[self._event_ptr]
            event = self.cfg.events[index]
            if event.at_s > t:
                break
            self._advance(event.at_s, down)
            self._apply(index, down)
            self._event_ptr += 1
        self._advance(t, down)
        self._rejoined = np.flatnonzero(self._mask & down)
        self._next = self._next_time()
        return self._mask.copy()

    def down_by(self, nodes: np.ndarray, times: np.ndarray) -> np.ndarray:
        """Bool per node of ``nodes``: it crashes, or an event naming it removes it, at or
        before its time in ``times`` (a synchronous FL client that dies mid-round never
        uploads). A look-ahead from the last ``alive`` query that changes no state; churn and
        removals of random nodes are decided when they happen and are not seen here."""
        nodes = np.asarray(nodes, dtype=np.int64)
        times = np.broadcast_to(np.asarray(times, dtype=np.float64), nodes.shape)
        down = self._crash_time[nodes] <= times
        for index in self._event_order[self._event_ptr:]:
            event = self.cfg.events[index]
            if event.action == "remove" and event.nodes is not None:
                down |= np.isin(nodes, np.asarray(event.nodes, dtype=np.int64)) & (event.at_s <= times)
        return down

    def rejoined(self) -> np.ndarray:
        """Int64 ids alive now that were dead at some point since the previous ``alive`` call."""
        return self._rejoined.copy()

    def next_change(self) -> float:
        """The earliest time the alive set may change (inf when nothing is pending)."""
        return self._next

    def _advance(self, t: float, down: np.ndarray) -> None:
        stop = np.searchsorted(self._crash_sorted, t, side="right")
        newly = self._crash_order[self._crash_ptr:stop]
        self._crashed[newly] = True
        down[newly] = True
        self._note(self._crash_sorted[self._crash_ptr:stop], newly, _K_CRASH, False)
        self._crash_ptr = int(stop)
        self._churn.advance(t, down, self._note_churn)
        self._mask = self._churn.on & ~self._crashed & ~self._removed

    def _apply(self, index: int, down: np.ndarray) -> None:
        event = self.cfg.events[index]
        pool = self._mask.copy() if event.action == "remove" else self._removed.copy()
        if event.nodes is not None:
            chosen = np.unique(np.asarray(event.nodes, dtype=np.int64))
        elif event.fraction is None and event.count is None:
            chosen = np.flatnonzero(pool)
        else:
            chosen = self._select(index, pool)
        if event.action == "remove":
            self._removed[chosen] = True
            down[chosen] = True
            self._note(np.full(len(chosen), event.at_s), chosen, _K_REMOVE, False)
        else:
            self._removed[chosen] = False
            self._note(np.full(len(chosen), event.at_s), chosen, _K_RESTORE, True)
        self._mask = self._churn.on & ~self._crashed & ~self._removed
        self._applied.append({"t": event.at_s, "kind": event.action, "nodes": chosen.tolist()})

    # --- the transition record -------------------------------------------------------------
    def _note(self, times: np.ndarray, nodes: np.ndarray, kind: int, up: bool | np.ndarray) -> None:
        if len(nodes) == 0:
            return
        up = np.broadcast_to(np.asarray(up, dtype=bool), (len(nodes),))
        np.add.at(self._counts[kind], up.astype(np.int64), 1)
        keep = min(len(nodes), MAX_RECORDED - self._recorded)
        if keep > 0:
            self._record.append({"t": np.array(times[:keep], dtype=np.float64),
                                 "node": np.array(nodes[:keep], dtype=np.int64),
                                 "kind": np.full(keep, kind, dtype=np.int8), "up": up[:keep].copy(),
                                 "round": np.full(keep, self.round, dtype=np.int64)})
            self._recorded += keep

    def _note_churn(self, times: np.ndarray, nodes: np.ndarray, on: np.ndarray) -> None:
        """Churn switches of nodes still in the run (not crashed by then, not removed)."""
        live = (self._crash_time[nodes] > times) & ~self._removed[nodes]
        self._note(times[live], nodes[live], _K_CHURN, on[live])

    def transitions(self) -> dict[str, np.ndarray]:
        """The recorded transitions as arrays ``t, node, kind (index into KINDS), up, round``,
        in time order (ties: the order they were applied)."""
        merged = {k: np.concatenate([c[k] for c in self._record]) if self._record
                  else np.zeros(0, dtype=d) for k, d in _RECORD_FIELDS}
        order = np.argsort(merged["t"], kind="stable")
        return {k: v[order] for k, v in merged.items()}

    @property
    def records_transitions(self) -> bool:
        """Whether any configured fault takes nodes down (crash, churn, events)."""
        return self.cfg.crash is not None or self.cfg.churn is not None or bool(self.cfg.events)

    def transition_counts(self) -> dict[str, int]:
        """Transitions so far by kind (exact even past ``MAX_RECORDED``), rows recorded, nodes down."""
        c = self._counts
        return {"crash": int(c[_K_CRASH].sum()), "churn_down": int(c[_K_CHURN, 0]),
                "churn_up": int(c[_K_CHURN, 1]), "remove": int(c[_K_REMOVE].sum()),
                "restore": int(c[_K_RESTORE].sum()), "recorded": self._recorded,
                "complete": bool(self._recorded == c.sum()),
                "down_now": int(self.n - self._mask.sum())}

    def transitions_csv(self) -> str:
        """``t_s,round,node,kind,state`` per transition (``faults.csv`` of a run directory)."""
        r = self.transitions()
        kinds, states = np.array(KINDS), np.array(["down", "up"])
        rows = [f"{t!r},{k},{n},{kind},{state}" for t, k, n, kind, state in
                zip(r["t"].tolist(), r["round"].tolist(), r["node"].tolist(),
                    kinds[r["kind"]].tolist(), states[r["up"].astype(np.int64)].tolist(), strict=True)]
        return "\n".join(["t_s,round,node,kind,state", *rows]) + "\n"

    def _select(self, index: int, pool: np.ndarray) -> np.ndarray:
        """The event's fraction or count of the pool's nodes that match its ``select`` rule."""
        event = self.cfg.events[index]
        if event.select == "data_holders":
            pool &= self.has_data
        elif event.select == "relay_only":
            pool &= ~self.has_data
        candidates = np.flatnonzero(pool)
        k = event.count if event.count is not None else int(event.fraction * len(candidates) + 0.5)
        k = min(k, len(candidates))
        if event.select == "highest_degree":
            order = np.lexsort((candidates, -self.degrees[candidates]))
            return np.sort(candidates[order[:k]])
        g = rng.generator(self.seed, rng.STREAM_FAULTS, _EVENT, index)
        return np.sort(g.choice(candidates, k, replace=False)).astype(np.int64)

    def _next_time(self) -> float:
        live = ~self._crashed & ~self._removed
        churn = self._churn.next_switch[live].min() if live.any() else math.inf
        crash = self._crash_sorted[self._crash_ptr] if self._crash_ptr < len(self._crash_sorted) else math.inf
        event = self.cfg.events[self._event_order[self._event_ptr]].at_s \
            if self._event_ptr < len(self._event_order) else math.inf
        return float(min(churn, crash, event))

    # --- partitions --------------------------------------------------------------------------
    def _split(self, index: int, p) -> np.ndarray:
        """Group id per node [N] of partition ``index``."""
        group = np.zeros(self.n, dtype=np.int64)
        if p.nodes is not None:
            for g, members in enumerate(p.nodes):
                group[members] = g
            return group
        perm = rng.generator(self.seed, rng.STREAM_FAULTS, _PARTITION, index).permutation(self.n)
        if p.groups is not None:
            group[perm] = np.arange(self.n) % p.groups
            return group
        bounds = np.floor(np.cumsum(p.fractions) * self.n + 0.5).astype(np.int64)
        bounds[-1] = self.n
        for g, (lo, hi) in enumerate(zip(np.concatenate([[0], bounds[:-1]]), bounds, strict=True)):
            group[perm[lo:hi]] = g
        return group

    def _active(self, t: float) -> list[np.ndarray]:
        return [group for p, group in zip(self.cfg.partitions, self._groups, strict=True)
                if p.at_s <= t and (p.heal_s is None or t < p.heal_s)]

    def connected(self, t: float, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
        """Bool per (src, dst) pair: False when a partition active at ``t`` separates them."""
        src, dst = np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64)
        ok = np.ones(np.broadcast_shapes(src.shape, dst.shape), dtype=bool)
        for group in self._active(t):
            ok &= group[src] == group[dst]
        return ok

    def server_reachable(self, t: float) -> np.ndarray:
        """Bool [N]: in group 0 of every partition active at ``t`` (FL's server side)."""
        ok = np.ones(self.n, dtype=bool)
        for group in self._active(t):
            ok &= group == 0
        return ok

    # --- messages and compute ----------------------------------------------------------------
    def lost(self, key: int, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
        """Bool per message: lost with probability ``message_loss.prob``, keyed by (key, src, dst)."""
        if self.cfg.message_loss is None:
            return np.zeros(np.broadcast_shapes(np.shape(src), np.shape(dst)), dtype=bool)
        return self._uniform(_LOSS, key, src, dst) < self.cfg.message_loss.prob

    def extra_delay(self, key: int, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
        """Extra seconds per message: ``delay_spikes.delay_s`` with probability ``prob``, else 0."""
        spikes = self.cfg.delay_spikes
        if spikes is None:
            return np.zeros(np.broadcast_shapes(np.shape(src), np.shape(dst)))
        return np.where(self._uniform(_DELAY, key, src, dst) < spikes.prob, spikes.delay_s, 0.0)

    def _uniform(self, purpose: int, key: int, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
        """Per-message uniforms, shape broadcast(src, dst); one message takes the scalar path (40x faster)."""
        if np.ndim(src) == 0 and np.ndim(dst) == 0:
            return np.asarray(rng.uniform_scalar(self.seed, rng.STREAM_FAULTS, purpose, int(key),
                                                 int(src), int(dst)))
        shape = np.broadcast_shapes(np.shape(src), np.shape(dst))
        return rng.uniform(self.seed, rng.STREAM_FAULTS, purpose, key, src, dst).reshape(shape)

    def slowdown(self, round: int, nodes: np.ndarray) -> np.ndarray:
        """Compute-time factor (>= 1) per node: ``stragglers.factor`` for the round's stragglers."""
        nodes = np.asarray(nodes, dtype=np.int64)
        s = self.cfg.stragglers
        if s is None:
            return np.ones(nodes.shape)
        key = 0 if s.mode == "fixed" else int(round) + 1
        if self._straggler_cache is None or self._straggler_cache[0] != key:
            self._straggler_cache = (key, _pick(self.seed, self.n, s.fraction, _STRAGGLER, key))
        return np.where(self._straggler_cache[1][nodes], s.factor, 1.0)

    # --- reporting and checkpoints -----------------------------------------------------------
    def applied_events(self) -> list[dict]:
        """Removals, restorations and partitions applied up to the last ``alive`` time."""
        parts = [{"t": p.at_s, "kind": "partition", "heal_s": p.heal_s,
                  "nodes": [np.flatnonzero(group == g).tolist() for g in range(num_groups(p))]}
                 for p, group in zip(self.cfg.partitions, self._groups, strict=True) if p.at_s <= self._time]
        return sorted([dict(e) for e in self._applied] + parts, key=lambda e: e["t"])

    def state_dict(self) -> dict:
        c = self._churn
        return {"time": self._time, "next": self._next, "crash_ptr": self._crash_ptr,
                "event_ptr": self._event_ptr, "crashed": self._crashed.copy(),
                "removed": self._removed.copy(), "mask": self._mask.copy(),
                "rejoined": self._rejoined.copy(), "churn_on": c.on.copy(),
                "churn_counter": c.counter.copy(), "churn_next": c.next_switch.copy(),
                "applied": [dict(e, nodes=list(e["nodes"])) for e in self._applied],
                **{f"record_{k}": v for k, v in self.transitions().items()},
                "record_counts": self._counts.copy()}

    def load_state_dict(self, state: dict) -> None:
        def arr(key: str, dtype: type) -> np.ndarray:
            value = state[key]                # numpy, or a tensor from a checkpoint
            return np.array(value.numpy() if hasattr(value, "numpy") else value, dtype=dtype)

        self._time, self._next = float(state["time"]), float(state["next"])
        self._crash_ptr, self._event_ptr = int(state["crash_ptr"]), int(state["event_ptr"])
        self._crashed, self._removed = arr("crashed", bool), arr("removed", bool)
        self._mask, self._rejoined = arr("mask", bool), arr("rejoined", np.int64)
        c = self._churn
        c.on, c.counter, c.next_switch = arr("churn_on", bool), arr("churn_counter", np.int64), \
            arr("churn_next", np.float64)
        self._applied = [{"t": float(e["t"]), "kind": str(e["kind"]), "nodes": [int(v) for v in e["nodes"]]}
                         for e in state["applied"]]
        if "record_counts" in state:          # checkpoints from before the record hold none
            self._record = [{k: arr(f"record_{k}", d) for k, d in _RECORD_FIELDS}]
            self._recorded = len(self._record[0]["t"])
            self._counts = arr("record_counts", np.int64)
