"""MoDeST (:mod:`gossamer.protocols.modest`) on the simulated clock, one round at once.

The last round's aggregators ping the round's ranked trainer candidates until ``sample_size``
answer and send them their model one after another over their uplink; the trainers train
(one batched call), ping the aggregator candidates the same way and send to each; an
aggregator averages its first ``quorum`` arrivals (``quorum_mask``); the round ends at the
first aggregate. Simplifications: responsiveness is read when the trainers are sampled and
when the first trainer finishes; pings cost latency and ``timeout_s`` but no bytes;
downlinks are not shared; the registry is one view shared by all nodes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from gossamer.algorithms.dl.modest import Probe, aggregate, probe, quorum_mask
from gossamer.protocols import dl_metrics
from gossamer.protocols import modest as protocol
from gossamer.sim.drivers.base import Driver
from gossamer.sim.drivers.sync_dl import next_change
from gossamer.sim.experiment import Experiment
from gossamer.training.trainer import TrainResult


class ModestDriver(Driver):
    """Executes :mod:`gossamer.protocols.modest` for a whole round at once."""

    columns = dl_metrics.MODEST_COLUMNS

    def __init__(self, exp: Experiment) -> None:
        super().__init__(exp)
        self.algorithm = exp.algorithm
        self.has_data = exp.trainer.sizes > 0
        self.view = np.ones(exp.num_nodes, dtype=bool)      # every node registered at the start
        init = exp.init_params
        self.aggregates = init.reshape(1, -1).clone() if init.dim() == 1 else init[:1].clone()
        self.agg_ids = np.empty(0, dtype=np.int64)           # aggregators of the last round
        self.agg_ready = np.empty(0)                         # when each had its aggregate
        self.participants = self.num_aggregators = self.timeouts = 0
        self.total_timeouts = self.stalled_rounds = 0
        self.node_bytes = np.zeros(exp.num_nodes, dtype=np.int64)   # bytes each node sent plus received

    def _wait(self, t: float) -> None:
        """Nobody to work with: wait out a timeout, and at least until the next availability (or
        fault) change; the next round samples again."""
        change = next_change(self.exp)
        t_next = t + self.algorithm.timeout_s
        if np.isfinite(change):
            t_next = max(t_next, change)
        self.sim_time = t_next
        self.agg_ready = np.maximum(self.agg_ready, t_next)
        self.num_aggregators = 0
        self.stalled_rounds += 1

    def _fan_out(self, senders: np.ndarray, start: np.ndarray, found: Probe) -> np.ndarray:
        """Arrival times ``[len(senders), len(found.chosen)]`` of the senders' models.

        Each sender pings ``found``'s candidates from ``start`` (a ping costs a round trip, a
        silent candidate ``timeout_s``), then sends one copy after another over its uplink to
        the chosen nodes; a copy for itself costs nothing."""
        s, nbytes, timeout = self.exp.system, self.exp.message_bytes, self.algorithm.timeout_s
        recv, lat = found.chosen, self.exp.system.latency_s
        other = senders[:, None] != recv[None, :]
        rtt = np.where(other, lat[senders][:, None] + lat[recv][None, :], 0.0)
        known = start + np.maximum(found.waves * timeout,
                                   (found.wave * timeout + rtt).max(axis=1, initial=0.0))
        slot = np.cumsum(other, axis=1)                      # position on the sender's uplink
        wire = (lat[senders][:, None] + slot * nbytes / s.bandwidth_up_Bps[senders][:, None]
                + nbytes / s.bandwidth_down_Bps[recv][None, :])
        return known[:, None] + np.where(other, wire, 0.0)

    def run_round(self) -> None:
        exp, algo, r = self.exp, self.algorithm, self.round + 1
        seed, t0 = exp.cfg.seed, self.sim_time
        self.round, self.timeouts, self.participants = r, 0, 0
        alive = self.exp.online(t0)
        view = self.view
        if algo.announce_churn:           # joins and leaves announced so far ride on this round's messages
            self.view = exp.availability.at(t0).copy()
        pool = np.flatnonzero(view & self.has_data)
        bootstrap = len(self.agg_ids) == 0   # no aggregate yet: sampled nodes start from the initial model
        if bootstrap:
            ids = protocol.bootstrap(pool, seed, r, algo.sample_size)
            ids = ids[alive[ids]]
        else:
            ranked = protocol.trainers(pool, seed, r)
            trainers = probe(ranked, alive[ranked], algo.sample_size)
            ids = trainers.chosen
        if len(ids) == 0:
            self._wait(t0)
            return
        if bootstrap:
            start, sent = np.full(len(ids), t0), 0
            init = exp.init_params

            def rows_at(at: np.ndarray) -> torch.Tensor:
                return init.expand(len(at), -1) if init.dim() == 1 else init[torch.from_numpy(ids[at])]
        else:                             # the last round's aggregators feed the trainers
            arrival = self._fan_out(self.agg_ids, self.agg_ready, trainers)
            sent = int(np.isfinite(arrival).sum() - np.isin(self.agg_ids, ids).sum())
            feeds = (self.agg_ids, ids, np.isfinite(arrival) & (self.agg_ids[:, None] != ids[None, :]))
            arrival = self._network_faults(arrival, self.agg_ids, ids, 2 * r)
            reached = np.isfinite(arrival).any(axis=0)       # trainers that got no model sit out
            ids, arrival = ids[reached], arrival[:, reached]
            self.timeouts += len(self.agg_ids) * len(trainers.skipped)
            if len(ids) == 0:
                self.bytes_up += sent * exp.message_bytes
                self._traffic(*feeds, received=False)
                self._wait(t0)
                return
            self._traffic(*feeds)
            start, first = arrival.min(axis=0), arrival.argmin(axis=0)     # the model each trains from

            def rows_at(at: np.ndarray) -> torch.Tensor:
                return self.aggregates[torch.from_numpy(first[at])]
        result = self._train(rows_at, ids, r)
        adv = exp.adversary
        if adv is not None and adv.model_attack:         # Byzantine trainers craft their upload
            rows = rows_at(np.arange(len(ids)))
            updates = result.params - rows
            crafted = adv.corrupt(updates, torch.zeros_like(updates[0]), adv.byzantine[ids], r)
            result = TrainResult(rows + crafted, result.samples, result.steps, result.loss)
        self.train_loss = float(result.loss.mean())
        self.node_steps += int(result.steps.sum())
        self.participants = len(ids)
        compute = exp.system.compute_s(ids, result.samples)
        if exp.faults is not None and exp.faults.enabled:
            compute = compute * exp.faults.slowdown(r, ids)
        done = start + compute
        sent += self._upload(view, ids, done, result, seed, r)
        self.bytes_up += sent * exp.message_bytes
        self.bytes_down += sent * exp.message_bytes
        self.total_timeouts += self.timeouts

    def _train(self, rows_at: Callable[[np.ndarray], torch.Tensor], ids: np.ndarray, r: int) -> TrainResult:
        """The round's trainers ``ids`` train (one batched call) from their start models,
        ``rows_at(positions)`` (made only for the trainers that train here: on ranks, the own)."""
        rows = rows_at(np.arange(len(ids)))
        with self.timer("train_s"):         # gathered rows of their own train in place (no copy)
            return self.exp.trainer.train(rows, ids, r, inplace=rows.stride(0) != 0)

    def _upload(self, view: np.ndarray, ids: np.ndarray, done: np.ndarray, result: TrainResult,
                seed: int, r: int) -> int:
        """Trainers find the round's aggregators (the first responsive of round ``r + 1``'s
        ranking) and send them their models; each aggregator averages its first arrivals.
        Returns the number of model messages sent."""
        algo = self.algorithm
        t1 = float(done.min())
        alive = self.exp.online(t1)
        delivering = alive[ids]                              # trainers gone by now deliver nothing
        ranked = protocol.aggregators(np.flatnonzero(view), seed, r)
        aggs = probe(ranked, alive[ranked], algo.aggregators)
        self.timeouts += int(delivering.sum()) * len(aggs.skipped)
        if len(aggs.chosen) == 0 or not delivering.any():
            self._wait(t1)
            return 0
        arrival = np.full((len(aggs.chosen), len(ids)), np.inf)
        arrival[:, delivering] = self._fan_out(ids[delivering], done[delivering], aggs).T
        sent = int(np.isfinite(arrival).sum() - np.isin(ids[delivering], aggs.chosen).sum())
        self._traffic(ids, aggs.chosen, (np.isfinite(arrival) & (aggs.chosen[:, None] != ids[None, :])).T)
        arrival = self._network_faults(arrival.T, ids, aggs.chosen, 2 * r + 1).T
        if not np.isfinite(arrival).any():
            self._wait(t1)
            return sent
        q = algo.quorum(len(ids))
        mask = quorum_mask(arrival, q)
        weights = torch.from_numpy(mask).to(torch.float64) * algo.model_weights(result.samples)
        with self.timer("communicate_s"):
            self.aggregates = aggregate(result.params, weights)
        last = np.where(mask, arrival, -np.inf).max(axis=1)
        short = mask.sum(axis=1) < q                         # waited a timeout for models that never came
        self.agg_ready = last + np.where(short, algo.timeout_s, 0.0)
        self.agg_ids, self.num_aggregators = aggs.chosen, len(aggs.chosen)
        self.sim_time = float(self.agg_ready.min())
        return sent

    def _traffic(self, senders: np.ndarray, receivers: np.ndarray, sent: np.ndarray,
                 received: bool = True) -> None:
        """Per-node bytes of the model messages ``sent[s, r]`` from ``senders[s]`` to
        ``receivers[r]`` (copies to oneself excluded), counted like the byte totals."""
        nbytes = self.exp.message_bytes
        np.add.at(self.node_bytes, senders, sent.sum(axis=1) * nbytes)
        if received:
            np.add.at(self.node_bytes, receivers, sent.sum(axis=0) * nbytes)

    def _network_faults(self, arrival: np.ndarray, senders: np.ndarray, receivers: np.ndarray,
                        key: int) -> np.ndarray:
        """Arrival times ``[senders, receivers]`` after message loss (never arrives), delay
        spikes and partitions (not sent across); a node's copy to itself is never affected."""
        faults = self.exp.faults
        if faults is None or not faults.enabled:
            return arrival
        src = np.broadcast_to(senders[:, None], arrival.shape).ravel()
        dst = np.broadcast_to(receivers[None, :], arrival.shape).ravel()
        remote = src != dst
        gone = (faults.lost(key, src, dst) | ~faults.connected(self.sim_time, src, dst)) & remote
        delay = np.where(remote, faults.extra_delay(key, src, dst), 0.0)
        return np.where(gone.reshape(arrival.shape), np.inf, arrival + delay.reshape(arrival.shape))

    def evaluate(self) -> dict[str, Any]:
        with self.timer("eval_s"):
            acc, loss = self.exp.evaluator.evaluate(self.aggregates[:1])
        row = self.base_row()
        row.update(test_accuracy=float(acc[0]), test_loss=float(loss[0]),
                   participants=self.participants, aggregators=self.num_aggregators,
                   timeouts=self.timeouts, view_size=int(self.view.sum()),
                   **dl_metrics.node_bytes_row(self.node_bytes))
        return row

    def global_params(self) -> torch.Tensor:
        """The first aggregator's (in rank order) model of the last round ``[P]``."""
        return self.aggregates[0]

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(view=torch.from_numpy(self.view.copy()), aggregates=self.aggregates,
                     agg_ids=torch.from_numpy(self.agg_ids.copy()),
                     agg_ready=torch.from_numpy(self.agg_ready.copy()),
                     node_bytes=torch.from_numpy(self.node_bytes.copy()),
                     counters=[self.participants, self.num_aggregators, self.timeouts,
                               self.total_timeouts, self.stalled_rounds])
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.view = state["view"].numpy().copy()
        self.aggregates = state["aggregates"].to(self.device, copy=True)   # loaded on the host
        self.agg_ids = state["agg_ids"].numpy().copy()
        self.agg_ready = state["agg_ready"].numpy().copy()
        if "node_bytes" in state:
            self.node_bytes = state["node_bytes"].numpy().copy()
        (self.participants, self.num_aggregators, self.timeouts, self.total_timeouts,
         self.stalled_rounds) = (int(v) for v in state["counters"])

    def summary(self) -> dict[str, Any]:
        algo = self.algorithm
        return {"sample_size": algo.sample_size, "aggregators": algo.aggregators,
                "quorum": algo.quorum(), "timeouts_total": self.total_timeouts,
                "stalled_rounds": self.stalled_rounds,
                "mean_bytes_per_node": float(self.node_bytes.mean()),
                "max_bytes_per_node": int(self.node_bytes.max())}
