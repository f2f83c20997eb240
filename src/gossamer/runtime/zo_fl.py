"""Zeroth-order FL (``zo_fedavg``, pattern ``zo_fl``) on real processes.

The synchronous coordinator's rounds (selection, over-selection and deadlines, quorum,
checkpoints, resume) with the zeroth-order step of :mod:`gossamer.protocols.zo_fl`: a task
carries the model; a client evaluates ``2 K`` perturbed losses at it (the directions regenerated
from their keys, :func:`~gossamer.protocols.zo_fl.estimate`) and uploads its ``K`` scalars as
raw little-endian bytes, exactly ``K`` of ``algorithm.scalar_bytes`` each (float32, or int16 /
int8 codes with ``quantize_bits``); the server checks the count, the codes' range and
finiteness, decodes them (``algorithm.decode``) and takes the simulator's step
(``algorithm.server_update``). With the same config the metrics equal the simulator's round
by round (tests/runtime/test_zo_runtime.py).

``broadcast: scalars``: the coordinator keeps every round's contributors and decoded scalars;
a client keeps its model and says, in each task request (``last_round``), the round it holds.
Its task then carries the records of the rounds it missed (``protocols.zo_fl.relay_payload``),
or the model when that is smaller, and the hash of the round's model: the client replays the
server's updates (``protocols.zo_fl.replay``, which refuses malformed records), checks the
hash and only then keeps the result.
"""

from __future__ import annotations

import numpy as np
import torch

from gossamer.algorithms.fl.fedavg import ServerState
from gossamer.config import ConfigError
from gossamer.protocols.zo_fl import estimate, refuse_unsupported, relay_payload, replay
from gossamer.runtime import schema
from gossamer.runtime.codec import (
    KIND_ENCODED,
    WireError,
    bytes_frames,
    parse,
    read_model,
    state_hash,
)
from gossamer.runtime.fl_client import Client
from gossamer.runtime.fl_server import Coordinator

_WIRE = {4: np.dtype("<f4"), 2: np.dtype("<i2"), 1: np.dtype("i1")}   # scalar bytes -> dtype


def check_config(cfg) -> None:
    """One-line refusals of what the config alone shows (the launcher calls this before
    starting any process)."""
    from gossamer.algorithms import ALGORITHMS

    algo = ALGORITHMS.get(cfg.algorithm.name).from_params(cfg.algorithm.params)
    comp = cfg.compression
    if comp.uplink is not None or comp.downlink is not None or cfg.privacy.secure_aggregation is not None:
        field = ("compression.uplink" if comp.uplink is not None else "compression.downlink"
                 if comp.downlink is not None else "privacy.secure_aggregation")
        raise ConfigError(field, f"{cfg.algorithm.name} uploads {algo.perturbations} scalars; "
                          "compression and secure aggregation do not apply")


def _check(cfg, exp) -> None:
    check_config(cfg)
    refuse_unsupported(exp)


class ZOCoordinator(Coordinator):
    """The server of ``zo_fedavg``: sync FL rounds whose uploads are ``K`` scalars."""

    pattern = "zo_fl"
    check_config = staticmethod(check_config)

    def _init_pipeline(self) -> None:
        _check(self.cfg, self.exp)
        super()._init_pipeline()
        self.records: list[tuple[np.ndarray, torch.Tensor]] = []    # each round's (ids, scalars)
        self.holds: dict[int, int] = {}
        self.upload_kind = KIND_ENCODED
        self.upload_numel = self.algorithm.perturbations       # bounds the upload's bytes

    def _init_state(self) -> ServerState:
        return ServerState(self.exp.init_params.reshape(-1).clone())

    def _payload(self) -> torch.Tensor:
        return self.state.params

    def _decode(self, node: int, round_: int, tensor: torch.Tensor) -> tuple[torch.Tensor, None]:
        """The ``K`` scalars of a client's bytes, or WireError."""
        algo = self.algorithm
        k, width = algo.perturbations, algo.scalar_bytes
        if tensor.numel() != k * width:
            raise WireError(f"{tensor.numel()} bytes where {k} scalars of {width} bytes are expected")
        codes = torch.from_numpy(np.frombuffer(tensor.numpy().tobytes(), dtype=_WIRE[width]).astype(
            np.float32 if width == 4 else np.int32))        # int32: -2^15 has an absolute value
        if width == 4 and not bool(torch.isfinite(codes).all()):
            raise WireError("a scalar is not finite")
        if width < 4 and int(codes.abs().max()) > 2 ** (algo.quantize_bits - 1) - 1:
            raise WireError(f"a code is outside the {algo.quantize_bits}-bit range")
        return algo.decode(codes.view(1, k))[0], None

    def _aggregate(self, r: int, received: dict[int, tuple[torch.Tensor, int]]) -> None:
        nodes = np.array(sorted(received), dtype=np.int64)
        scalars = torch.stack([received[int(i)][0] for i in nodes])              # [M, K]
        params = self.algorithm.server_update(self.state.params, scalars, nodes, r, self.cfg.seed,
                                              self.cfg.local.lr)
        self.state = ServerState(params, r, dict(self.state.extra))
        self.participants = len(nodes)
        self.records.append((nodes, scalars))           # broadcast: scalars (kept either way)

    # --- broadcast: scalars: each client's catch-up ------------------------------------------
    def _task(self, node: int, last_round: int = 0):
        self.holds[node] = last_round                   # the round whose model the client holds
        return super()._task(node, last_round)

    def _task_frames(self, node: int) -> tuple[list[bytes], bytes]:
        if self.algorithm.broadcast == "model":
            return super()._task_frames(node)
        cur, since = self.current, self.holds.get(node, -1)
        key = since if 0 <= since <= len(self.records) else -1
        if key not in cur.node_frames:
            data = relay_payload(self.records, self.state.params, key)
            frames = [schema.TaskFrame(model=f).SerializeToString() for f in bytes_frames(
                data, kind=KIND_ENCODED, round=cur.number, run_id=self.cfg.runtime.run_id,
                chunk_bytes=self.limits.chunk_bytes)]
            cur.node_frames[key] = (frames, cur.model_hash)
        return cur.node_frames[key]

    def _checkpoint_state(self, start: float) -> dict:
        state = super()._checkpoint_state(start)
        state["zo_records"] = [(torch.from_numpy(ids), scalars) for ids, scalars in self.records]
        return state

    def _restore_state(self, state: dict) -> None:
        self.records = [(ids.numpy(), scalars) for ids, scalars in state.get("zo_records", [])]


class ZOClient(Client):
    """A ``zo_fedavg`` client: ``2 K`` forward passes at the model, ``K`` scalars up."""

    def __init__(self, cfg, node_id: int, server: str | None = None) -> None:
        super().__init__(cfg, node_id, server)
        _check(cfg, self.exp)
        self.model, self.holds = self.exp.init_params.reshape(-1).clone(), 0    # broadcast: scalars

    def _fetch(self) -> tuple[object, object]:
        """``broadcast: scalars``: ask with the round held, replay what the task relays, check
        the model's hash, keep it (a malformed relay is a WireError: the client asks again)."""
        if self.algorithm.broadcast == "model":
            return super()._fetch()
        header, frames = self._ask(self.holds)
        if header.kind != schema.TaskHeader.TRAIN:
            return header, None
        meta, data = read_model((parse(schema.TaskFrame, f).model for f in frames),
                                run_id=self.cfg.runtime.run_id, limits=self.limits, dtype=torch.uint8)
        latest = int(header.round) - 1
        try:
            model = replay(self.algorithm, self.model, data.numpy().tobytes(), self.holds, latest,
                           self.exp.num_nodes, self.cfg.seed, self.cfg.local.lr)
        except ValueError as exc:
            raise WireError(str(exc)) from None
        if state_hash(model) != header.state_hash:
            raise WireError(f"the model replayed for round {header.round} does not match its hash")
        self.model, self.holds = model, latest
        return header, (meta, model)

    def _train_and_send(self, round_: int, start, steps: int = 0, expected: int = 0) -> None:
        self._die_if_asked(round_)
        algo, exp = self.algorithm, self.exp
        ids, k = np.array([self.node], dtype=np.int64), algo.perturbations
        idx, valid = exp.trainer.batches(ids, np.full(1, round_, dtype=np.int64), np.full(1, k))
        g, _ = estimate(algo, exp.trainer, self.cfg.seed, start.reshape(-1)[: exp.spec.numel],
                        algo.direction_keys(round_, ids), idx.reshape(k, -1), valid.reshape(k, -1))
        codes = algo.encode(g.view(1, k), self.cfg.seed, round_, ids)[0]
        data = codes.numpy().astype(_WIRE[algo.scalar_bytes]).tobytes()
        self._send(data, round_, KIND_ENCODED)
