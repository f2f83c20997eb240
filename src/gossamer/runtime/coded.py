"""Gradient coding (``gradient_coding``, pattern ``coded``) on real processes: the executor of
``protocols/coding.py``.

The synchronous coordinator's rounds with every worker selected and the round closing at the
first ``n - s`` uploads (the protocol's ``wanted``): the stragglers are whoever is slowest for
real, and their late uploads are refused as late, not hostile. Each worker holds the ``s + 1``
partitions its row of the code names (node ``j``'s shard is partition ``j``), computes their
full-shard gradients at the task's model and uploads one coded vector, ``B[i] . (w * g)``, as
raw little-endian bytes: float32 for the fractional repetition code, float64 for the cyclic one
(its real coefficients are badly conditioned). The coordinator checks the byte count and that
every value is finite, decodes the exact full gradient from the arrivals and takes the
algorithm's server step (``protocols.coding.encode``/``decode``, the simulator's own: with the
fractional code a real run equals the simulator round by round whichever workers straggle). A
round needs ``n - s`` uploads (or ``runtime.min_participants``, if more): fewer cannot decode.

Not on real processes yet (refused in one line): ``sequential_gradient_coding``, whose
reattempting workers recompute a task of ``B`` rounds before at the model of that round.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from gossamer.config import ConfigError
from gossamer.protocols.coding import build_code, decode, encode, refuse_unsupported
from gossamer.protocols.sync_fl import SyncRound
from gossamer.runtime.codec import KIND_ENCODED, WireError
from gossamer.runtime.common import RunFailed
from gossamer.runtime.fl_client import Client
from gossamer.runtime.fl_server import COLUMNS, Coordinator

_WIRE = {"fractional": (np.dtype("<f4"), torch.float32), "cyclic": (np.dtype("<f8"), torch.float64)}


def check_config(cfg) -> None:
    """One-line refusals of what the config alone shows (the launcher runs this first)."""
    if cfg.algorithm.name == "sequential_gradient_coding":
        raise ConfigError("algorithm.name", "sequential_gradient_coding runs in the simulator only so "
                          "far (a reattempting worker recomputes a task at the model of B rounds "
                          "before); real processes run gradient_coding")


class _Coded:
    """What both sides derive from the config: the code, the partitions' weights, the wire."""

    def _init_code(self) -> None:
        refuse_unsupported(self.exp)
        check_config(self.cfg)
        algo, exp = self.algorithm, self.exp
        self.code = build_code(algo, exp.num_nodes, self.cfg.seed)
        self.partition_weights = torch.from_numpy(algo.partition_weights(exp.trainer.sizes.astype(np.int64)))
        self.wire, self.message_dtype = _WIRE[algo.code]


class CodedCoordinator(_Coded, Coordinator):
    """The server of ``gradient_coding``: every worker a round, decoded from the first ``n - s``."""

    pattern = "coded"
    columns = COLUMNS + ["waited", "stragglers", "load", "decode_residual"]
    check_config = staticmethod(check_config)

    def _init_pipeline(self) -> None:
        super()._init_pipeline()
        self._init_code()
        self.upload_kind = KIND_ENCODED
        self.upload_numel = self.numel                 # (bounds the bytes: 8 a value at most)
        self.waited = self.stragglers = 0
        self.residual = 0.0

    def _init_state(self):
        return self.algorithm.init_state(self.exp.init_params.reshape(-1))

    def _payload(self) -> torch.Tensor:
        return self.state.params

    def _quorum(self) -> tuple[int, str]:
        need, what = super()._quorum()
        decodable = self.exp.num_nodes - self.algorithm.code_s
        return (need, what) if need > decodable else (decodable, "the n - s uploads gradient coding decodes from")

    def _open(self, r: int, candidates: np.ndarray) -> SyncRound:
        rnd = super()._open(r, candidates)            # every worker (the algorithm selects all)
        rnd.wanted = min(len(rnd.selected), self._quorum()[0])
        return rnd

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
        arrived = np.array(sorted(received), dtype=np.int64)
        coded = torch.stack([received[int(i)][0] for i in arrived])
        try:
            gradient, self.residual = decode(self.code, arrived, coded)
        except ValueError as exc:          # (the quorum is n - s, and any n - s decode)
            raise RunFailed(f"round {r}: {exc}") from None
        self.state = self.algorithm.step(self.state, gradient.to(self.state.params.dtype))
        self.waited = self.participants = len(arrived)
        self.stragglers = self.exp.num_nodes - len(arrived)

    def _evaluate(self, r: int, start: float) -> dict[str, Any]:
        acc, loss = self.exp.evaluator.evaluate(self.state.params.reshape(1, -1))
        return {"round": r, "sim_time_s": self.elapsed_before + time.monotonic() - start,
                "bytes_up": self.bytes_up, "bytes_down": self.bytes_down,
                "test_accuracy": float(acc[0]), "test_loss": float(loss[0]),
                "participants": getattr(self, "participants", 0), "waited": self.waited,
                "stragglers": self.stragglers, "load": self.algorithm.load, "decode_residual": self.residual}


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
