"""The upload pipeline of synchronous FL: the stages every client update passes, in order.

    client side:  [attack]  ->  compress + feedback | RQM  ->  clip + client noise (DP)
    the wire:     float32 row | encoded bytes | masked ring vector (secure aggregation)
    server side:  decode  ->  server noise (DP) | secure sum  ->  aggregate (robust rule,
                  server optimizer: the algorithm's ``aggregate``)

Each stage is an ``init``/``apply`` pair in the optax sense: ``init`` gives the state rows a
stage keeps (error-feedback memory, DGC momentum, EF21 estimates), ``apply`` maps a batch of
uploads and the state rows of its clients to the next batch and new state rows. The config's
sections build the chain (:func:`build_pipeline`); the simulator runs both sides on the
round's whole batch, a runtime client runs the client side on its own row and a runtime
server runs the server side on the rows that arrived, so both executors compute the same
numbers (randomness is keyed per client and round, never by batch position).

The attack stage is the simulator's (``Adversary.corrupt``); secure aggregation's message
rounds live in :mod:`gossamer.privacy.secagg` (shared by both executors).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

from gossamer import wire
from gossamer.compression.base import Compressor, Encoded
from gossamer.protocols.private import ClientDP


def upload_keys(clients: np.ndarray, round: int) -> np.ndarray:
    """A client's randomness key in ``round`` (compression, RQM): ``client * 2**32 + round``."""
    return np.asarray(clients, dtype=np.int64) * (1 << 32) + round


@dataclass
class Uploads:
    """One round's uploads in flight. ``model`` ``[B, P]`` is each client's model block; the
    stages act on its update ``delta() = model - start`` and put ``start + result`` back;
    ``extra`` ``[B, (V-1) P]`` holds further upload vectors (SCAFFOLD's control variates),
    which travel as float32."""

    round: int | np.ndarray                   # asynchronous FL: each row's task key
    clients: np.ndarray
    start: torch.Tensor
    model: torch.Tensor
    extra: torch.Tensor | None = None
    encoded: Encoded | None = None            # the wire form of the update when compressed

    def delta(self) -> torch.Tensor:
        return self.model - self.start

    def with_delta(self, delta: torch.Tensor) -> Uploads:
        return replace(self, model=self.start + delta)

    def rows(self) -> torch.Tensor:
        """The algorithm's upload rows ``[B, V P]``: the model block, then the extras."""
        return self.model if self.extra is None else torch.cat([self.model, self.extra], dim=1)

    @classmethod
    def of(cls, round: int, clients: np.ndarray, start: torch.Tensor, rows: torch.Tensor) -> Uploads:
        numel = start.numel()
        extra = rows[:, numel:] if rows.shape[1] > numel else None
        return cls(round, np.asarray(clients, dtype=np.int64), start, rows[:, :numel], extra)


def message_base(uploads_model: bool, start: torch.Tensor) -> torch.Tensor:
    """What an asynchronous FL message is compressed relative to (client and server alike): its
    start model where the rule uploads models (FedAsync, ``AsyncFL.uploads_model``), else zero
    (an update or a direction)."""
    return start if uploads_model else torch.zeros((), dtype=start.dtype, device=start.device)


# --- compression with feedback ---------------------------------------------------------------
FETCHSGD_MOMENTUM = "fetchsgd_momentum"       # ServerState.extra keys of FetchSGD's sketches
FETCHSGD_ERROR = "fetchsgd_error"


@dataclass
class Compress:
    """``compression.uplink`` with ``compression.feedback`` (none, ef, ef21, dgc, fetchsgd).

    State rows: ``memory`` (EF residual, EF21 estimate, DGC accumulation) and ``momentum``
    (DGC), both on the client; EF21's server keeps the same estimate (``estimate``). FetchSGD
    keeps nothing on the client: its server state is two sketches (:meth:`fetch`)."""

    compressor: Compressor
    feedback: str = "none"
    seed: int = 0
    density: float = 0.0                       # DGC
    momentum_factor: float = 0.9
    clip_norm: float | None = None
    warmup_rounds: int = 0
    reset: str = "zero_buckets"                # FetchSGD: how the server sketches forget

    def init(self, rows: int, numel: int, device: torch.device | None = None) -> dict[str, torch.Tensor]:
        state = {}
        if self.feedback not in ("none", "fetchsgd"):
            state["memory"] = torch.zeros(rows, numel, device=device)
        if self.feedback == "dgc":
            state["momentum"] = torch.zeros(rows, numel, device=device)
        return state

    def nominal_bytes(self, numel: int, round: int) -> int | None:
        """Wire bytes of the model block, or None when they depend on the values."""
        if self.feedback == "dgc":
            from gossamer.compression import dgc_nominal_bytes

            return dgc_nominal_bytes(numel, round=round - 1, density=self.density,
                                     warmup_rounds=self.warmup_rounds)
        return self.compressor.nominal_bytes(numel)

    def apply(self, up: Uploads, state: dict[str, torch.Tensor]
              ) -> tuple[Uploads, torch.Tensor | None, dict[str, torch.Tensor]]:
        """Client side: encode each update; returns the uploads carrying ``encoded``, what the
        server will rebuild as the update (``decoded``; EF21: the new estimate; FetchSGD: None,
        the server decodes only the sum, :meth:`fetch`) and the new state rows."""
        from gossamer.compression import dgc_step, ef21, error_feedback

        keys, seed, new = upload_keys(up.clients, up.round), self.seed, dict(state)
        if self.feedback == "ef":
            enc, decoded, new["memory"] = error_feedback(self.compressor, up.delta(), state["memory"],
                                                         seed=seed, keys=keys)
        elif self.feedback == "dgc":       # asynchronous tasks: a key each, no warm-up (checked)
            step = dgc_step(up.delta(), state["momentum"], state["memory"], round=up.round - 1,
                            density=self.density, momentum_factor=self.momentum_factor,
                            clip_norm=self.clip_norm, warmup_rounds=self.warmup_rounds)
            enc, decoded = step.encoded, step.decoded
            new["momentum"], new["memory"] = step.momentum, step.accumulation
        elif self.feedback == "ef21":                   # both ends hold the same estimate
            enc, decoded = ef21(self.compressor, up.delta(), state["memory"], seed=seed, keys=keys)
            new["memory"] = decoded
        elif self.feedback == "fetchsgd":                # sketches, summed by the server
            enc, decoded = self.compressor.compress(up.delta(), seed=seed, keys=keys), None
        else:
            enc = self.compressor.compress(up.delta(), seed=seed, keys=keys)
            decoded = self.compressor.decompress(enc)
        return replace(up, encoded=enc), decoded, new

    def fetch(self, extra: dict[str, torch.Tensor], tables: torch.Tensor, weights: torch.Tensor,
              numel: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """FetchSGD's server side (``feedback: fetchsgd``): the round's update ``[P]`` from the
        delivered uploads' sketches ``tables [B, r, c]`` (or flat, ``[B, r c]``: a coordinator's
        rows) and their mean weights ``[B]`` (summing to 1), and the server buffers ``extra``
        (``ServerState.extra``) with the new momentum and error sketches (``FETCHSGD_MOMENTUM``,
        ``FETCHSGD_ERROR``; absent: zero). Every row then becomes start + update, as the
        algorithm's mean of equal rows returns it."""
        from gossamer.compression import fetchsgd_step

        tables = tables.reshape(len(tables), self.compressor.rows, -1)
        table = (weights.to(tables.dtype)[:, None, None] * tables).sum(0)
        step = fetchsgd_step(self.compressor, table, extra.get(FETCHSGD_MOMENTUM),
                             extra.get(FETCHSGD_ERROR), numel=numel, seed=self.seed,
                             rho=self.momentum_factor, reset=self.reset)
        return step.update, {**extra, FETCHSGD_MOMENTUM: step.momentum, FETCHSGD_ERROR: step.error}

    def to_bytes(self, up: Uploads, row: int = 0) -> bytes:
        """The wire form of one upload: the encoded model block, then the float32 extras."""
        data = self.compressor.to_bytes(up.encoded, row)
        if up.extra is not None:
            data += up.extra[row].float().contiguous().cpu().numpy().tobytes()
        return data

    def from_bytes(self, data: bytes, numel: int, vectors: int, client: int, round: int,
                   estimate: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Server side of one upload: ``(update [P], extra or None)``; EF21 adds the decoded
        difference to the server's ``estimate`` of that client. Malformed bytes raise
        ValueError."""
        raw = 4 * numel * (vectors - 1)
        if len(data) < raw:
            raise ValueError(f"encoded upload of {len(data)} bytes is shorter than its "
                             f"{raw} bytes of float32 extras")
        body, tail = data[: len(data) - raw], data[len(data) - raw:]
        key = int(upload_keys(np.array([client]), round)[0])
        try:
            decoded = self.compressor.from_bytes(body, numel, seed=self.seed, key=key)
        except (ValueError, IndexError, RuntimeError, OverflowError) as exc:
            raise ValueError(f"undecodable {self.compressor.name} upload: {exc}") from None
        if decoded.shape != (numel,) or not bool(torch.isfinite(decoded).all()):
            raise ValueError("decoded upload has the wrong size or non-finite values")
        if self.feedback == "ef21":
            decoded = estimate + decoded
        extra = torch.frombuffer(bytearray(tail), dtype=torch.float32).clone() if raw else None
        if extra is not None and not bool(torch.isfinite(extra).all()):
            raise ValueError("upload extras hold non-finite values")
        return decoded, extra


@dataclass
class Pipeline:
    """The configured stages of a synchronous FL upload (None: not configured)."""

    numel: int
    vectors: int
    compress: Compress | None = None
    rqm: Compressor | None = None
    dp: ClientDP | None = None
    secagg: object | None = None               # the config section (privacy.secure_aggregation)
    extra_columns: list[str] = field(default_factory=list)

    @property
    def extra_bytes(self) -> int:
        """Bytes of the further float32 vectors an upload carries after its model block."""
        return 4 * self.numel * (self.vectors - 1)

    @property
    def encoded(self) -> Compressor | None:
        """The compressor whose bytes travel (compression.uplink or RQM), if any."""
        return self.compress.compressor if self.compress is not None else self.rqm

    def upload_bytes(self, round: int) -> int | None:
        """Wire bytes of one upload (header included), None when they depend on the values."""
        if self.secagg is not None:
            from gossamer.privacy.secagg import ring_bytes

            return wire.HEADER_BYTES + ring_bytes(self.numel, self.secagg.bits)
        if self.rqm is not None:
            return wire.HEADER_BYTES + self.rqm.nominal_bytes(self.numel)
        if self.compress is not None:
            nominal = self.compress.nominal_bytes(self.numel, round)
            return None if nominal is None else wire.HEADER_BYTES + self.extra_bytes + nominal
        return wire.encoded_size(self.vectors * self.numel)

    def decode(self, data: bytes, client: int, round: int, start: torch.Tensor,
               estimate: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Server side of one encoded upload: the row the algorithm aggregates (``start +
        update``, then the float32 extras) and the decoded update (EF21: the client's new
        estimate, given its previous one); ValueError when the bytes do not decode. FetchSGD: a
        sketch is never decoded alone; the row is its table, flat, for :meth:`Compress.fetch`."""
        if self.compress is not None and self.compress.feedback == "fetchsgd":
            return self.compress.compressor.table_from_bytes(data, self.numel).reshape(-1), None
        if self.compress is not None:
            decoded, extra = self.compress.from_bytes(data, self.numel, self.vectors, client, round,
                                                      estimate)
        else:
            try:
                decoded, extra = self.rqm.from_bytes(data, self.numel), None
            except (ValueError, IndexError, RuntimeError) as exc:
                raise ValueError(f"undecodable rqm upload: {exc}") from None
        row = start + decoded
        return (row if extra is None else torch.cat([row, extra])), decoded

    def encode_rqm(self, up: Uploads, seed: int) -> tuple[Uploads, torch.Tensor]:
        """RQM uploads (docs/privacy.md): each update quantized; returns the decoded update."""
        enc = self.rqm.compress(up.delta(), seed=seed, keys=upload_keys(up.clients, up.round))
        return replace(up, encoded=enc), self.rqm.decompress(enc)


def build_pipeline(cfg, algorithm, numel: int, compressor: Compressor | None) -> Pipeline:
    """The stages ``cfg`` configures for ``algorithm`` (checked by the experiment builder)."""
    comp, dp, seed = cfg.compression, cfg.privacy.dp, cfg.seed
    pipe = Pipeline(numel, int(algorithm.upload_vectors),
                    secagg=cfg.privacy.secure_aggregation)
    if compressor is not None:
        density = float(comp.uplink.params.get("density", 0.0)) if comp.feedback == "dgc" else 0.0
        pipe.compress = Compress(compressor, comp.feedback, seed, density, comp.momentum,
                                 comp.clip_norm, comp.warmup_rounds, comp.reset)
    if dp is not None:
        pipe.extra_columns.append("epsilon")
        if dp.mechanism == "rqm":
            from gossamer.compression.rqm import RQM

            pipe.rqm = RQM(c=dp.clip_norm, levels=dp.levels, q=dp.q, extension=dp.extension)
        elif dp.level == "client":
            pipe.dp = ClientDP(dp.clip_norm, dp.noise_multiplier, dp.noise, seed)
    if pipe.secagg is not None:
        pipe.extra_columns.append("secagg_aborted")
    return pipe
