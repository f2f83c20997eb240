"""What every decentralized peer process shares: its state, its server, its links, accepting pushes."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path

import grpc
import torch

from gossamer.config import ConfigError, ExperimentConfig
from gossamer.experiment import build as build_experiment
from gossamer.metrics.runstore import write_json
from gossamer.runtime import schema
from gossamer.runtime.codec import Limits, WireError, read_counted_model
from gossamer.runtime.common import grpc_options, limits, log, security
from gossamer.runtime.security import (
    SecurityConfig,
    TokenAuthInterceptor,
    add_port,
    caller_node,
    intercept_channel,
    make_channel,
)


class PeerNode:
    """A peer process of node ``node_id``: its config, experiment (its shard, the test set),
    security, first model row ``params`` ``[1, P]`` and ``peers/`` directory."""

    def __init__(self, cfg: ExperimentConfig, node_id: int, run_dir: Path, listen: str) -> None:
        self.cfg, self.node, self.run_dir, self.listen = cfg, node_id, Path(run_dir), listen
        self.exp = build_experiment(cfg, population=False)
        self.algorithm = self.exp.algorithm
        if not 0 <= node_id < self.exp.num_nodes:
            raise ValueError(f"--id: node id {node_id} is outside 0..{self.exp.num_nodes - 1}")
        self.security, self.limits = security(cfg, node=node_id, peer=True), limits(cfg)
        self.token = self.security.resolved_token()
        init = self.exp.init_params
        self.params = (init if init.dim() == 1 else init[node_id]).clone().reshape(1, -1)
        self.peer_dir = self.run_dir / "peers"
        self.peer_dir.mkdir(parents=True, exist_ok=True)
        # sample-level DP-SGD: this node's steps, recorded by its trainer, in each metrics row
        # (``dp_steps``); the merger's epsilon composes every node's (docs/privacy.md)
        from gossamer.privacy import sample_ledger

        self.dp_ledger = sample_ledger(self.exp.cfg, self.exp.trainer.sizes)
        if self.dp_ledger is not None:
            self.exp.trainer.ledger = self.dp_ledger

    def dp_steps(self) -> int | None:
        """This node's DP-SGD steps so far (None without sample-level DP)."""
        return None if self.dp_ledger is None else int(self.dp_ledger.steps[self.node])

    @contextmanager
    def serving(self, handlers: dict[str, grpc.RpcMethodHandler], workers: int) -> Iterator[None]:
        """Serve the ``Peer`` service while the block runs; after it, let late messages arrive."""
        server = serve(self.cfg, self.security, self.token, self.node, self.listen, handlers,
                       self.peer_dir, workers)
        try:
            yield
        finally:
            time.sleep(0.5)
            server.stop(grace=1.0).wait()

    def link(self, peers: dict[int, str] | Path, contacts: Iterable[int]) -> dict[int, grpc.Channel]:
        """Channels to ``contacts``; ``peers`` is the address book or the file it will be in."""
        if isinstance(peers, Path):
            peers = wait_for_peers(peers, self.exp.num_nodes, self.cfg.runtime.join_timeout_s)
        return channels(self.cfg, self.security, self.token, peers, contacts)


def pushers(links: dict[int, grpc.Channel]) -> dict[int, object]:
    """A ``Peer.Push`` stub per channel."""
    return {j: c.stream_unary(schema.method("Peer", "Push")) for j, c in links.items()}


def serve(cfg: ExperimentConfig, security: SecurityConfig, token: str | None, node: int,
          listen: str, handlers: dict[str, grpc.RpcMethodHandler], peer_dir: Path,
          workers: int) -> grpc.Server:
    """Start this peer's ``Peer`` service and publish its address in ``peer_dir``."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers),
                         options=grpc_options(cfg) + [("grpc.so_reuseport", 0)],
                         interceptors=[TokenAuthInterceptor(token)] if token else [])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("gossamer.v1.Peer", handlers)])
    port = add_port(server, listen, security)
    server.start()
    write_json(peer_dir / f"address-{node}.json", {"address": f"{listen.rsplit(':', 1)[0]}:{port}"})
    return server


def read_peers(path: Path, num_nodes: int) -> dict[int, str]:
    """A peers file: JSON object mapping node id to ``host:port`` for every node."""
    try:
        raw = json.loads(Path(path).read_text())
        peers = {int(k): str(v) for k, v in raw.items()}
    except (OSError, ValueError, AttributeError) as exc:
        raise ConfigError("--peers", f"cannot read peers file {path}: {exc}") from None
    missing = sorted(set(range(num_nodes)) - set(peers))
    if missing:
        raise ConfigError("--peers", f"peers file lacks nodes {missing[:5]}")
    return peers


def wait_for_peers(path: Path, num_nodes: int, timeout_s: float) -> dict[int, str]:
    """Wait for the peers file (the launcher writes it once every peer listens), then read it."""
    end = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > end:
            raise RuntimeError(f"peers file {path} did not appear")
        time.sleep(0.05)
    return read_peers(path, num_nodes)


def channels(cfg: ExperimentConfig, security: SecurityConfig, token: str | None,
             peers: dict[int, str], neighbors: Iterable[int]) -> dict[int, grpc.Channel]:
    """One (secured, authenticated) channel per neighbour. A channel whose peer went down
    retries the connection with gRPC's backoff, by default growing to 2 minutes, failing every
    push meanwhile: a restarted peer would stay unreachable long after it listens again. Peer
    channels cap that backoff at 1 s (``runtime.retry_max_s`` if smaller)."""
    cap_ms = int(1000 * min(1.0, cfg.runtime.retry_max_s))
    options = grpc_options(cfg) + [("grpc.initial_reconnect_backoff_ms", min(100, cap_ms)),
                                   ("grpc.min_reconnect_backoff_ms", min(100, cap_ms)),
                                   ("grpc.max_reconnect_backoff_ms", cap_ms)]
    out = {}
    for j in neighbors:
        channel = make_channel(peers[j], security, options)
        out[j] = intercept_channel(channel, token) if token else channel
    return out


def accept_push(chunks, *, node: int, neighbors: Iterable[int], numel: int, run_id: str,
                limits: Limits) -> tuple[object, torch.Tensor, int]:
    """Validate a pushed model from a neighbour: (meta, tensor, bytes), or WireError."""
    meta, tensor, size = read_counted_model(chunks, expected_numel=numel, run_id=run_id,
                                            limits=limits, dtype=torch.float32)
    if int(meta.sender) not in neighbors or int(meta.sender) == node:
        raise WireError(f"{int(meta.sender)} is not a neighbour")
    return meta, tensor.float().clone(), size


def check_sender(context: grpc.ServicerContext, sender: int, security: SecurityConfig) -> None:
    """With client certificates (``require_client_cert``) a peer may send only as the node its
    certificate names (``node-<id>``); the ``sender`` field it wrote proves nothing."""
    if not security.require_client_cert:
        return
    node = caller_node(context, None)
    if node is None:
        raise WireError("the channel proves no node id (a client certificate must be named node-<id>)")
    if node != sender:
        raise WireError(f"node {node} may not send as node {sender}")


def reject(node: int, exc: WireError) -> bytes:
    log.warning("peer %d rejected a message: %s", node, exc)
    return schema.Ack(ok=False, reason=str(exc)).SerializeToString()
