"""A MoDeST peer process: decentralized sampling over gRPC, without a coordinator.

It executes :mod:`gossamer.protocols.modest` for one node: each peer computes every round's
rankings itself, so nobody tells anybody who the sample is, and its
:class:`~gossamer.protocols.modest.Inbox` says what to do when models arrive: train from a
``TRAIN`` model (data-order key ``r``) and send the result to round ``r``'s aggregators, or
average ``AGGREGATE`` models and send the average to round ``r + 1``'s trainers. The push of
a model is the ping of :func:`~gossamer.algorithms.dl.modest.probe`: a push not accepted
within ``timeout_s`` (transient errors retried) counts as unresponsive and the next candidate
is tried, wave after wave. After round ``stop.rounds`` an aggregator tells every peer that the
run is over (``DONE``: ``ModelMeta.kind = 3``, no tensor). A peer that hears nothing for
``runtime.join_timeout_s + runtime.round_timeout_s`` gives up (the run stalled). Rows go to
``peers/metrics-<id>.csv`` (:data:`COLUMNS`; merged by ``runtime/dl_merge.py``).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch

from gossamer.config import ConfigError, ExperimentConfig
from gossamer.metrics.runstore import (
    MetricsWriter,
    checkpoint_exists,
    load_checkpoint,
    save_checkpoint,
)
from gossamer.protocols import modest as protocol
from gossamer.protocols.modest import AGGREGATE, TRAIN, Arrival
from gossamer.runtime import peering, schema
from gossamer.runtime.codec import WireError, model_frames, parse, peek_meta, read_counted_model
from gossamer.runtime.common import log, retry

# bit 0 of ModelMeta.meta: what the receiver does (TRAIN, AGGREGATE); the rest: samples
MODEL, DONE = 1, 3          # ModelMeta.kind: a model, or "the run is over" (an empty tensor)
COLUMNS = ["round", "role", "wall_time", "bytes_up", "bytes_down", "sent", "test_accuracy",
           "test_loss", "train_loss", "samples", "models", "rank", "timeouts", "dp_steps"]


def _wall() -> str:
    """Unix time as text to the microsecond (metrics floats keep only 8 digits)."""
    return f"{time.time():.6f}"


class ModestPeer(peering.PeerNode):
    def __init__(self, cfg: ExperimentConfig, node_id: int, run_dir: Path, *,
                 listen: str = "127.0.0.1:0", resume: bool = False) -> None:
        super().__init__(cfg, node_id, run_dir, listen)
        algo, n = self.algorithm, self.exp.num_nodes
        if algo.pattern != "sampled_dl":
            raise ConfigError("algorithm.name", f"this peer runs the sampled_dl pattern; "
                              f"{cfg.algorithm.name} is {algo.pattern} (see runtime/roles.py)")
        if self.exp.adversary is not None and self.exp.adversary.model_attack:
            raise ConfigError("adversary", "Byzantine MoDeST trainers run in the simulator only")
        self.everyone = np.arange(n)                                  # the view: no registry
        self.pool = np.flatnonzero(self.exp.trainer.sizes > 0)       # who can train
        self.k = min(algo.sample_size, len(self.pool))
        self.quorum = algo.quorum(len(self.pool))
        self.stall_s = cfg.runtime.join_timeout_s + cfg.runtime.round_timeout_s
        self.box = protocol.Inbox(self.quorum, algo.timeout_s,
                                  lambda r: protocol.trainers(self.pool, cfg.seed, r))
        self.done_at: int | None = None
        self.done_from: set[int] = set()
        self.bytes_up = self.bytes_down = 0
        self.lock = threading.Condition()
        self.rows_lock = threading.Lock()
        self.last_heard = self.free_since = time.monotonic()
        self.stubs: dict[int, Any] = {}
        self.jobs = futures.ThreadPoolExecutor(max_workers=4)        # fan-outs, one per model sent
        self.pushers = futures.ThreadPoolExecutor(max_workers=max(8, self.k + algo.aggregators))
        self.metrics = MetricsWriter(self.peer_dir / f"metrics-{node_id}.csv", COLUMNS)
        self.ckpt = self.peer_dir / f"checkpoint-{node_id}.pt"
        if resume and checkpoint_exists(self.ckpt):
            state = load_checkpoint(self.ckpt)        # or checkpoint-i.prev.pt, if damaged
            self.params = state["params"]
            self.box.trained, self.box.aggregated = int(state["trained"]), int(state["aggregated"])
            self.bytes_up, self.bytes_down = int(state["bytes_up"]), int(state["bytes_down"])
            self.metrics.load_existing(1 << 62)        # every row: they are written after the work

    # --- the Peer service ---------------------------------------------------------------------
    def push(self, chunks, context: grpc.ServicerContext) -> bytes:
        try:
            meta, tensor, size = self._read(chunks)
            sender, r, kind = int(meta.sender), int(meta.round), int(meta.kind)
            if not 0 <= sender < self.exp.num_nodes or sender == self.node:
                raise WireError(f"{sender} is not another peer of this run")
            peering.check_sender(context, sender, self.security)
            if kind == DONE and r < self.cfg.stop.rounds:
                raise WireError(f"the run ends at round {self.cfg.stop.rounds}, not {r}")
            if kind == MODEL and not 1 <= r <= self.cfg.stop.rounds:
                raise WireError(f"round {r} is outside 1..{self.cfg.stop.rounds}")
        except WireError as exc:
            return peering.reject(self.node, exc)
        with self.lock:
            self.bytes_down += size
            self.last_heard = time.monotonic()
            if kind == DONE:
                self.done_at = max(self.done_at or 0, r)
                self.done_from.add(sender)
            else:
                self._deliver(r, int(meta.meta) & 1, Arrival(
                    sender, tensor.float().reshape(-1).clone(), int(meta.meta) >> 1))
            self.lock.notify_all()
        return schema.Ack(ok=True).SerializeToString()

    def _read(self, chunks) -> tuple[object, torch.Tensor, int]:
        """A validated message (meta, tensor, bytes): a model of the spec's size, or an empty
        DONE notice; the declared size is checked before any payload is read."""
        meta, chunks = peek_meta(chunks)
        kind = int(meta.kind)
        if kind not in (MODEL, DONE):
            raise WireError(f"unknown message kind {kind}")
        return read_counted_model(chunks, run_id=self.cfg.runtime.run_id,
                                  expected_numel=self.exp.spec.numel if kind == MODEL else 0,
                                  limits=self.limits)

    def _deliver(self, r: int, purpose: int, arrival: Arrival) -> None:
        """File a model (under the lock); models for rounds this peer is done with are dropped."""
        arrival.t = time.monotonic()
        self.box.deliver(r, purpose, arrival)

    # --- the event loop: act on the lowest round first, training before aggregating ----------
    def _loop(self) -> None:
        box = self.box
        if box.trained == 0 and self.node in protocol.bootstrap(self.pool, self.cfg.seed, 1,
                                                                self.algorithm.sample_size):
            with self.lock:      # round 1: no aggregate exists yet, every node holds the initial model
                self._deliver(1, TRAIN, Arrival(self.node, self.params[0].clone(), 0))
        while True:
            with self.lock:
                while (task := box.next_action(time.monotonic(), self.free_since)) is None:
                    now, open_ = time.monotonic(), box.open_rounds()
                    if self.done_at is not None and not open_ and not self._owes(self.done_at):
                        return
                    if now - max(self.last_heard, self.free_since) > self.stall_s and not open_:
                        log.warning("peer %d: heard nothing for %.0f s; the run stalled, stopping",
                                    self.node, self.stall_s)
                        return
                    self.lock.wait(timeout=box.wait_s(
                        now, self.free_since, max(self.last_heard, self.free_since) + self.stall_s))
            if isinstance(task, protocol.Train):
                self._train(task.round, task.start)
            else:
                self._aggregate(task.round, task.arrivals)
            with self.lock:
                self.free_since = time.monotonic()

    def _owes(self, r: int) -> bool:
        """Whether this peer still owes the last round ``r`` its aggregate: it is one of the
        round's first-ranked aggregators and has not aggregated it. Another aggregator's DONE
        can arrive while this one's trainers' models are still on their way (it ended the run
        with one aggregator fewer than the simulator's under load); a peer whose models never
        come stops at the stall timeout as before."""
        first = protocol.aggregators(self.everyone, self.cfg.seed, r)[: self.algorithm.aggregators]
        return self.node in first.tolist() and self.box.aggregated < r

    # --- the work --------------------------------------------------------------------------------
    def _train(self, r: int, start: Arrival) -> None:
        params = start.tensor.reshape(1, -1).clone()
        result = self.exp.trainer.train(params, np.array([self.node]), r, inplace=True)
        self.params = params
        samples = int(result.samples[0])
        self._checkpoint()
        ranked = protocol.aggregators(self.everyone, self.cfg.seed, r)
        self._submit(self._send_model, r, AGGREGATE, ranked, self.algorithm.aggregators,
                     Arrival(self.node, params[0].clone(), samples),
                     # DP-SGD steps as training ended: the record is written by a background
                     # job, when this node may already have trained a later round
                     {"train_loss": float(result.loss[0]), "samples": samples, "dp_steps": self.dp_steps()})

    def _aggregate(self, r: int, arrivals: list[Arrival]) -> None:
        self.params = protocol.average(self.algorithm, torch.stack([a.tensor for a in arrivals]),
                                       np.array([a.samples for a in arrivals])).reshape(1, -1)
        wall = _wall()
        if r < self.cfg.stop.rounds:       # feed round r + 1's trainers
            self._submit(self._send_model, r + 1, TRAIN, protocol.trainers(self.pool, self.cfg.seed, r + 1),
                         self.k, Arrival(self.node, self.params[0].clone(), 0), {})
        else:
            with self.lock:
                told = self.done_at is not None      # another aggregator already told everyone
                self.done_at = r
            if not told:
                self._submit(self._broadcast_done, r)
        row = {"models": len(arrivals), "wall_time": wall,
               "rank": int(np.flatnonzero(protocol.aggregators(self.everyone, self.cfg.seed, r) == self.node)[0])}
        if r % self.cfg.eval.every == 0 or r == self.cfg.stop.rounds:
            acc, loss = self.exp.evaluator.evaluate(self.params)
            row.update(test_accuracy=float(acc[0]), test_loss=float(loss[0]))
            save_checkpoint(self.peer_dir / f"model-{self.node}-r{r}.pt", {"params": self.params[0]},
                            keep_previous=False)
        self._record(r, "aggregate", **row)
        self._checkpoint()

    # --- sending ------------------------------------------------------------------------------
    def _submit(self, fn, *args: Any) -> None:
        """Run ``fn`` in the background (sending never blocks the event loop); log its failure."""
        def report(done: futures.Future) -> None:
            if done.exception() is not None:
                log.error("peer %d: %s failed: %r", self.node, fn.__name__, done.exception())

        self.jobs.submit(fn, *args).add_done_callback(report)

    def _send_model(self, r: int, purpose: int, ranked: np.ndarray, k: int, local: Arrival,
                    row: dict[str, Any]) -> None:
        """Send a model to the first ``k`` responsive of ``ranked`` (:func:`probe`'s waves) and
        record the row: ``train`` (round ``r``'s upload) or ``feed`` (round ``r``'s start)."""
        frames = [f.SerializeToString() for f in model_frames(
            local.tensor, sender=self.node, round=r, meta=(local.samples << 1) | purpose,
            run_id=self.cfg.runtime.run_id, chunk_bytes=self.limits.chunk_bytes)]
        chosen, skipped, pos = [], [], min(k, len(ranked))
        pending = [int(j) for j in ranked[:pos]]
        while pending:
            ok = list(self.pushers.map(lambda j: self._push_model(j, r, purpose, frames, local), pending))
            chosen += [j for j, good in zip(pending, ok, strict=True) if good]
            failed = [j for j, good in zip(pending, ok, strict=True) if not good]
            if failed:
                log.warning("peer %d round %d: %s did not answer within %.1f s; taking the next "
                            "candidates", self.node, r, failed, self.algorithm.timeout_s)
            skipped += failed
            pending = [int(j) for j in ranked[pos:pos + len(failed)]]
            pos += len(pending)
        if not chosen:
            log.warning("peer %d round %d: nobody to send to", self.node, r)
        sent = sum(len(f) for f in frames) * sum(j != self.node for j in chosen)
        role = "train" if purpose == AGGREGATE else "feed"
        self._record(r, role, sent=sent, timeouts=len(skipped), **row)
        self._maybe_die(r if purpose == AGGREGATE else r - 1)

    def _push_model(self, j: int, r: int, purpose: int, frames: list[bytes], local: Arrival) -> bool:
        if j == self.node:                           # a copy for oneself costs nothing
            with self.lock:
                self._deliver(r, purpose, Arrival(j, local.tensor, local.samples))
                self.lock.notify_all()
            return True
        return self._push(j, frames)

    def _push(self, j: int, frames: list[bytes]) -> bool:
        """One message to peer ``j``: True once accepted, False when it did not answer within
        ``timeout_s`` (transient errors are retried until then) or rejected the message."""
        timeout = self.algorithm.timeout_s
        call_s = max(timeout, self.cfg.runtime.round_timeout_s)     # the transfer itself may take long
        try:
            reply = retry(lambda: self.stubs[j](iter(frames), timeout=call_s),
                          what=f"push to {j}", deadline_s=timeout,
                          max_backoff_s=min(self.cfg.runtime.retry_max_s, timeout / 4))
            ack = parse(schema.Ack, reply)
        except (grpc.RpcError, WireError):
            return False
        if not ack.ok:
            log.warning("peer %d: peer %d rejected a message: %s", self.node, j, ack.reason)
            return False
        with self.lock:
            self.bytes_up += sum(len(f) for f in frames)
        return True

    def _broadcast_done(self, r: int) -> None:
        frames = [f.SerializeToString() for f in model_frames(
            torch.empty(0), kind=DONE, sender=self.node, round=r, run_id=self.cfg.runtime.run_id)]
        with self.lock:
            targets = [j for j in range(self.exp.num_nodes) if j != self.node and j not in self.done_from]
        list(self.pushers.map(lambda j: self._push(j, frames), targets))

    # --- records --------------------------------------------------------------------------------
    def _record(self, r: int, role: str, **values: Any) -> None:
        with self.lock:
            row = {"round": r, "role": role, "wall_time": _wall(), "bytes_up": self.bytes_up,
                   "bytes_down": self.bytes_down}
        row.update(values)
        with self.rows_lock:
            self.metrics.append(row)

    def _checkpoint(self) -> None:
        with self.lock:
            state = {"params": self.params, "trained": self.box.trained, "aggregated": self.box.aggregated,
                     "bytes_up": self.bytes_up, "bytes_down": self.bytes_down}
        save_checkpoint(self.ckpt, state)

    def _maybe_die(self, r: int) -> None:
        """Tests: ``GOSSAMER_TEST_KILL_AT_ROUND=id:r`` kills this peer like ``kill -9`` once it
        has sent its first model for round ``r`` (a trainer's upload, an aggregator's feed)."""
        if os.environ.get("GOSSAMER_TEST_KILL_AT_ROUND") == f"{self.node}:{r}":
            os.kill(os.getpid(), signal.SIGKILL)

    def run(self, peers: dict[int, str] | Path) -> None:
        workers = self.k + self.algorithm.aggregators + 8
        with self.serving({"Push": grpc.stream_unary_rpc_method_handler(self.push)}, workers):
            try:
                self.stubs = peering.pushers(self.link(peers, np.delete(self.everyone, self.node)))
                with self.lock:
                    self.last_heard = self.free_since = time.monotonic()
                self._record(max(self.box.trained, self.box.aggregated), "start")
                self._loop()
            finally:
                self.jobs.shutdown(wait=True)         # our last models and notices go out
                self.pushers.shutdown(wait=True)
                self._record(max(self.box.trained, self.box.aggregated), "exit")
