"""An FL client process: join, then pull tasks, train locally, push the model back.

Local training is the simulator's own ``BatchedTrainer`` with a batch of one node, driven by
the same counter-based random streams, so client ``i`` computes exactly what simulated node
``i`` computes. Transient errors (the server restarting, a dropped connection) are retried
with capped exponential backoff; the client exits when the server says the run is done.
"""

from __future__ import annotations

import math
import os
import signal
import struct
import time
from dataclasses import dataclass, field, replace

import grpc
import numpy as np
import torch
from cryptography.exceptions import InvalidTag

from gossamer.algorithms.fl.fedpub import functional_embeddings
from gossamer.algorithms.fl.payload import Payload
from gossamer.algorithms.local import LocalObjective
from gossamer.config import ExperimentConfig
from gossamer.experiment import build as build_experiment
from gossamer.privacy.secagg import Client as Party
from gossamer.privacy.secagg import (
    Randomness,
    advertise_keys,
    encode_input,
    masked_input,
    share_keys,
    threshold_count,
    unmasking,
)
from gossamer.protocols.upload import Uploads, build_pipeline, message_base
from gossamer.runtime import schema
from gossamer.runtime.codec import (
    KIND_DELTA,
    KIND_ENCODED,
    KIND_MODEL,
    WireError,
    bytes_frames,
    model_frames,
    parse,
    read_model,
    state_hash,
)
from gossamer.runtime.common import (
    Rehoming,
    limits,
    log,
    model_digest,
    parent_stubs,
    refuse_simulator_only,
    retry,
    security,
)
from gossamer.runtime.personal import PersonalClient
from gossamer.runtime.secagg_round import KIND_ADVERTISE


@dataclass
class SecAggClient:
    """This client's part of one round's secure aggregation: its update and secrets."""

    round: int
    update: np.ndarray                  # float64 [P]
    party: Party
    members: int = 0
    rand: Randomness = field(default_factory=Randomness)


class Client(PersonalClient, Rehoming):
    def __init__(self, cfg: ExperimentConfig, node_id: int, server: str | None = None) -> None:
        self.cfg, self.node = cfg, node_id
        refuse_simulator_only(cfg)
        self.exp = build_experiment(cfg, population=False)
        if not 0 <= node_id < self.exp.num_nodes:
            raise ValueError(f"--id: node id {node_id} is outside 0..{self.exp.num_nodes - 1}")
        self.algorithm = self.exp.algorithm
        self.limits = limits(cfg)
        self.security = security(cfg, node=node_id)
        self.token = self.security.resolved_token(node_id)
        # its parent: the coordinator or an aggregator, then the addresses to re-home to
        self.addresses = [a for a in (server or cfg.runtime.server).split(",") if a]
        self.who = f"client {node_id}"
        self._connect(0)
        self.num_samples = int(self.exp.trainer.sizes[node_id])
        # what the algorithm keeps on this client between rounds (SCAFFOLD's control variate);
        # a restarted client process starts it afresh
        init = getattr(self.algorithm, "init_client_state", None)       # asynchronous rules keep none
        self.client_state = init(self.exp.spec.numel) if init is not None else None
        self.download_numel = self.algorithm.download_vectors * self.exp.spec.numel
        self.last_round = 0
        # the client side of the upload pipeline (compression with feedback, RQM, DP); its
        # state (EF memory, DGC momentum) lives here, as SCAFFOLD's control variate does
        self.pipeline = build_pipeline(self.exp.cfg, self.algorithm, self.exp.spec.numel, self.exp.uplink)
        compress = self.pipeline.compress
        self.stage_state = compress.init(1, self.exp.spec.numel) if compress is not None else {}
        self.secagg: SecAggClient | None = None
        # FAVANO: this client's measured seconds per local step and per upload
        self.step_s: float | None = None
        self.upload_s = 0.0
        # personalized FL: this client's own model (Ditto's v, FedRep's head), kept here as
        # the simulator keeps the population's; a restarted client process starts it afresh
        self.personal: torch.Tensor | None = None
        if self.algorithm.personalized:
            self.head_names, self.head = self.algorithm.personal_entries(self.exp.spec)
            if self.algorithm.personal_training or self.algorithm.local_entries:
                self.personal = self.exp.init_params.reshape(-1).clone()
        if self.algorithm.personalized and self.algorithm.uses_embeddings:   # FED-PUB's fixed input
            self.proxy = self.exp.model.proxy_input(cfg.seed)

    def _connect(self, at: int) -> None:
        """Talk to ``servers[at]`` from now on."""
        self.at = at
        self.channel, self._join, self._get_task, self._put = parent_stubs(
            self.addresses[at], self.security, self.token, self.cfg)

    def _retry(self, call, what: str):
        """``call`` with retries on this address (``Rehoming._deadline``)."""
        return retry(call, deadline_s=self._deadline(), max_backoff_s=self.cfg.runtime.retry_max_s, what=what)

    def _rejoin(self) -> None:
        """Join, re-homing down ``--server`` while the parent stays unreachable (for at most
        ``runtime.join_timeout_s``)."""
        end = time.monotonic() + self.cfg.runtime.join_timeout_s
        while True:
            try:
                return self.join()
            except grpc.RpcError as exc:
                if time.monotonic() > end or not self._fail_over(exc):
                    raise

    def join(self) -> None:
        req = schema.JoinRequest(node_id=self.node, run_id=self.cfg.runtime.run_id,
                                 num_samples=self.num_samples,
                                 model_digest=model_digest(self.exp)).SerializeToString()
        reply = parse(schema.JoinReply, self._retry(lambda: self._join(req, timeout=10), "join"))
        if not reply.ok:
            raise RuntimeError(f"server refused client {self.node}: {reply.reason}")
        if reply.num_params != self.exp.spec.numel:
            raise RuntimeError("server model size differs from this client's config")

    def _ask(self, last_round: int) -> tuple[object, object]:
        """One GetTask call: the task's header and an iterator over its remaining frames."""
        req = schema.TaskRequest(node_id=self.node, run_id=self.cfg.runtime.run_id,
                                 last_round=last_round).SerializeToString()
        frames = iter(self._get_task(req, timeout=self.cfg.runtime.round_timeout_s))
        return parse(schema.TaskFrame, next(frames)).header, frames

    def _fetch(self) -> tuple[object, object]:
        """One GetTask call: (header, (meta, model) or None)."""
        header, frames = self._ask(self.last_round)
        if header.kind not in (schema.TaskHeader.TRAIN, schema.TaskHeader.SECAGG, schema.TaskHeader.EVAL):
            return header, None
        if header.kind == schema.TaskHeader.EVAL:          # the model is attached when needed
            frames = list(frames)
            if not frames:
                return header, None
        secagg = header.kind == schema.TaskHeader.SECAGG
        numel = self.exp.spec.numel if header.kind == schema.TaskHeader.EVAL else self.download_numel
        model = read_model((parse(schema.TaskFrame, f).model for f in frames),
                           expected_numel=None if secagg else numel,
                           run_id=self.cfg.runtime.run_id, limits=self.limits,
                           dtype=torch.uint8 if secagg else None)
        if not secagg and header.state_hash and state_hash(model[1]) != header.state_hash:
            # a worker joining (or rejoining) a run starts from exactly the server's state
            raise WireError(f"the model of round {header.round} does not match its hash")
        return header, model

    def run(self) -> int:
        """Serve tasks until the server says DONE; returns the number of rounds trained."""
        self._rejoin()
        trained = 0
        while True:
            try:
                header, model = self._retry(self._fetch, "get task")
            except WireError as exc:
                log.warning("client %d: bad task from server (%s); asking again", self.node, exc)
                time.sleep(self.cfg.runtime.poll_interval_s)
                continue
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                    raise
                if not self._fail_over(exc):
                    log.info("client %d: server unreachable (%s); rejoining", self.node, exc.code())
                self._rejoin()
                continue
            if header.kind == schema.TaskHeader.DONE:
                return trained
            if header.kind == schema.TaskHeader.JOIN:
                self._rejoin()
                continue
            if header.kind == schema.TaskHeader.SECAGG:
                self._secagg_step(header, model[1].numpy().tobytes())
                continue
            if header.kind == schema.TaskHeader.WAIT:
                time.sleep(header.retry_after_s or self.cfg.runtime.poll_interval_s)
                continue
            if header.kind == schema.TaskHeader.EVAL:
                try:
                    self._evaluate_own(int(header.round), None if model is None else model[1].float())
                except WireError as exc:
                    log.warning("client %d: bad evaluation task (%s)", self.node, exc)
                continue
            steps = int(header.steps)
            if header.pull_in_s > 0:                        # FAVANO: what fits before the pull
                steps = self._steps_before(header.pull_in_s, steps, int(header.round), model[1].float())
            try:
                self._train_and_send(int(header.round), model[1].float(), steps, int(header.expected))
            except grpc.RpcError as exc:              # the upload's parent died: re-home, ask again
                if not self._fail_over(exc):
                    raise
                self._rejoin()
                continue
            trained += 1

    def _steps_before(self, pull_in_s: float, most: int, key: int, start: torch.Tensor) -> int:
        """FAVANO: the local steps (at least 1, at most ``most``) that fit in the ``pull_in_s``
        seconds before the server pulls this task, less the last upload's time, from this
        client's step time (measured on a one-step trial the first time). The server's
        number is not trusted beyond ``runtime.round_timeout_s``, within which a task must end."""
        pull_in_s = min(pull_in_s, self.cfg.runtime.round_timeout_s) if math.isfinite(pull_in_s) else 0.0
        if self.step_s is None:
            began = time.monotonic()
            self.exp.trainer.train(start.reshape(1, -1), np.array([self.node]), key, steps=np.array([1]))
            self.step_s = time.monotonic() - began
            pull_in_s -= self.step_s
        fit = int((pull_in_s - self.upload_s) // max(self.step_s, 1e-6))
        return max(1, min(most, fit))

    @staticmethod
    def _die_if_asked(round_: int) -> None:
        """Tests: die mid-round like ``kill -9`` at the round the environment names (``"2+"``:
        the first task of round 2 or later, for a client that may miss a round's task)."""
        client = os.environ.get("GOSSAMER_TEST_KILL_CLIENT_AT_ROUND", "")
        if str(round_) in (os.environ.get("GOSSAMER_TEST_KILL_AT_ROUND"), client) or (
                client.endswith("+") and round_ >= int(client[:-1])):
            os.kill(os.getpid(), signal.SIGKILL)

    def _train_and_send(self, round_: int, start, steps: int = 0, expected: int = 0) -> None:
        """Train the task of ``round_`` (synchronous: the round; asynchronous: the task's
        data-order key, with ``steps`` local steps, 0 for the local schedule) and upload."""
        self._die_if_asked(round_)
        nodes, algo = np.array([self.node]), self.algorithm
        if algo.pattern == "async_fl":
            model, began = start.reshape(1, -1), time.monotonic()
            result = self.exp.trainer.train(model, nodes, round_, steps=np.array([steps]) if steps else None)
            if self.step_s is not None or steps:
                self.step_s = (time.monotonic() - began) / max(1, int(result.steps[0]))
            began = time.monotonic()
            message = algo.client_message(result.params, model, result.steps, self.cfg.local.lr)
            if self.pipeline.dp is not None:    # DP-FedBuff with noise: clients (else the server clips)
                message = self.pipeline.dp.client(message, nodes, round_, algo.due(0))
            compress = self.pipeline.compress
            if compress is None:
                self._send(message[0], round_)
            else:                          # message minus its base, keyed by the task's key
                base = message_base(algo.uploads_model, model)
                up, _, self.stage_state = compress.apply(Uploads(round_, nodes, base, message), self.stage_state)
                self._send(compress.to_bytes(up), round_, KIND_ENCODED)
            self.upload_s = time.monotonic() - began
            return
        payload = Payload.of(start.reshape(-1), algo.download_names)
        received = payload.model
        own = self.personal is not None
        if own and algo.personal_first:                     # FedRep: the head before the body
            self._personal_step(round_, received)
        state = None if self.client_state is None else self.client_state.reshape(1, -1)
        objective = algo.local_objective(payload, state)
        model = received.reshape(1, -1)
        if algo.local_entries:                              # FedBN: its own BatchNorm entries
            model = algo.local_start(model, self.personal.reshape(1, -1), self.head)
        if own and algo.personal_first:                     # from its row, its new head frozen
            model = self.personal.reshape(1, -1)
            frozen = algo.global_frozen(self.head_names, self.exp.spec.names)
            if frozen:
                objective = replace(objective or LocalObjective(), frozen=frozen)
        if algo.personalized and algo.server_personalizes:  # from the row the server made for it
            objective = algo.start_objective(objective, model, self.exp.spec.names)
        anchor = algo.split_roles and bool(algo.anchors(self.cfg.seed, round_, nodes)[0])
        if anchor:
            uploads, new_state = self.exp.trainer.full_gradient(model, nodes)[0], None   # FedAMD anchor
        else:
            result = self.exp.trainer.train(model, nodes, round_, objective=objective)
            if algo.local_entries:                          # ... which it keeps, trained
                self.personal = result.params[0].clone()
            uploads, new_state = algo.client_update(result.params, payload, state, result.steps,
                                                    self.cfg.local.lr)
        if new_state is not None:
            self.client_state = new_state[0]
        if anchor:
            self._send(uploads[0], round_)                     # a full gradient, as it is
            return
        if own and algo.personal_training and not algo.personal_first:   # Ditto: v's steps after w's
            self._personal_step(round_, received)
        if algo.personalized and algo.uses_embeddings:      # FED-PUB: the model, then its embedding
            uploads = torch.cat([uploads, functional_embeddings(self.exp.model, self.exp.spec, self.proxy,
                                                                uploads)], dim=1)
        self._send(*self._client_stages(Uploads.of(round_, nodes, received, uploads), expected))

    def _client_stages(self, up: Uploads, expected: int) -> tuple[object, int, int]:
        """The upload pipeline's client side on this client's row: (message, round, kind)."""
        pipe = self.pipeline
        if pipe.compress is not None:
            up, _, self.stage_state = pipe.compress.apply(up, self.stage_state)
            return pipe.compress.to_bytes(up), up.round, KIND_ENCODED
        if pipe.rqm is not None:
            up, _ = pipe.encode_rqm(up, self.cfg.seed)
            return pipe.rqm.to_bytes(up.encoded, 0), up.round, KIND_ENCODED
        if pipe.secagg is not None:                   # the update waits for the key rounds
            delta = up.delta() if pipe.dp is None else pipe.dp.client(
                up.delta(), up.clients, up.round, expected, masked=True)
            self.secagg = SecAggClient(up.round, delta[0].double().numpy(),
                                       Party.new(self.node, None, Randomness()))
            return advertise_keys(self.secagg.party), up.round, KIND_ADVERTISE
        if pipe.dp is not None:
            if expected < 1:
                raise RuntimeError("the server sent no expected client count for DP-FedAvg")
            return pipe.dp.client(up.delta(), up.clients, up.round, expected)[0], up.round, KIND_DELTA
        return up.rows()[0], up.round, KIND_MODEL

    def _secagg_step(self, header, data: bytes) -> None:
        """Answer the server's secure-aggregation message of ``header.stage`` for the round
        whose update this client holds (privacy/secagg.py's client functions)."""
        state, sa = self.secagg, self.cfg.privacy.secure_aggregation
        if state is None or header.round != state.round:
            log.warning("client %d: secure-aggregation message for round %d, which it holds no "
                        "update for", self.node, header.round)
            return
        party, stage = state.party, int(header.stage)
        try:
            if stage == 1:
                state.members = int(header.members)
                party.x, _ = encode_input(state.update, float(header.share), state.members,
                                          clip=sa.clip, bits=sa.bits)
                reply = share_keys(party, data, threshold_count(sa.threshold, state.members), state.rand)
            elif stage == 2:
                if str(state.round) == os.environ.get("GOSSAMER_TEST_KILL_BEFORE_MASKED_AT_ROUND"):
                    os.kill(os.getpid(), signal.SIGKILL)    # tests: die after sharing keys
                reply = masked_input(party, data, sa.bits, state.round)
            elif stage == 3:
                reply = unmasking(party, data, threshold_count(sa.threshold, state.members))
                self.secagg = None
            else:
                raise ValueError(f"unknown stage {stage}")
        except (ValueError, KeyError, struct.error, InvalidTag) as exc:   # malformed, or a share
            # another client encrypted badly: this client drops out of the round, which goes on
            log.warning("client %d: secure aggregation of round %d failed: %s", self.node, state.round, exc)
            self.secagg = None
            return
        self._send(reply, state.round, KIND_ADVERTISE + stage)

    def _send(self, message, round_: int, kind: int = KIND_MODEL) -> None:
        make = bytes_frames if isinstance(message, bytes) else model_frames
        frames = [f.SerializeToString() for f in make(
            message, kind=kind, sender=self.node, round=round_, meta=self.num_samples,
            run_id=self.cfg.runtime.run_id, chunk_bytes=self.limits.chunk_bytes)]
        ack = parse(schema.Ack, self._retry(lambda: self._put(iter(frames), timeout=60), "put update"))
        if not ack.ok:
            log.warning("client %d: update for round %d rejected: %s", self.node, round_, ack.reason)
        self.last_round = round_
