"""Gradient coding (pattern ``coded``) on real processes: the executor of ``protocols/coding.py``.

The synchronous coordinator's rounds with every worker selected; the stragglers are whoever is
slowest for real, and their late uploads are refused as late, not hostile. Each worker holds the
``s + 1`` partitions its row of the code names (node ``j``'s shard is partition ``j``), computes
their full-shard gradients at its task's model and uploads one coded vector, ``B[i] . (w * g)``,
as raw little-endian bytes: float32 for the fractional repetition code, float64 for the cyclic
one (its real coefficients are badly conditioned). The coordinator checks the byte count and
that every value is finite, decodes the exact full gradient and takes the algorithm's server
step (``protocols.coding.encode``/``decode``, the simulator's own: with the fractional code a
real run equals the simulator round by round whichever workers straggle).

- ``gradient_coding``: a round closes at the first ``n - s`` uploads (``SyncRound.wanted``) and
  needs them (or ``runtime.min_participants``, if more): fewer cannot decode.
- ``sequential_gradient_coding`` (the selective-reattempt scheme): the server keeps the models
  of the last ``B`` rounds; a worker the scheme tells to reattempt gets the model of job
  ``r - B`` as its task (``SelectiveReattempt.tasks``), and the round closes at the first
  arrival after which the straggler model holds and job ``r - B`` decodes
  (``SelectiveReattempt.ready``, which the simulator's ``close`` replays on simulated arrival
  times). A pattern outside the model waits for everyone: a worker gone for good fails the run
  after ``runtime.quorum_timeout_s`` (exit 3), as the scheme cannot decode without it.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from gossamer.algorithms.fl.fedavg import ServerState
from gossamer.algorithms.fl.gradient_coding import SequentialGradientCoding
from gossamer.protocols.coding import (
    SelectiveReattempt,
    build_code,
    decode,
    encode,
    refuse_unsupported,
)
from gossamer.protocols.sync_fl import SyncRound
from gossamer.runtime.codec import KIND_ENCODED, WireError, state_hash
from gossamer.runtime.common import RunFailed
from gossamer.runtime.fl_client import Client
from gossamer.runtime.fl_server import COLUMNS, Coordinator, RoundState

_WIRE = {"fractional": (np.dtype("<f4"), torch.float32), "cyclic": (np.dtype("<f8"), torch.float64)}


class _Coded:
    """What both sides derive from the config: the code, the partitions' weights, the wire."""

    def _init_code(self) -> None:
        refuse_unsupported(self.exp)
        algo, exp = self.algorithm, self.exp
        self.code = build_code(algo, exp.num_nodes, self.cfg.seed)
        self.partition_weights = torch.from_numpy(algo.partition_weights(exp.trainer.sizes.astype(np.int64)))
        self.wire, self.message_dtype = _WIRE[algo.code]


class CodedCoordinator(_Coded, Coordinator):
    """The server of gradient coding: every worker a round, the exact gradient decoded without
    the stragglers."""

    pattern = "coded"
    columns = COLUMNS + ["job", "waited", "stragglers", "reattempts", "load", "decode_residual"]

    def _init_pipeline(self) -> None:
        super()._init_pipeline()
        self._init_code()
        algo, n = self.algorithm, self.exp.num_nodes
        self.upload_kind = KIND_ENCODED
        self.upload_numel = self.numel                 # (bounds the bytes: 8 a value at most)
        self.job = self.waited = self.stragglers = self.reattempts = 0
        self.residual = 0.0
        self.scheme: SelectiveReattempt | None = None
        self.jobs = np.zeros(n, dtype=np.int64)        # each worker's job this round
        self.models: dict[int, torch.Tensor] = {}      # the sequential scheme: job -> its model
        self.pending: dict[int, dict[int, torch.Tensor]] = {}   # job -> worker -> coded vector
        if isinstance(algo, SequentialGradientCoding):
            self.scheme = SelectiveReattempt(n, algo.burst, algo.window, algo.stragglers)

    def _init_state(self):
        return self.algorithm.init_state(self.exp.init_params.reshape(-1))

    def _payload(self) -> torch.Tensor:
        return self.state.params

    def _quorum(self) -> tuple[int, str]:
        need, what = super()._quorum()
        n, algo = self.exp.num_nodes, self.algorithm
        least, why = ((n - algo.stragglers, "the n - lambda uploads the straggler model allows")
                      if self.scheme is not None else (n - algo.code_s, "the n - s uploads gradient coding decodes from"))
        return (need, what) if need > least else (least, why)

    def _open(self, r: int, candidates: np.ndarray) -> SyncRound:
        rnd = super()._open(r, candidates)            # every worker (the algorithm selects all)
        if self.scheme is None:
            rnd.wanted = min(len(rnd.selected), self._quorum()[0])
            return rnd
        self.jobs = self.scheme.tasks(r)              # r, or r - B for a reattempt
        self.models = {j: m for j, m in self.models.items() if j > r - self.algorithm.burst - 1}
        self.models[r] = self.state.params.clone()
        return rnd

    def _late(self, received) -> np.ndarray:
        late = np.ones(self.exp.num_nodes, dtype=bool)
        late[np.fromiter(received, dtype=np.int64, count=len(received))] = False
        return late

    def _closes(self, cur: RoundState, need: int) -> bool:
        if self.scheme is None:
            return super()._closes(cur, need)
        return self.scheme.ready(cur.number, self.jobs, self._late(cur.received)) or not cur.open()

    def _enough(self, r: int, received: dict) -> bool:
        if self.scheme is None:
            return super()._enough(r, received)
        return self.scheme.ready(r, self.jobs, self._late(received))

    def _task_frames(self, node: int) -> tuple[list[bytes], bytes]:
        """The frames and hash of ``node``'s task (lock held): the round's model, or with the
        sequential scheme the model of the job it works on (made once a round per job)."""
        if self.scheme is None:
            return super()._task_frames(node)
        cur, job = self.current, int(self.jobs[node])
        if job not in cur.node_frames:
            model = self.models[job]
            cur.node_frames[job] = (self._model_task_frames(model, cur.number), state_hash(model))
        return cur.node_frames[job]

    def _decode(self, node: int, round_: int, tensor: torch.Tensor) -> tuple[torch.Tensor, None]:
        """A worker's coded vector from its bytes, or WireError."""
        if tensor.numel() != self.numel * self.wire.itemsize:
            raise WireError(f"{tensor.numel()} bytes where a coded vector of {self.numel} values of "
                            f"{self.wire.itemsize} bytes is expected")
        values = torch.from_numpy(np.frombuffer(tensor.numpy().tobytes(), dtype=self.wire).copy())
        if not bool(torch.isfinite(values).all()):
            raise WireError("a coded value is not finite")
        return values, None

    def _aggregate(self, r: int, received: dict[int, tuple[torch.Tensor, int]]) -> None:
        n = self.exp.num_nodes
        if self.scheme is None:
            job, contributors = r, np.array(sorted(received), dtype=np.int64)
            vectors = {int(i): received[int(i)][0] for i in contributors}
        else:
            closing = self.scheme.commit(r, self.jobs, self._late(received))
            for i, (vector, _) in received.items():
                self.pending.setdefault(int(self.jobs[i]), {})[int(i)] = vector
            job, contributors = closing.job, closing.contributors
            vectors = self.pending.pop(job, {})
            self.pending = {j: v for j, v in self.pending.items() if j > r - self.algorithm.burst}
        state, self.residual = self.state, 0.0
        if job >= 1:
            try:
                gradient, self.residual = decode(self.code, contributors,
                                                 torch.stack([vectors[int(i)] for i in contributors]))
            except ValueError as exc:          # (the rounds close only where it decodes)
                raise RunFailed(f"round {r}: {exc}") from None
            state = self.algorithm.step(state, gradient.to(state.params.dtype))
        self.state = ServerState(state.params, r, state.extra)        # (no step before job 1)
        self.job, self.waited = job, len(received)
        self.participants, self.stragglers = len(received), n - len(received)
        self.reattempts = int((self.jobs != r).sum()) if self.scheme is not None else 0

    def _evaluate(self, r: int, start: float) -> dict[str, Any]:
        acc, loss = self.exp.evaluator.evaluate(self.state.params.reshape(1, -1))
        return {"round": r, "sim_time_s": self.elapsed_before + time.monotonic() - start,
                "bytes_up": self.bytes_up, "bytes_down": self.bytes_down,
                "test_accuracy": float(acc[0]), "test_loss": float(loss[0]),
                "participants": getattr(self, "participants", 0), "job": self.job, "waited": self.waited,
                "stragglers": self.stragglers, "reattempts": self.reattempts, "load": self.algorithm.load,
                "decode_residual": self.residual}

    def _checkpoint_state(self, start: float) -> dict[str, Any]:
        state = super()._checkpoint_state(start)
        if self.scheme is not None:          # the scheme's memory, the recent models, held tasks
            held = [(j, i, v) for j, vs in sorted(self.pending.items()) for i, v in sorted(vs.items())]
            state["coded"] = {
                "scheme": {k: torch.as_tensor(v) for k, v in self.scheme.state_dict().items()},
                "models": {str(j): m for j, m in self.models.items()},
                "held": torch.tensor([(j, i) for j, i, _ in held], dtype=torch.int64).reshape(-1, 2),
                "vectors": torch.stack([v for _, _, v in held]) if held else torch.zeros(0, self.numel)}
        return state

    def _restore_state(self, state: dict[str, Any]) -> None:
        saved = state.get("coded")
        if self.scheme is None or saved is None:
            return
        self.scheme.load_state_dict({k: v.numpy() if v.dim() else int(v) for k, v in saved["scheme"].items()})
        self.models = {int(j): m for j, m in saved["models"].items()}
        self.pending = {}
        for (j, i), vector in zip(saved["held"].tolist(), saved["vectors"], strict=True):
            self.pending.setdefault(j, {})[i] = vector


class CodedClient(_Coded, Client):
    """A gradient-coding worker: its partitions' gradients at the task's model, one coded vector up."""

    def __init__(self, cfg, node_id: int, server: str | None = None) -> None:
        super().__init__(cfg, node_id, server)
        self._init_code()
        self.support = self.code.partitions()[node_id]
        # a full-shard gradient padded as the simulator's call over every worker pads it: as
        # wide as the largest shard (the same bits, whichever partitions a worker holds)
        self.exp.trainer.batch_width = "population"

    def _train_and_send(self, round_: int, start, steps: int = 0, expected: int = 0) -> None:
        self._die_if_asked(round_)
        params = start.reshape(-1)
        grads, _ = self.exp.trainer.full_gradient(params.expand(len(self.support), -1), self.support)
        coded = encode(self.code, np.array([self.node]), self.partition_weights, grads[None])[0]
        self._send(coded.to(self.message_dtype).numpy().tobytes(), round_, KIND_ENCODED)   # (little-endian hosts)
