"""Gradient coding on the simulated clock: synchronous full-gradient descent that closes each
round without its stragglers (protocols/coding.py decides; algorithms/fl/gradient_coding.py).

A round: every worker downloads the model, computes the gradients of the ``s + 1`` partitions it
holds (``s + 1`` shards' samples times its seconds per sample, times a straggler's
``faults.stragglers`` factor) and uploads one coded vector; its arrival is download + compute +
upload (+ ``faults.delay_spikes``). Classic gradient coding closes the round at the ``n - s``-th
arrival and decodes that round's gradient; the selective-reattempt scheme closes it at the
earliest arrival its straggler model allows and decodes the gradient started ``B`` rounds before
(the coded vectors of a job are kept until it is decoded; a reattempting worker recomputes its
task of that job at the model it downloaded then). Workers not waited for are told to stop:
their uploads are not sent. Bytes: the model down to every worker, one coded vector up from each
worker waited for (float32 for the fractional repetition code, float64 for the cyclic one).
Placing each worker's ``s + 1`` partitions on it before training is not simulated.
Refused in one line: faults other than stragglers and delay spikes, availability other than
``always``, model attacks, differential privacy, secure aggregation, compression, independent
inits, local-training options (workers take full-shard gradients; the step is the server's).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from gossamer import wire
from gossamer.algorithms.fl.fedavg import ServerState
from gossamer.algorithms.fl.gradient_coding import SequentialGradientCoding
from gossamer.protocols.coding import (
    SelectiveReattempt,
    build_code,
    decode,
    encode,
    first_arrivals,
    refuse_unsupported,
)
from gossamer.sim.drivers.base import Driver, _to_numpy, _to_tensor
from gossamer.sim.experiment import Experiment


class CodedDriver(Driver):
    """Runs :class:`GradientCoding` and :class:`SequentialGradientCoding`."""

    columns = Driver.columns + ["job", "waited", "stragglers", "reattempts", "load", "decode_residual"]

    def __init__(self, exp: Experiment) -> None:
        refuse_unsupported(exp)
        super().__init__(exp)
        self.algorithm = algo = exp.algorithm
        n, numel = exp.num_nodes, exp.spec.numel
        self.workers = np.arange(n)
        self.code = build_code(algo, n, exp.cfg.seed)
        sizes = exp.trainer.sizes.astype(np.int64)
        self.weights = torch.from_numpy(algo.partition_weights(sizes)).to(self.device)
        self.task_samples = np.array([sizes[p].sum() for p in self.code.partitions()], dtype=np.float64)
        self.message_dtype = torch.float32 if algo.code == "fractional" else torch.float64
        self.up_bytes = wire.encoded_size(numel, self.message_dtype)
        self.down_bytes = wire.encoded_size(numel)
        self.state: ServerState = algo.init_state(exp.init_params.reshape(-1))
        self.scheme: SelectiveReattempt | None = None
        self.pending: torch.Tensor | None = None    # coded vectors of jobs r - B .. r, by job % (B + 1)
        if isinstance(algo, SequentialGradientCoding):
            self.scheme = SelectiveReattempt(n, algo.burst, algo.window, algo.stragglers)
            self.pending = torch.zeros(algo.burst + 1, n, numel, dtype=self.message_dtype, device=self.device)
        # this round's metrics and the run's totals
        self.job, self.waited, self.stragglers, self.reattempts = 0, 0, 0, 0
        self.residual = 0.0
        self.max_residual = 0.0
        self.skipped = 0                         # worker-rounds closed without waiting for them
        self.waited_for_all = 0                  # rounds that waited for every worker

    # --- one round ---------------------------------------------------------------------------
    def run_round(self) -> None:
        exp, algo, system, faults = self.exp, self.algorithm, self.exp.system, self.exp.faults
        r, n = self.round + 1, len(self.workers)
        with self.timer("train_s"):
            coded = self._encode()
        jobs = self.scheme.tasks(r) if self.scheme is not None else np.full(n, r, dtype=np.int64)
        compute_s = system.compute_s(self.workers, self.task_samples)
        down_s = system.download_s(self.workers, self.down_bytes)
        up_s = system.upload_s(self.workers, self.up_bytes)
        if faults.enabled:                       # 2r: downlink, 2r+1: uplink, as in sync FL
            server = np.full(n, exp.num_nodes)
            compute_s = compute_s * faults.slowdown(r, self.workers)
            down_s = down_s + faults.extra_delay(2 * r, server, self.workers)
            up_s = up_s + faults.extra_delay(2 * r + 1, self.workers, server)
        arrival = down_s + compute_s + up_s
        with self.timer("communicate_s"):
            if self.scheme is None:
                arrived, round_s = first_arrivals(arrival, n - algo.code_s)
                got = np.zeros(n, dtype=bool)
                got[arrived] = True
                self.job, self.reattempts = r, 0
                self._decode(coded, arrived)
            else:
                slot = r % (algo.burst + 1)
                self.pending[slot] = coded
                closing = self.scheme.close(r, jobs, arrival)
                round_s, got = closing.round_s, ~closing.stragglers
                self.job, self.reattempts = closing.job, int((jobs != r).sum())
                if closing.job >= 1:
                    self._decode(self.pending[closing.job % (algo.burst + 1)], closing.contributors)
                else:
                    self.residual = 0.0
        self.waited, self.stragglers = int(got.sum()), int(n - got.sum())
        self.skipped += self.stragglers
        self.waited_for_all += int(self.stragglers == 0)
        sent_down, sent_up = n * self.down_bytes, self.waited * self.up_bytes
        self.bytes_down += sent_down
        self.bytes_up += sent_up
        self.node_steps += n
        self.sim_time += round_s + system.server_fanout_s(sent_down) + system.server_fanout_s(sent_up)
        self.round = r

    def _encode(self) -> torch.Tensor:
        """Every worker's coded vector ``B[i] . (w * g)`` ``[n, P]`` for a job at the current
        model (in the message dtype), from the partitions' full-shard gradients."""
        params = self.state.params
        grads, losses = self.exp.trainer.full_gradient(params.expand(len(self.workers), -1), self.workers)
        self.train_loss = float(self.weights @ losses.double())
        support = np.stack(self.code.partitions())                      # [n, s + 1]
        return encode(self.code, self.workers, self.weights, grads[torch.from_numpy(support)]).to(self.message_dtype)

    def _decode(self, coded: torch.Tensor, arrived: np.ndarray) -> None:
        """The full gradient from the coded vectors of ``arrived``; the server's step on it."""
        index = torch.from_numpy(np.asarray(arrived, dtype=np.int64))
        gradient, self.residual = decode(self.code, arrived, coded[index])
        self.max_residual = max(self.max_residual, self.residual)
        self.state = self.algorithm.step(self.state, gradient.to(self.state.params.dtype))

    # --- metrics and checkpoints ---------------------------------------------------------------
    def evaluate(self) -> dict[str, Any]:
        with self.timer("eval_s"):
            acc, loss = self.exp.evaluator.evaluate(self.state.params.reshape(1, -1))
        row = self.base_row()
        row.update(test_accuracy=float(acc[0]), test_loss=float(loss[0]), job=self.job,
                   waited=self.waited, stragglers=self.stragglers, reattempts=self.reattempts,
                   load=self.algorithm.load, decode_residual=self.residual)
        return row

    def summary(self) -> dict[str, Any]:
        algo = self.algorithm
        total = float(self.exp.trainer.sizes.sum())
        tolerated = algo.stragglers if isinstance(algo, SequentialGradientCoding) else algo.code_s
        return {"coded": {"code": algo.code, "s": algo.code_s, "stragglers_tolerated": tolerated,
                          "partitions_per_worker": algo.load, "delay_rounds": algo.delay,
                          "compute_overhead": float(self.task_samples.sum()) / total,
                          "worker_rounds_not_waited_for": self.skipped,
                          "rounds_waiting_for_all": self.waited_for_all,
                          "max_decode_residual": self.max_residual}}

    def global_params(self) -> torch.Tensor:
        return self.state.params

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(params=self.state.params.clone(), server_round=self.state.round,
                     server_extra={k: v.clone() for k, v in self.state.extra.items()},
                     pending=None if self.pending is None else self.pending.clone(),
                     scheme=None if self.scheme is None else _to_tensor(self.scheme.state_dict()),
                     job=self.job, waited=self.waited, stragglers=self.stragglers,
                     reattempts=self.reattempts, residual=self.residual,
                     max_residual=self.max_residual, skipped=self.skipped,
                     waited_for_all=self.waited_for_all)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        dev = self.device                      # checkpoints load on the host
        self.state = ServerState(state["params"].to(dev, copy=True), int(state["server_round"]),
                                 {k: v.to(dev, copy=True) for k, v in state["server_extra"].items()})
        if self.scheme is not None:
            self.pending = state["pending"].to(dev, copy=True)
            self.scheme.load_state_dict(_to_numpy(state["scheme"]))
        self.job, self.waited = int(state["job"]), int(state["waited"])
        self.stragglers, self.reattempts = int(state["stragglers"]), int(state["reattempts"])
        self.residual, self.max_residual = float(state["residual"]), float(state["max_residual"])
        self.skipped, self.waited_for_all = int(state["skipped"]), int(state["waited_for_all"])
