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

Not on real processes yet (refused in one line): ``broadcast: scalars``, where a client
would rebuild the model by replaying the rounds it missed from relayed scalars.
"""

from __future__ import annotations

import numpy as np
import torch

from gossamer.algorithms.fl.fedavg import ServerState
from gossamer.config import ConfigError
from gossamer.protocols.zo_fl import estimate, refuse_unsupported
from gossamer.runtime.codec import KIND_ENCODED, WireError
from gossamer.runtime.fl_client import Client
from gossamer.runtime.fl_server import Coordinator

_WIRE = {4: np.dtype("<f4"), 2: np.dtype("<i2"), 1: np.dtype("i1")}   # scalar bytes -> dtype


def check_config(cfg) -> None:
    """One-line refusals of what the config alone shows (the launcher calls this before
    starting any process)."""
    from gossamer.algorithms import ALGORITHMS

    algo = ALGORITHMS.get(cfg.algorithm.name).from_params(cfg.algorithm.params)
    if algo.broadcast != "model":
        raise ConfigError("algorithm.params.broadcast", f"{cfg.algorithm.name} with broadcast: "
                          "scalars runs in the simulator only so far (clients would replay missed "
                          "rounds); use broadcast: model on real processes")
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


class ZOClient(Client):
    """A ``zo_fedavg`` client: ``2 K`` forward passes at the model, ``K`` scalars up."""

    def __init__(self, cfg, node_id: int, server: str | None = None) -> None:
        super().__init__(cfg, node_id, server)
        _check(cfg, self.exp)

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
