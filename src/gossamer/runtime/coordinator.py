"""The coordinator process's service: gRPC handlers, caller identity, rounds' plumbing.

:class:`BaseCoordinator` serves ``Join``, ``GetTask`` and ``PutUpdate`` for every
server-based pattern and leaves the pattern's decisions to hooks: ``_task`` (what a joined
client is told when it asks for work), ``_read_upload`` and ``_accept`` (what an upload must
be and where it goes), ``_client_failed`` (a proven client's bad message ends its task),
``_rounds`` (the main loop), ``_checkpoint``/``_restore``. The synchronous pattern is
``runtime/fl_server.py``, the asynchronous one ``runtime/async_server.py``.

Every caller is treated as hostile (``runtime/guard.py``): the node a call acts for comes
from the channel where the deployment binds ids; a rejected message is logged, answered in
one line and, from a proven node, counted as a strike (a ban after
``runtime.max_rejections``).
"""

from __future__ import annotations

import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch

from gossamer.config import ConfigError, ExperimentConfig, dump
from gossamer.experiment import build as build_experiment
from gossamer.experiment import build_trackers
from gossamer.metrics.runstore import (
    MetricsWriter,
    atomic_write_text,
    environment,
    save_checkpoint,
    write_json,
)
from gossamer.privacy.plan import calibrated
from gossamer.runtime import schema
from gossamer.runtime.codec import WireError, model_frames, parse, read_counted_model
from gossamer.runtime.common import RunFailed, grpc_options, limits, log, model_digest, security
from gossamer.runtime.guard import Busy, CallerGuard, Refused
from gossamer.runtime.security import TokenAuthInterceptor, add_port


class BaseCoordinator:
    """Serves the Coordinator gRPC service; subclasses run one pattern's rounds.

    Build one with :func:`gossamer.runtime.roles.make_coordinator`, which picks the class for
    the algorithm's pattern."""

    pattern = ""
    writes_metrics = True          # the run's metrics (and output.trackers): not an aggregator
    columns: list[str] = []

    def __init__(self, cfg: ExperimentConfig, run_dir: Path, *, resume: bool = False,
                 listen: str | None = None) -> None:
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.exp = build_experiment(cfg, population=False)
        self.algorithm = self.exp.algorithm
        if self.algorithm.family != "fl":
            raise ConfigError("algorithm.name", f"{cfg.algorithm.name} is not a server-based "
                              "algorithm; use gossamer peer")
        if self.algorithm.pattern != self.pattern:
            raise ConfigError("algorithm.name", f"{cfg.algorithm.name} runs the {self.algorithm.pattern} "
                              f"pattern, not {self.pattern}")
        self.listen = listen or cfg.runtime.server
        self.security, self.limits = security(cfg), limits(cfg)
        self.token = self.security.resolved_token()
        rt = cfg.runtime
        self.guard = CallerGuard(self.security, max_inflight=rt.max_inflight_per_client,
                                 stream_timeout_s=rt.upload_timeout_s, max_rejections=rt.max_rejections)
        # the most samples each client may claim: its shard as the server knows it, capped
        self.model_digest = model_digest(self.exp)     # model.pretrain: clients must match it
        self.max_samples = np.minimum(self.exp.trainer.sizes, rt.max_client_samples or np.iinfo(np.int64).max)
        self.numel = self.exp.spec.numel
        self.upload_numel = self.algorithm.upload_vectors * self.numel
        self._init_pipeline()
        self.state = self._init_state()
        self.lock = threading.Condition()
        self.clients: dict[int, int] = {}             # node id -> shard size
        self.stale: set[int] = set()                  # missed a round; not selected until heard
        self.done = False
        self.told_done: set[int] = set()             # clients that were told the run is over
        self.bytes_up = self.bytes_down = 0
        self.elapsed_before = 0.0                     # wall seconds of earlier runs (resume)
        self.rejected = 0
        self.metrics = MetricsWriter(self.run_dir / "metrics.csv", self.columns)
        self.resumed = resume
        # output.trackers, checked before any client joins; an aggregator writes no metrics
        self.trackers = build_trackers(cfg.output.trackers) if self.writes_metrics else []
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            self._restore()
        else:
            atomic_write_text(self.run_dir / "config.yaml", dump(cfg))
            write_json(self.run_dir / "environment.json", environment())

    def _model_task_frames(self, tensor: torch.Tensor, round_: int) -> list[bytes]:
        """``tensor`` as the serialized frames a task of ``round_`` streams after its header."""
        return [schema.TaskFrame(model=f).SerializeToString() for f in model_frames(
            tensor, round=round_, run_id=self.cfg.runtime.run_id, chunk_bytes=self.limits.chunk_bytes)]

    def _refused(self, exc: Refused) -> bytes:
        """Log a rejection; a proven node's bad message is its failure (and a strike)."""
        with self.lock:
            self.rejected += 1
        log.warning("rejected a message: %s", exc)
        if exc.node is not None and exc.fails:
            banned = self.guard.strike(exc)
            with self.lock:
                self._client_failed(exc.node)
                if banned:
                    self.clients.pop(exc.node, None)
                self.lock.notify_all()
        return schema.Ack(ok=False, reason=str(exc)).SerializeToString()

    def join(self, data: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            req = parse(schema.JoinRequest, data)
        except WireError as exc:
            return schema.JoinReply(ok=False, reason=str(exc)).SerializeToString()
        if req.run_id != self.cfg.runtime.run_id:
            return schema.JoinReply(ok=False, reason="wrong run id").SerializeToString()
        if self._is_aggregator(req.node_id):              # hierarchical aggregation (subtree.py)
            try:
                return self._join_aggregator(self.guard.acting(context, int(req.node_id)))
            except Refused as exc:
                self._refused(exc)
                return schema.JoinReply(ok=False, reason=str(exc)).SerializeToString()
        if req.node_id >= self.exp.num_nodes:
            return schema.JoinReply(ok=False, reason="node id out of range").SerializeToString()
        try:
            node = self.guard.acting(context, int(req.node_id))
            if req.num_samples > self.max_samples[node]:
                raise Refused(f"node {node} claims {req.num_samples} samples, at most "
                              f"{int(self.max_samples[node])} are plausible", node)
        except Refused as exc:
            self._refused(exc)
            return schema.JoinReply(ok=False, reason=str(exc)).SerializeToString()
        if req.model_digest != self.model_digest:      # not hostile: a different build
            log.warning("client %d's pre-trained model differs from this process's", node)
            return schema.JoinReply(ok=False, reason=(
                f"client {node}'s pre-trained model (model.pretrain) differs from this process's: "
                "the same config pre-trained on another machine gave other bits (different "
                "torch, math library or thread count?)")).SerializeToString()
        with self.lock:
            self.clients[node] = int(req.num_samples)
            self.stale.discard(node)
            self.lock.notify_all()
        log.info("client %d joined (%d samples)", node, req.num_samples)
        return schema.JoinReply(ok=True, num_params=self.numel, dtype="float32").SerializeToString()

    def _slot(self, context: grpc.ServicerContext, node: int | None):
        """A bounded, deadline-cancelled call slot for ``node`` (its connection when unbound)."""
        return self.guard.stream(context, node if node is not None else context.peer())

    def get_task(self, data: bytes, context: grpc.ServicerContext):
        try:
            req = parse(schema.TaskRequest, data)
        except WireError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        try:
            node = self.guard.acting(context, int(req.node_id))
            with self._slot(context, node if self.guard.binds else None):   # acting proved it
                with self.lock:
                    header, frames = self._answer(node, int(req.last_round), req)
                yield schema.TaskFrame(header=header).SerializeToString()
                for frame in frames:
                    self._count_down(len(frame), node)
                    yield frame
        except Refused as exc:
            self._refused(exc)
            code = grpc.StatusCode.RESOURCE_EXHAUSTED if isinstance(exc, Busy) else grpc.StatusCode.PERMISSION_DENIED
            context.abort(code, str(exc))

    def _answer(self, node: int, last_round: int = 0, req: object = None) -> tuple[object, list[bytes]]:
        """What ``node`` is told when it asks for work (lock held): DONE once the run is over,
        JOIN when the server does not know it, else what the pattern's ``_task`` says (an
        aggregator's: ``_aggregator_task``, after its report of the clients it reaches)."""
        if self.done:
            self.told_done.add(node)
            self.lock.notify_all()
            return schema.TaskHeader(kind=schema.TaskHeader.DONE), []
        if self._is_aggregator(node):
            if node in self.subs:
                self._heard_aggregator(node, req)
            return self._aggregator_task(node, last_round)
        if node not in self.clients:
            return schema.TaskHeader(kind=schema.TaskHeader.JOIN), []
        return self._task(node, last_round)

    def _wait(self) -> tuple[object, list[bytes]]:
        return schema.TaskHeader(kind=schema.TaskHeader.WAIT,
                                 retry_after_s=self.cfg.runtime.poll_interval_s), []

    def _count_down(self, n: int, node: int) -> None:
        with self.lock:
            self.bytes_down += n

    def put_update(self, chunks, context: grpc.ServicerContext) -> bytes:
        try:
            bound = self.guard.bound(context)
            with self._slot(context, bound) as slot:
                try:
                    meta, tensor, size = self._read_upload(chunks)
                except WireError as exc:
                    raise Refused(str(exc), bound) from None
                except grpc.RpcError:
                    if slot["expired"]:
                        raise Refused("upload not complete within runtime.upload_timeout_s "
                                      f"({self.cfg.runtime.upload_timeout_s:g} s)", bound) from None
                    raise Refused("the upload stream broke off", bound, strike=False,
                                  fails=True) from None
                node = int(meta.sender)
                if bound is not None and node != bound:
                    raise Refused(f"node {bound} may not upload as node {node}", bound)
                if tensor.dtype != torch.uint8:              # encoded bytes stay bytes
                    tensor = tensor.float().clone()
                self._accept(node, bound, meta, tensor, size)
        except Refused as exc:
            return self._refused(exc)
        return schema.Ack(ok=True).SerializeToString()

    def _wait_for_clients(self, start: float) -> None:
        want = self.cfg.runtime.min_clients or self.exp.num_nodes
        with self.lock:                      # a client banned for the run will not join again
            self.lock.wait_for(lambda: len(self.clients) >= min(want, self.exp.num_nodes - len(self.guard.banned)),
                               timeout=self.cfg.runtime.join_timeout_s)
            if len(self.clients) < self.cfg.runtime.min_participants:
                raise RunFailed(f"{len(self.clients)} clients joined within runtime.join_timeout_s "
                                f"({self.cfg.runtime.join_timeout_s:g} s); runtime.min_participants "
                                f"is {self.cfg.runtime.min_participants}")
        log.info("%d clients joined after %.1f s", len(self.clients), time.monotonic() - start)

    def serve(self) -> dict[str, Any]:
        """Run the whole experiment; returns the summary (also written to summary.json)."""
        start = time.monotonic()
        server = self.start_server()
        for tracker in self.trackers:
            tracker.on_start(self.run_dir, self.cfg.to_dict(), resumed=self.resumed)
        self.metrics.listeners = [tracker.on_row for tracker in self.trackers]
        try:
            summary = self._rounds(start)
            for tracker in self.trackers:
                tracker.on_end(summary)
            return summary
        except RunFailed as exc:
            log.error("run failed: %s", exc)
            self._write_failure(str(exc), start)
            raise
        finally:
            with self.lock:
                self.done = True
                self.lock.notify_all()
                # let every client hear DONE: one may be in a retry backoff (up to retry_max_s)
                self.lock.wait_for(lambda: self.told_done >= self._listeners(),
                                   timeout=self.cfg.runtime.retry_max_s + 1.0)
            server.stop(grace=1.0).wait()

    def start_server(self) -> grpc.Server:
        """Listen (address in ``server.json``) and serve the handlers; rounds are ``serve``'s."""
        # every client may hold its in-flight bound of calls, and a few threads stay spare
        workers = max(8, self.exp.num_nodes * self.cfg.runtime.max_inflight_per_client + 4)
        secret = self.guard.secret
        auth = ([TokenAuthInterceptor(self.token, self._on_auth_reject, node_secret=secret)]
                if self.token or secret else [])
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers),
                             options=grpc_options(self.cfg) + [("grpc.so_reuseport", 0)],
                             interceptors=auth)
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            "gossamer.v1.Coordinator", {
                "Join": grpc.unary_unary_rpc_method_handler(self.join),
                "GetTask": grpc.unary_stream_rpc_method_handler(self.get_task),
                "PutUpdate": grpc.stream_unary_rpc_method_handler(self.put_update)})])
        port = add_port(server, self.listen, self.security)
        host = self.listen.rsplit(":", 1)[0]
        write_json(self.run_dir / "server.json", {"address": f"{host}:{port}"})
        server.start()
        self.port = port
        log.info("coordinator listening on %s:%d", host, port)
        return server

    def _write_failure(self, reason: str, start: float) -> None:
        """summary.json of a failed run: where it stopped and why (the checkpoint stays)."""
        last = self.metrics.rows[-1] if self.metrics.rows else None
        write_json(self.run_dir / "summary.json", {
            "name": self.cfg.name, "algorithm": self.cfg.algorithm.name, "executor": "runtime",
            "num_nodes": self.exp.num_nodes, "stopped_by": "failed", "error": reason,
            "rounds": int(last["round"]) if last else 0,
            "final_test_accuracy": float(last["test_accuracy"]) if last else None,
            "bytes_up_total": self.bytes_up, "bytes_down_total": self.bytes_down,
            "wall_time_s": self.elapsed_before + time.monotonic() - start,
            "rejected_messages": self.rejected})

    def _on_auth_reject(self, reason: str) -> None:
        with self.lock:
            self.rejected += 1
        log.warning("rejected a call: %s", reason)

    def _stopped(self, row: dict[str, Any]) -> str | None:
        """Which stop rule ``row`` (an evaluation) meets, if any: ``target_accuracy`` (unless
        ``stop_at_target`` is false: the run then goes on past it) or ``max_sim_time_s``."""
        stop = self.cfg.stop
        if (stop.target_accuracy is not None and stop.stop_at_target
                and row["test_accuracy"] >= stop.target_accuracy):
            return "target_accuracy"
        if stop.max_sim_time_s is not None and row["sim_time_s"] >= stop.max_sim_time_s:
            return "max_sim_time_s"
        return None

    def _summary(self, stopped_by: str, wall_s: float) -> dict[str, Any]:
        """``summary.json``'s common fields, from the last metrics row."""
        last = self.metrics.rows[-1]
        return {"name": self.cfg.name, "algorithm": self.cfg.algorithm.name, "executor": "runtime",
                "num_nodes": self.exp.num_nodes, "num_params": self.numel,
                "rounds": int(last["round"]), "stopped_by": stopped_by,
                "final_test_accuracy": float(last["test_accuracy"]),
                "final_test_loss": float(last["test_loss"]),
                "bytes_sent_total": self.bytes_up, "bytes_received_total": self.bytes_down,  # as the simulator
                "bytes_up_total": self.bytes_up, "bytes_down_total": self.bytes_down,
                "sim_time_s": float(last["sim_time_s"]), "wall_time_s": wall_s,
                "rejected_messages": self.rejected, **calibrated(self.exp.cfg)}

    def _write(self, summary: dict[str, Any]) -> None:
        """The run's last files: ``summary.json`` and the final model."""
        write_json(self.run_dir / "summary.json", summary)
        save_checkpoint(self.run_dir / "model.pt", {"params": self.state.params}, keep_previous=False)

    # --- pattern hooks ------------------------------------------------------------------------
    def _listeners(self) -> set[int]:
        """Who asks this process for work (and must hear that the run is over)."""
        return set(self.clients)

    def _is_aggregator(self, node: int) -> bool:
        """Whether ``node`` is an aggregator's wire id (hierarchical aggregation only)."""
        return False

    def _init_pipeline(self) -> None:
        """Set up what uploads carry (the synchronous pattern: the upload pipeline)."""

    def _init_state(self):
        raise NotImplementedError

    def _client_failed(self, node: int) -> None:
        """``node`` failed its current task (lock held)."""

    def _task(self, node: int, last_round: int = 0) -> tuple[object, list[bytes]]:
        """What ``node`` is told when it asks for work (lock held); ``last_round``: the
        request's ``TaskRequest.last_round``."""
        raise NotImplementedError

    def _read_upload(self, chunks) -> tuple[object, torch.Tensor, int]:
        """One upload: the flat float32 row of ``upload_numel`` values (codec-checked)."""
        return read_counted_model(chunks, expected_numel=self.upload_numel,
                                  run_id=self.cfg.runtime.run_id, limits=self.limits,
                                  dtype=torch.float32)

    def _accept(self, node: int, bound: int | None, meta: object, tensor: torch.Tensor,
                size: int) -> None:
        raise NotImplementedError

    def _rounds(self, start: float) -> dict[str, Any]:
        raise NotImplementedError

    def _restore(self) -> None:
        raise NotImplementedError
