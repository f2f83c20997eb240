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
    columns = Driver.columns + ["participants"]

    def __init__(self, exp: Experiment) -> None:
        super().__init__(exp)
        self.algorithm = exp.algorithm
        self.state: ServerState = self.algorithm.init_state(exp.init_params.reshape(-1))
        self.has_data = exp.trainer.sizes > 0
        self.participants = 0

    def run_round(self) -> None:
        exp, algo = self.exp, self.algorithm
        r = self.round + 1
        online = exp.availability.at(self.sim_time)
        candidates = np.flatnonzero(online & self.has_data)
        ids = algo.select(candidates, rng.generator(exp.cfg.seed, rng.STREAM_SELECT, r))
        self.participants = len(ids)
        if len(ids) == 0:                      # nobody to train: wait for the next node to come online
            self.sim_time = float(max(self.sim_time, exp.availability.next_switch.min()))
            self.state = ServerState(self.state.params, r, self.state.extra)
            self.round = r
            return
        start = self.state.params
        with self.timer("train_s"):
            result = exp.trainer.train(start.expand(len(ids), -1), ids, r)
            messages = algo.client_message(result.params, start)
        with self.timer("communicate_s"):
            self.state = algo.aggregate(self.state, messages, exp.trainer.sizes[ids])
        nbytes = exp.message_bytes
        self.bytes_down += len(ids) * nbytes
        self.bytes_up += len(ids) * nbytes
        client_s = (exp.system.download_s(ids, nbytes) + exp.system.compute_s(ids, result.samples)
                    + exp.system.upload_s(ids, nbytes))
        self.sim_time += float(client_s.max()) + 2 * exp.system.server_fanout_s(len(ids) * nbytes)
        self.train_loss = float(result.loss.mean())
        self.node_steps += int(result.steps.sum())
        self.round = r

    def evaluate(self) -> dict[str, Any]:
        with self.timer("eval_s"):
            acc, loss = self.exp.evaluator.evaluate(self.state.params.reshape(1, -1))
        row = self.base_row()
        row.update(test_accuracy=float(acc[0]), test_loss=float(loss[0]),
                   participants=self.participants)
        return row

    def global_params(self) -> torch.Tensor:
        return self.state.params

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(params=self.state.params, server_round=self.state.round,
                     server_extra=dict(self.state.extra), participants=self.participants)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.state = ServerState(state["params"], int(state["server_round"]), dict(state["server_extra"]))
        self.participants = int(state["participants"])
