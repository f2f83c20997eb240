"""Synchronous zeroth-order FL rounds (see :mod:`gossamer.algorithms.fl.zo`).

A round: select, download (the model, or the scalars of the rounds a client missed), every
selected client's ``2 K`` forward passes in batched stacked forwards, upload of ``K``
scalars, and the server's update regenerated from the seeds. Directions are generated
from their keys on both sides; the server's update never reads the clients' directions.

Simulated time: a forward pass is charged one third of a training sample (forward plus
backward is about three forwards), so a client's compute is ``2 K n / 3`` sample times.
Replaying missed rounds (``broadcast: scalars``) is not charged. ``bytes_down_model`` counts
what broadcasting the model to the same clients would have cost, whichever mode runs.
Refused in one line: faults, model attacks, differential privacy, independent inits and
local-training options the zeroth-order step does not use.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from gossamer import wire
from gossamer.protocols.accounting import FLAccounting
from gossamer.protocols.sync_fl import SyncRound
from gossamer.protocols.zo_fl import ScalarRelay, estimate, refuse_unsupported
from gossamer.sim.drivers.base import Driver, _to_numpy, _to_tensor
from gossamer.sim.experiment import Experiment


class ZOFLDriver(Driver):
    """Runs :class:`~gossamer.algorithms.fl.zo.ZOFedAvg`."""

    columns = Driver.columns + ["participants", "bytes_down_model"]

    def __init__(self, exp: Experiment) -> None:
        refuse_unsupported(exp)
        super().__init__(exp)
        self.algorithm = exp.algorithm
        self.params = exp.init_params.reshape(-1).clone()
        self.has_data = exp.trainer.sizes > 0
        self.participants = 0
        self.model_bytes = wire.encoded_size(exp.spec.numel)
        self.up_bytes = self.algorithm.upload_bytes()
        self.bytes_down_model = 0
        self.relay = ScalarRelay(exp.num_nodes, self.model_bytes, self.algorithm.broadcast)
        self.accounting = FLAccounting(exp.num_nodes)

    # --- one round ---------------------------------------------------------------------------
    def run_round(self) -> None:
        exp, algo, system = self.exp, self.algorithm, self.exp.system
        r, seed = self.round + 1, exp.cfg.seed
        candidates = np.flatnonzero(exp.online(self.sim_time) & self.has_data)
        ids = SyncRound(algo, seed, r, candidates).selected           # protocols/sync_fl.py
        self.participants = len(ids)
        if len(ids) == 0:
            self._idle_round(r)
            return
        down = self.relay.download_bytes(ids, r)                     # protocols/zo_fl.py
        m, k = len(ids), algo.perturbations
        idx, valid = exp.trainer.batches(ids, np.full(m, r, dtype=np.int64), np.full(m, k))
        with self.timer("train_s"):
            g, loss = self._estimate(algo.direction_keys(r, ids), idx.reshape(m * k, -1),
                                     valid.reshape(m * k, -1))
        scalars = algo.decode(algo.encode(g.view(m, k), seed, r, ids))
        with self.timer("communicate_s"):
            self.params = algo.server_update(self.params, scalars, ids, r, seed, exp.cfg.local.lr)
        self.relay.relay(algo.record_bytes(m))
        samples = valid.sum(axis=(1, 2))
        arrival = (system.download_s(ids, down) + system.compute_s(ids, 2.0 * samples / 3.0)
                   + system.upload_s(ids, self.up_bytes))
        round_s = float(arrival.max())
        sent_down, sent_up = int(down.sum()), m * self.up_bytes
        self.bytes_down += sent_down
        self.bytes_up += sent_up
        self.bytes_down_model += m * self.model_bytes
        acc = self.accounting
        acc.download(ids, down)
        acc.upload(ids, self.up_bytes)
        acc.completed(ids)
        acc.accepted(np.zeros(m, dtype=np.int64))
        acc.client_idle_s[ids] += round_s - arrival
        self.sim_time += round_s + system.server_fanout_s(sent_down) + system.server_fanout_s(sent_up)
        self.train_loss = float(loss.view(m, k).mean())
        self.node_steps += m
        self.round = r

    def _estimate(self, keys: np.ndarray, idx: np.ndarray, valid: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return estimate(self.algorithm, self.exp.trainer, self.exp.cfg.seed, self.params, keys, idx, valid)

    def _idle_round(self, r: int) -> None:
        """Nobody to train: wait for the next node to come online."""
        avail = self.exp.availability
        nxt = avail.next_switch.min() if avail.model != "always" else np.inf
        if np.isfinite(nxt):
            self.accounting.server_idle(max(0.0, float(nxt) - self.sim_time))
            self.sim_time = float(max(self.sim_time, nxt))
        self.relay.relay(0)
        self.round = r

    # --- metrics and checkpoints ---------------------------------------------------------------
    def evaluate(self) -> dict[str, Any]:
        with self.timer("eval_s"):
            acc, loss = self.exp.evaluator.evaluate(self.params.reshape(1, -1))
        row = self.base_row()
        row.update(test_accuracy=float(acc[0]), test_loss=float(loss[0]),
                   participants=self.participants, bytes_down_model=self.bytes_down_model)
        return row

    def summary(self) -> dict[str, Any]:
        return self.accounting.summary()

    def global_params(self) -> torch.Tensor:
        return self.params

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(params=self.params.clone(), participants=self.participants,
                     bytes_down_model=self.bytes_down_model,
                     **self.relay.state_dict(),
                     accounting=_to_tensor(self.accounting.state_dict()))
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.params = state["params"].to(self.device, copy=True)      # loaded on the host
        self.participants = int(state["participants"])
        self.bytes_down_model = int(state["bytes_down_model"])
        self.relay.load_state_dict(state)
        self.accounting.load_state_dict(_to_numpy(state["accounting"]))
