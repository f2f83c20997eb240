"""Zeroth-order FL with shared randomness (``zo_fedavg``): what a round decides.

The round's clients are :class:`gossamer.protocols.sync_fl.SyncRound`'s selection. Each
uploads ``K`` scalars; the server regenerates the directions from their keys
(:mod:`gossamer.algorithms.fl.zo`). What a client downloads is this module's
:class:`ScalarRelay`: the model, or (``broadcast: scalars``) the scalars of every round since
it last synced, whichever is smaller; either way it then holds the previous round's model.
Both executors estimate the scalars with :func:`estimate` and refuse what the rounds do not
run with in :func:`refuse_unsupported`: the simulator (``sim/drivers/zo_fl.py``) and real
processes (``runtime/zo_fl.py``).
"""

from __future__ import annotations

import numpy as np
import torch

from gossamer import wire
from gossamer.algorithms.fl.zo import DIRECTION_CHUNK, directions
from gossamer.config import ConfigError


class ScalarRelay:
    """The scalars relayed so far and the last round each client synced to."""

    def __init__(self, num_nodes: int, model_bytes: int, broadcast: str) -> None:
        self.model_bytes, self.broadcast = model_bytes, broadcast
        self.synced = np.zeros(num_nodes, dtype=np.int64)
        self.relayed = [0]                  # relay payload bytes of rounds 1..r, cumulative

    def download_bytes(self, ids: np.ndarray, r: int) -> np.ndarray:
        """Per client of round ``r``: the bytes it downloads; it then holds round ``r - 1``."""
        if self.broadcast == "model":
            return np.full(len(ids), self.model_bytes, dtype=np.int64)
        relayed = np.asarray(self.relayed, dtype=np.int64)
        missed = wire.HEADER_BYTES + relayed[r - 1] - relayed[self.synced[ids]]
        self.synced[ids] = r - 1
        return np.minimum(missed, self.model_bytes)

    def relay(self, record_bytes: int) -> None:
        """The round's scalars (a message of ``record_bytes``; 0 bytes for an idle round)."""
        self.relayed.append(self.relayed[-1] + max(0, record_bytes - wire.HEADER_BYTES))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"synced": torch.from_numpy(self.synced.copy()),
                "relayed": torch.tensor(self.relayed, dtype=torch.int64, device="cpu")}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.synced = state["synced"].numpy().copy()
        self.relayed = [int(v) for v in state["relayed"].tolist()]


def estimate(algo, trainer, seed: int, params: torch.Tensor, keys: np.ndarray, idx: np.ndarray,
             valid: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Projected gradients ``[D]`` and mean perturbed losses ``[D]`` at ``params`` for the
    directions ``keys`` ``[D, 3]``, direction ``d`` on the samples ``idx[d]`` (``valid``: which
    are real); chunked over directions. Each direction's numbers depend on its key and samples
    only, so a client computing its own ``K`` gets the simulator's values for it."""
    numel = params.shape[-1]
    g, loss = torch.empty(len(keys), device=params.device), torch.empty(len(keys), device=params.device)
    chunk = max(1, DIRECTION_CHUNK // max(1, numel))
    for s in range(0, len(keys), chunk):
        e = min(len(keys), s + chunk)
        unique, inverse = np.unique(keys[s:e], axis=0, return_inverse=True)   # shared: K rows
        z = directions(seed, unique, numel, params.device)[torch.from_numpy(inverse.reshape(-1)).to(params.device)]
        rows = algo.perturbed(params, z)
        both = np.concatenate([idx[s:e], idx[s:e]]), np.concatenate([valid[s:e], valid[s:e]])
        losses = trainer.batch_losses(rows, *both)
        g[s:e] = algo.projected_gradients(losses)
        loss[s:e] = losses.view(2, -1).mean(0).float()
    return g, loss


def refuse_unsupported(exp) -> None:
    """One-line config errors for what the zeroth-order rounds do not run with."""
    cfg, name = exp.cfg, exp.cfg.algorithm.name
    if exp.faults is not None and exp.faults.enabled:
        raise ConfigError("faults", f"{name} does not support faults yet")
    if exp.adversary is not None and exp.adversary.model_attack:
        raise ConfigError("adversary.attack", f"{name} does not support model attacks (data "
                          "attacks such as label_flip work)")
    if cfg.privacy.dp is not None:
        raise ConfigError("privacy.dp", f"{name} does not support differential privacy yet")
    if cfg.model.init == "independent":
        raise ConfigError("model.init", f"{name} trains one global model: use model.init: same")
    local = cfg.local
    if local.steps is not None or local.epochs not in (None, 1):
        raise ConfigError("local.steps" if local.steps is not None else "local.epochs",
                          f"{name} takes one zeroth-order step per round; set "
                          "algorithm.params.perturbations for more forward passes")
    for field in ("momentum", "weight_decay", "sam_rho"):
        if getattr(local, field):
            raise ConfigError(f"local.{field}", f"{name} steps along the zeroth-order estimate "
                              f"only; local.{field} must be 0")


# --- broadcast: scalars on real processes: what a client downloads to catch up ----------------
def relay_payload(records: list[tuple[np.ndarray, torch.Tensor]], params: torch.Tensor, since: int) -> bytes:
    """What a client holding the model of round ``since`` downloads to hold ``params``, the model
    after the ``len(records)`` rounds so far (``records[u - 1]``: round ``u``'s contributors and
    decoded scalars ``[M, K]``): ``b"R"`` and the records of rounds ``since + 1 ..``, each a
    little-endian int32 round, int32 ``M``, int32 ids and float32 scalars; or ``b"M"`` and the
    model as float32, when that is smaller or ``since`` is no round the server had."""
    model = b"M" + params.detach().cpu().numpy().astype("<f4").tobytes()
    if not 0 <= since <= len(records):
        return model
    parts, size = [b"R"], 1
    for u in range(since + 1, len(records) + 1):
        ids, scalars = records[u - 1]
        parts += [np.array([u, len(ids)], dtype="<i4").tobytes(), np.asarray(ids).astype("<i4").tobytes(),
                  scalars.cpu().numpy().astype("<f4").tobytes()]
        size += 8 + 4 * len(ids) + 4 * scalars.numel()
        if size >= len(model):
            return model
    return b"".join(parts)


def replay(algo, params: torch.Tensor, data: bytes, since: int, latest: int, num_nodes: int,
           seed: int, lr: float) -> torch.Tensor:
    """The model of round ``latest`` from ``params`` (round ``since``) and a
    :func:`relay_payload`: the server's own updates replayed (``algo.server_update``, the same
    bits). Anything malformed (a round out of order, an id out of range or repeated, a value
    that is not finite, bytes left over or missing) raises ValueError."""
    if not data or data[:1] not in (b"M", b"R"):
        raise ValueError("a relay payload starts with M (the model) or R (records)")
    body, k = memoryview(data)[1:], algo.perturbations
    if data[:1] == b"M":
        if len(body) != 4 * params.numel():
            raise ValueError(f"a relayed model of {len(body)} bytes where {4 * params.numel()} are expected")
        model = torch.from_numpy(np.frombuffer(body, dtype="<f4").astype(np.float32))
        if not bool(torch.isfinite(model).all()):
            raise ValueError("a relayed model value is not finite")
        return model
    at, u = 0, since
    while at < len(body):
        if len(body) - at < 8:
            raise ValueError("a relay record is cut short")
        r, m = (int(v) for v in np.frombuffer(body[at:at + 8], dtype="<i4"))
        at += 8
        if r != u + 1 or not 1 <= m <= num_nodes or len(body) - at < 4 * m * (1 + k):
            raise ValueError(f"relay record of round {r} with {m} contributors does not follow round {u}")
        ids = np.frombuffer(body[at:at + 4 * m], dtype="<i4").astype(np.int64)
        scalars = torch.from_numpy(np.frombuffer(body[at + 4 * m:at + 4 * m * (1 + k)], dtype="<f4").astype(np.float32))
        at += 4 * m * (1 + k)
        if ids.min() < 0 or ids.max() >= num_nodes or (np.diff(ids) <= 0).any() or not bool(torch.isfinite(scalars).all()):
            raise ValueError(f"relay record of round {r}: contributors out of range or order, or a value not finite")
        params, u = algo.server_update(params, scalars.view(m, k), ids, r, seed, lr), r
    if u != latest:
        raise ValueError(f"the relay reaches round {u}, not {latest}")
    return params
