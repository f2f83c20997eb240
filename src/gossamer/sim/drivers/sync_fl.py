"""Synchronous FL rounds: select, broadcast, train in one batched call, upload, aggregate.

A round lasts as long as its slowest selected client (download + compute + upload),
plus the server link's time to fan the model out and in when its bandwidth is set.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from gossamer import rng
from gossamer.algorithms.fl.fedavg import ServerState
from gossamer.sim.drivers.base import Driver
from gossamer.sim.experiment import Experiment


class SyncFLDriver(Driver):
    columns = Driver.columns + ["participants", "lost_messages"]

    def __init__(self, exp: Experiment) -> None:
        super().__init__(exp)
        self.algorithm = exp.algorithm
        self.state: ServerState = self.algorithm.init_state(exp.init_params.reshape(-1))
        self.has_data = exp.trainer.sizes > 0
        self.participants = 0
        self.lost = 0

    def _candidates(self) -> np.ndarray:
        online = self.exp.online(self.sim_time)
        if self.exp.faults.enabled:
            online &= self.exp.faults.server_reachable(self.sim_time)
        return np.flatnonzero(online & self.has_data)

    def _idle_round(self, r: int) -> None:
        """Nobody to train: wait for the next node to come online (or fault to end)."""
        nxt = self.exp.availability.next_switch.min() if self.exp.availability.model != "always" else np.inf
        if self.exp.faults.enabled:
            nxt = min(nxt, self.exp.faults.next_change())
        if np.isfinite(nxt):
            self.sim_time = float(max(self.sim_time, nxt))
        self.state = ServerState(self.state.params, r, self.state.extra)
        self.round = r

    def run_round(self) -> None:
        exp, algo, faults = self.exp, self.algorithm, self.exp.faults
        r = self.round + 1
        ids = algo.select(self._candidates(), rng.generator(exp.cfg.seed, rng.STREAM_SELECT, r))
        self.participants = len(ids)
        if len(ids) == 0:
            self._idle_round(r)
            return
        nbytes, server = exp.message_bytes, exp.num_nodes          # the server's id in fault keys
        down_s = exp.system.download_s(ids, nbytes)
        received = np.ones(len(ids), dtype=bool)
        if faults.enabled:                                          # 2r: downlink, 2r+1: uplink
            to = np.full(len(ids), server)
            received = ~faults.lost(2 * r, to, ids)
            down_s = down_s + faults.extra_delay(2 * r, to, ids)
        self.bytes_down += len(ids) * nbytes
        trained = ids[received]
        start = self.state.params
        client_s = down_s
        if len(trained):
            with self.timer("train_s"):
                result = exp.trainer.train(start.expand(len(trained), -1), trained, r)
                messages = algo.client_message(result.params, start)
                if exp.adversary.model_attack:
                    messages = exp.adversary.corrupt(messages, start, exp.adversary.byzantine[trained], r)
            compute_s = exp.system.compute_s(trained, result.samples)
            up_s = exp.system.upload_s(trained, nbytes)
            delivered = np.ones(len(trained), dtype=bool)
            if faults.enabled:
                compute_s = compute_s * faults.slowdown(r, trained)
                to = np.full(len(trained), server)
                delivered = ~faults.lost(2 * r + 1, trained, to)
                up_s = up_s + faults.extra_delay(2 * r + 1, trained, to)
            client_s = down_s[received] + compute_s + up_s
            self.bytes_up += len(trained) * nbytes
            keep = torch.from_numpy(delivered)
            with self.timer("communicate_s"):
                self.state = algo.aggregate(self.state, messages[keep], exp.trainer.sizes[trained[delivered]])
            self.lost += int((~received).sum() + (~delivered).sum())
            self.train_loss = float(result.loss.mean())
            self.node_steps += int(result.steps.sum())
        else:
            self.lost += len(ids)
            self.state = ServerState(self.state.params, r, self.state.extra)
        self.sim_time += float(client_s.max()) + 2 * exp.system.server_fanout_s(len(ids) * nbytes)
        self.round = r

    def evaluate(self) -> dict[str, Any]:
        with self.timer("eval_s"):
            acc, loss = self.exp.evaluator.evaluate(self.state.params.reshape(1, -1))
        row = self.base_row()
        row.update(test_accuracy=float(acc[0]), test_loss=float(loss[0]),
                   participants=self.participants, lost_messages=self.lost)
        return row

    def global_params(self) -> torch.Tensor:
        return self.state.params

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(params=self.state.params, server_round=self.state.round,
                     server_extra=dict(self.state.extra), participants=self.participants,
                     lost=self.lost)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.state = ServerState(state["params"], int(state["server_round"]), dict(state["server_extra"]))
        self.participants = int(state["participants"])
        self.lost = int(state.get("lost", 0))
