"""Shared runtime plumbing: security from the config, raw-bytes gRPC handlers, retries."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

import grpc

from gossamer.config import ExperimentConfig
from gossamer.runtime.codec import Limits, state_hash
from gossamer.runtime.security import SecurityConfig

T = TypeVar("T")
log = logging.getLogger("gossamer.runtime")

# gRPC messages are single frames (one chunk plus a little metadata); the codec bounds the
# whole model message by max_message_bytes.
FRAME_OVERHEAD = 64 << 10
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
             grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED}


class RunFailed(RuntimeError):
    """A deployment could not go on (no quorum of clients within its bounded wait); the CLI
    reports it in one line with exit code 3. The last checkpoint stays for ``--resume``."""


def model_digest(exp) -> bytes:
    """SHA-256 of the model a process built, when it pre-trained part of it (``model.pretrain``:
    FedIns' frozen backbone never travels, so every process pre-trains its own and a client's
    ``Join`` carries this digest, which the coordinator compares with its own); empty
    otherwise (the model that trains travels with every task)."""
    if exp.cfg.model.pretrain is None:
        return b""
    import torch

    state = exp.model.state_dict()
    return state_hash(torch.cat([state[name].reshape(-1).float() for name in sorted(state)]))


def security(cfg: ExperimentConfig, *, node: int | None = None, peer: bool = False) -> SecurityConfig:
    """The checked security settings of node ``node`` (None: the coordinator); ``peer``: for a
    decentralized peer, which has no server to hold the node secret, so node ids are bound by
    client certificates only."""
    sec = SecurityConfig(**cfg.runtime.security.model_dump())
    sec = sec.for_process("server" if node is None else f"node-{node}")
    sec.validate()
    if not sec.tls and (sec.token or sec.token_file or sec.node_tokens_dir):
        log.warning("tokens travel in clear text (runtime.security.allow_insecure): anyone on the "
                    "network path can read them and act as this run's nodes")
    if peer and sec.node_tokens_dir is not None:
        from gossamer.config import ConfigError

        raise ConfigError("runtime.security.node_tokens_dir", "node tokens are checked by a server "
                          "holding the node secret; decentralized peers bind node ids with client "
                          "certificates named node-<id> (require_client_cert)")
    return sec


def limits(cfg: ExperimentConfig) -> Limits:
    return Limits(cfg.runtime.max_message_bytes, cfg.runtime.chunk_bytes)


def grpc_options(cfg: ExperimentConfig) -> list[tuple[str, int]]:
    size = cfg.runtime.chunk_bytes + FRAME_OVERHEAD
    return [("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size)]


def retry(call: Callable[[], T], *, deadline_s: float, max_backoff_s: float,
          what: str = "call") -> T:
    """Run ``call`` until it succeeds, retrying transient gRPC errors with capped exponential
    backoff and jitter until ``deadline_s`` seconds have passed; then re-raise."""
    end = time.monotonic() + deadline_s
    delay = 0.05
    while True:
        try:
            return call()
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            if code not in RETRYABLE or time.monotonic() + delay > end:
                raise
            log.info("%s failed (%s); retrying in %.2f s", what, code, delay)
            time.sleep(delay * (0.5 + random.random()))
            delay = min(max_backoff_s, delay * 2)


def parent_stubs(address: str, security: SecurityConfig, token: str | None, cfg: ExperimentConfig):
    """A channel to the coordinator service at ``address`` (a coordinator or an aggregator,
    with ``token`` on every call when given) and its ``Join``, ``GetTask`` and ``PutUpdate``
    calls: what clients and aggregators talk to their parent with."""
    from gossamer.runtime import schema
    from gossamer.runtime.security import intercept_channel, make_channel

    channel = make_channel(address, security, grpc_options(cfg))
    channel = intercept_channel(channel, token) if token else channel
    return (channel, channel.unary_unary(schema.method("Coordinator", "Join")),
            channel.unary_stream(schema.method("Coordinator", "GetTask")),
            channel.stream_unary(schema.method("Coordinator", "PutUpdate")))


class Rehoming:
    """A process whose parent (the coordinator or an aggregator) is the first of
    ``addresses``: one that stays unreachable for ``runtime.retry_max_s`` is left for the next
    (a client re-homes when its aggregator dies). The class sets ``cfg``, ``addresses``,
    ``who`` (for logs) and ``_connect(at)``, which opens ``channel`` to ``addresses[at]``."""

    def _deadline(self) -> float:
        """How long to retry one address: ``runtime.join_timeout_s``, or with others to
        re-home to, ``runtime.retry_max_s``."""
        rt = self.cfg.runtime
        return rt.join_timeout_s if len(self.addresses) < 2 else min(rt.join_timeout_s, rt.retry_max_s)

    def _fail_over(self, exc: grpc.RpcError) -> bool:
        """Re-home to the next address; False when there is no other address or the failure
        is not a transport one."""
        if len(self.addresses) < 2 or exc.code() not in RETRYABLE:
            return False
        was = self.addresses[self.at]
        self.channel.close()
        self._connect((self.at + 1) % len(self.addresses))
        log.warning("%s: %s unreachable (%s); re-homing to %s", self.who, was, exc.code(),
                    self.addresses[self.at])
        return True


def refuse_simulator_only(cfg) -> None:
    """One-line refusal of config sections the runtime does not run yet (instead of silently
    running without them)."""
    from gossamer.algorithms import ALGORITHMS
    from gossamer.config import ConfigError
    from gossamer.protocols.patterns import PATTERNS

    pattern = ALGORITHMS.get(cfg.algorithm.name).pattern
    if PATTERNS[pattern].runtime is None:
        raise ConfigError("algorithm.name", f"{cfg.algorithm.name} ({pattern}) runs in the simulator "
                          "only so far; use `gossamer run`")
    algorithm = ALGORITHMS.get(cfg.algorithm.name)
    if (algorithm.personalized and not algorithm.runs_on_processes) or not algorithm.communicates:
        raise ConfigError("algorithm.name", f"{cfg.algorithm.name} runs in the simulator only so far "
                          "(real processes run ditto, fedrep, fedbn, fedcac and fedpub); use `gossamer run`")
