"""A random-walk (token) learning peer process over gRPC.

It executes :mod:`gossamer.protocols.random_walk` one token at a time: a token (a message of
``runtime/walk_wire.py``) that reaches a peer trains there and goes where the protocol's draw
says; tokens walk at their own pace, nothing waits for a round boundary. A neighbour that
cannot be reached within ``runtime.round_timeout_s`` (one second once known to be down) is
dropped from the draw (the protocol's redraw with the same uniform). A token's last sender and
holder flood a done notice; a peer exits once every token is done, and a peer that fails
floods an abort notice so the others stop with an error. Every visit appends a line to
``peers/visits-<id>.jsonl`` (token, hop, node, next node, bytes, wall seconds; at evaluation
hops accuracy and loss, and the model in ``peers/token-<t>-r<hop>.pt``), which
``runtime/dl_merge.py`` turns into ``metrics.csv``.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from gossamer.config import ConfigError, ExperimentConfig
from gossamer.metrics.runstore import save_checkpoint
from gossamer.protocols import random_walk as protocol
from gossamer.runtime import peering, schema
from gossamer.runtime.codec import WireError, parse
from gossamer.runtime.common import log, retry
from gossamer.runtime.walk_wire import (
    KIND_ABORT,
    KIND_DONE,
    Expect,
    Token,
    notice_frame,
    read_message,
    token_frames,
)


def check_config(cfg: ExperimentConfig) -> None:
    """What a walk peer cannot run, as one-line errors naming the field (before any spawn)."""
    from gossamer.algorithms import ALGORITHMS
    from gossamer.topology.dynamic import DYNAMIC_TOPOLOGIES

    if ALGORITHMS.get(cfg.algorithm.name).pattern != "random_walk":
        raise ConfigError("algorithm.name", f"{cfg.algorithm.name} is not a random-walk algorithm")
    topo = cfg.topology
    if topo is not None and (topo.name in DYNAMIC_TOPOLOGIES or topo.resample != "never"):
        raise ConfigError("topology", f"random-walk peers need a static graph; {topo.name} "
                          "(a graph per round) is not supported")
    if cfg.stop.max_sim_time_s is not None:
        raise ConfigError("stop.max_sim_time_s", "real processes have no simulated clock; "
                          "walk peers stop after stop.rounds hops")
    if cfg.stop.target_accuracy is not None and cfg.stop.stop_at_target:
        raise ConfigError("stop.target_accuracy", "walk peers cannot stop every token at a "
                          "target; set stop.stop_at_target: false or drop the target")


class WalkPeer(peering.PeerNode):
    check_config = staticmethod(check_config)

    def __init__(self, cfg: ExperimentConfig, node_id: int, run_dir: Path, *,
                 listen: str = "127.0.0.1:0", resume: bool = False) -> None:
        if resume:
            raise ValueError("--resume: walk peers cannot resume (a token held by a dead peer is "
                             "lost); start the run again")
        check_config(cfg)
        super().__init__(cfg, node_id, run_dir, listen)
        exp, algo, n = self.exp, self.algorithm, self.exp.num_nodes
        protocol.check(algo, exp.topology, exp.adversary, exp.dynamic)
        self.neighbors = [int(j) for j in exp.topology.neighbors(node_id)]
        self.tokens, self.rounds = algo.num_tokens, cfg.stop.rounds
        self.mu = algo.target(exp.topology.degrees())
        self.weights = protocol.visit_weights(algo, exp.trainer.sizes, self.mu)
        self.start = protocol.start_nodes(cfg.seed, n, self.tokens)
        self.inbox: queue.Queue[Token] = queue.Queue()
        self.lock = threading.Lock()
        self.done: set[int] = set()
        self.aborted: int | None = None               # a peer that failed, as flooded to us
        self.linked = threading.Event()               # channels to the neighbours are open
        self.stubs: dict[int, Any] = {}
        self.expect = Expect(frozenset(self.neighbors), self.tokens, self.rounds, exp.spec.numel,
                             n, algo.self_repellent, cfg.runtime.run_id, self.limits)
        self.seen: dict[int, int] = {}                # token -> latest hop count received
        self.down: set[int] = set()                   # neighbours that failed to take a token
        self.notices = futures.ThreadPoolExecutor(max_workers=len(self.neighbors) + 1)
        self.log_path = self.peer_dir / f"visits-{node_id}.jsonl"
        self.log_path.unlink(missing_ok=True)
        self.t0 = self.last_heard = time.monotonic()
        # silence this long means a token died with its holder: stop rather than hang
        self.stall_s = cfg.runtime.join_timeout_s + cfg.runtime.round_timeout_s * max(n, 1)

    # --- the Peer service -------------------------------------------------------------------------
    def push(self, chunks, context: grpc.ServicerContext) -> bytes:
        try:
            meta, token, _ = read_message(chunks, self.expect)
            peering.check_sender(context, int(meta.sender), self.security)
        except WireError as exc:
            return peering.reject(self.node, exc)
        sender, t = int(meta.sender), int(meta.meta)
        if meta.kind == KIND_ABORT:
            self._abort(t, source=sender)
            return schema.Ack(ok=True).SerializeToString()
        with self.lock:
            self.last_heard = time.monotonic()
            fresh = t not in self.done and int(meta.round) > self.seen.get(t, -1)
            if token is not None and fresh:
                self.seen[t] = token.hops
        if token is None or token.hops == self.rounds:  # a notice, or a token that has finished
            self._finish(t, source=sender)
        elif fresh:                                   # (a retried duplicate is acknowledged, dropped)
            self.inbox.put(token)
        return schema.Ack(ok=True).SerializeToString()

    # --- sending ----------------------------------------------------------------------------------
    def _deliver(self, j: int, frames: list[bytes], patience: float) -> bool:
        if not self.linked.wait(self.cfg.runtime.join_timeout_s):
            return False
        try:
            reply = retry(lambda: self.stubs[j](iter(frames), timeout=patience + 5),
                          what=f"push to {j}", deadline_s=patience,
                          max_backoff_s=self.cfg.runtime.retry_max_s)
        except grpc.RpcError as exc:
            log.warning("peer %d: neighbour %d unreachable (%s)", self.node, j, exc.code())
            return False
        ack = parse(schema.Ack, reply)
        if not ack.ok:
            log.warning("peer %d: neighbour %d refused a message: %s", self.node, j, ack.reason)
        return bool(ack.ok)

    def _finish(self, t: int, source: int) -> None:
        """Token ``t`` has made its last hop: tell every neighbour (but ``source``) once."""
        with self.lock:
            if t in self.done:
                return
            self.done.add(t)
        self._flood(KIND_DONE, t, source)

    def _abort(self, failed: int, source: int) -> None:
        """Peer ``failed`` crashed (its tokens may be lost): every peer stops with an error."""
        with self.lock:
            if self.aborted is not None:
                return
            self.aborted = failed
        self._flood(KIND_ABORT, failed, source)

    def _flood(self, kind: int, value: int, source: int) -> None:
        notice = notice_frame(kind, value, sender=self.node, rounds=self.rounds,
                              run_id=self.cfg.runtime.run_id)
        patience = min(2.0, self.cfg.runtime.round_timeout_s)
        for j in self.neighbors:
            if j != source:
                try:
                    self.notices.submit(self._deliver, j, [notice], patience)
                except RuntimeError:                  # shutting down: the run is over here
                    return

    # --- one hop ---------------------------------------------------------------------------------
    def _hop(self, token: Token) -> None:
        exp, algo, t = self.exp, self.algorithm, token.id
        r = token.hops + 1
        node = np.array([self.node])
        token.params, result = protocol.train_visits(
            exp.trainer, token.params, node, protocol.visit_keys(r, self.tokens, [t]), self.weights)
        token.visits[self.node] += 1
        token.hops = r
        d = protocol.draw(algo, exp.topology, self.cfg.seed, [t], node, token.visits[None], self.mu, r)
        allowed = d.cand.nodes >= 0
        frames, sent, failed = None, 0, []
        while True:
            nxt = int(protocol.choose(algo, d, allowed)[0])
            if nxt < 0 or nxt == self.node:           # a self-loop, or nowhere left to go: stay
                nxt = self.node
                break
            frames = frames or token_frames(token, sender=self.node, run_id=self.cfg.runtime.run_id,
                                            with_visits=algo.self_repellent,
                                            chunk_bytes=self.limits.chunk_bytes)
            patience = 1.0 if nxt in self.down else self.cfg.runtime.round_timeout_s
            if self._deliver(nxt, frames, patience):
                self.down.discard(nxt)
                sent = sum(len(f) for f in frames)
                break
            self.down.add(nxt)
            failed.append(nxt)
            allowed &= d.cand.nodes != nxt              # redraw among the others, same uniform
        record = {"token": t, "round": r, "node": self.node, "next": nxt, "bytes": sent,
                  "failed": failed, "time": time.monotonic() - self.t0,
                  "train_loss": float(result.loss[0]), "steps": int(result.steps[0])}
        self._record(record, token)
        if nxt == self.node and r < self.rounds:
            self.inbox.put(token)                     # stays: trains here again next hop
        elif r == self.rounds:
            self._finish(t, source=nxt)

    def _record(self, record: dict[str, Any], token: Token) -> None:
        r = record["round"]
        if r % self.cfg.eval.every == 0 or r == self.rounds:
            acc, loss = self.exp.evaluator.evaluate(token.params)
            record.update(acc=float(acc[0]), loss=float(loss[0]))
            save_checkpoint(self.peer_dir / f"token-{token.id}-r{r}.pt", {"params": token.params[0]},
                            keep_previous=False)
        with self.log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    # --- the process ------------------------------------------------------------------------------
    def run(self, peers: dict[int, str] | Path) -> None:
        with self.serving({"Push": grpc.stream_unary_rpc_method_handler(self.push)}, len(self.neighbors) + 4):
            try:
                self.stubs = peering.pushers(self.link(peers, self.neighbors))
                self.linked.set()
                self.t0 = self.last_heard = time.monotonic()
                self._start_tokens()
                self._walk()
            except Exception:
                self._abort(self.node, source=self.node)   # the others stop too rather than wait
                raise
            finally:
                self.notices.shutdown(wait=True)      # our notices reach the neighbours

    def _start_tokens(self) -> None:
        for t in np.flatnonzero(self.start == self.node).tolist():
            token = Token(t, 0, self.params.clone(), np.zeros(self.exp.num_nodes, dtype=np.int64))
            self._record({"token": t, "round": 0, "node": self.node, "next": self.node,
                          "bytes": 0, "failed": [], "time": 0.0}, token)
            self.inbox.put(token)

    def _walk(self) -> None:
        while True:
            with self.lock:
                if len(self.done) == self.tokens:
                    return
                silent, failed = time.monotonic() - self.last_heard, self.aborted
            if failed is not None:
                raise RuntimeError(f"peer {self.node}: peer {failed} failed; the run is aborted")
            if silent > self.stall_s:
                raise RuntimeError(f"peer {self.node}: nothing heard for {silent:.0f} s; a token "
                                   "was probably lost with a dead peer")
            try:
                token = self.inbox.get(timeout=0.05)
            except queue.Empty:
                continue
            self._hop(token)
            with self.lock:
                self.last_heard = time.monotonic()

