"""An asynchronous gossip-learning peer process over gRPC.

It executes :mod:`gossamer.protocols.gossip` for one node on the wall clock: the protocol's
:class:`~gossamer.protocols.gossip.Clock` says when to exchange, with whom and when to record
a row (a "round" is ``period_s`` of wall time). Received models queue up; a worker merges
them and, with one clock, trains on each. With dual clocks a second thread runs the
computation clock (data holders only): a tick takes one local update unless the last one is
still running (then it is skipped); the update is applied as a delta to the model as it is
when it completes, so merges that arrived meanwhile are kept (on real processes training
takes time). At the end each peer writes ``peers/gossip-<id>.json`` (exchanges, failed ones,
merges, updates, computation ticks, skipped ticks).
"""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch

from gossamer.config import ConfigError, ExperimentConfig
from gossamer.metrics.runstore import MetricsWriter, save_checkpoint, write_json
from gossamer.protocols import gossip as protocol
from gossamer.runtime import peering, schema
from gossamer.runtime.codec import WireError, model_frames, parse, read_model
from gossamer.runtime.common import log
from gossamer.runtime.dl_peer import PEER_COLUMNS


class GossipPeer(peering.PeerNode):
    def __init__(self, cfg: ExperimentConfig, node_id: int, run_dir: Path, *,
                 listen: str = "127.0.0.1:0", resume: bool = False) -> None:
        if resume:
            raise ValueError("--resume: gossip peers restart from a fresh clock; drop --resume")
        super().__init__(cfg, node_id, run_dir, listen)
        if self.exp.dynamic is not None:
            raise ConfigError("topology.name", f"gossip peers need a static graph; {cfg.topology.name} "
                              "(a graph per round) runs in the simulator, or with `gossamer peer` "
                              "for synchronous algorithms such as dpsgd")
        self.dual = not protocol.trains_on_arrival(self.algorithm)
        self.neighbors = [int(j) for j in self.exp.topology.neighbors(node_id)]
        self.age = 0
        self.updates = 0
        self.lock = threading.Lock()
        self.received: queue.Queue = queue.Queue()
        self.bytes_up = self.bytes_down = 0
        self.dropped = 0
        self.exchanges = self.merges = 0              # exchange-clock ticks, models merged
        self.ticks = self.skipped = 0                 # computation-clock ticks (dual), skipped ones
        self.version = 0                              # bumped by every merge (dual clocks)
        self.metrics = MetricsWriter(self.peer_dir / f"metrics-{node_id}.csv", PEER_COLUMNS)
        self.stop = threading.Event()

    # --- the Peer service -------------------------------------------------------------------------
    def push(self, chunks, context: grpc.ServicerContext) -> bytes:
        try:
            meta, tensor, size = peering.accept_push(
                chunks, node=self.node, neighbors=self.neighbors, numel=self.exp.spec.numel,
                run_id=self.cfg.runtime.run_id, limits=self.limits)
            peering.check_sender(context, int(meta.sender), self.security)
        except WireError as exc:
            return peering.reject(self.node, exc)
        with self.lock:
            self.bytes_down += size
        self.received.put((tensor, int(meta.meta)))
        return schema.Ack(ok=True).SerializeToString()

    def pull(self, data: bytes, context: grpc.ServicerContext):
        try:
            req = parse(schema.PullRequest, data)
        except WireError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if req.node_id not in self.neighbors:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "not a neighbour")
        for frame in self._frames():
            data = frame.SerializeToString()
            with self.lock:
                self.bytes_up += len(data)
            yield data

    def _frames(self) -> list:
        with self.lock:
            row, age = self.params[0].clone(), self.age
        return list(model_frames(row, sender=self.node, meta=age, run_id=self.cfg.runtime.run_id,
                                 chunk_bytes=self.limits.chunk_bytes))

    # --- the worker: merge and train on received models, one at a time -----------------------
    def _work(self) -> None:
        while not self.stop.is_set():
            try:
                tensor, age = self.received.get(timeout=0.05)
            except queue.Empty:
                continue
            self._take(tensor, age)

    def _take(self, tensor: torch.Tensor, age: int) -> None:
        """Merge a received model (with one clock, then train on it: the update's key is this
        node's count of updates, as in the simulator)."""
        if self.dual:                                 # merged on arrival; training has its own clock
            with self.lock:
                self.params, new_age = self.algorithm.merge_models(
                    self.params, torch.tensor([float(self.age)]), tensor.reshape(1, -1),
                    torch.tensor([float(age)]), spec=self.exp.spec)
                self.age = int(new_age[0])
                self.version += 1
                self.merges += 1
            return
        with self.lock:
            own, own_age = self.params, torch.tensor([float(self.age)])
        merged, new_age = self.algorithm.merge_models(own, own_age, tensor.reshape(1, -1),
                                                      torch.tensor([float(age)]), spec=self.exp.spec)
        result = self.exp.trainer.train(merged, np.array([self.node]), np.array([self.updates]), inplace=True)
        with self.lock:
            self.params = result.params
            self.age = int(new_age[0]) + int(result.steps[0] > 0)
            self.updates += 1
            self.merges += 1

    # --- dual clocks: the computation clock ----------------------------------------------------
    def _compute(self, start: float, end_s: float) -> None:
        """Tick on the computation clock until ``end_s`` (seconds after ``start``); a tick
        takes one local update, or is skipped if the previous one is still running."""
        def gap(k: int) -> float:
            return self.algorithm.clock_gap(self.cfg.seed, self.node, k, compute=True)

        k, tick, done = 0, gap(0), 0.0
        while tick < end_s:
            wait = tick - (time.monotonic() - start)
            if wait > 0 and self.stop.wait(wait):
                return
            self.ticks += 1
            if protocol.tick_trains(online=True, busy=tick < done):
                self._local_update()
                done = time.monotonic() - start
            else:
                self.skipped += 1
            k, tick = k + 1, tick + gap(k + 1)

    def _local_update(self) -> None:
        """One update on the own data from the model at the tick, applied as a delta to the
        model as it is now (exactly the trained model when nothing was merged meanwhile)."""
        with self.lock:
            before, version, key = self.params.clone(), self.version, self.updates
        result = self.exp.trainer.train(before.clone(), np.array([self.node]), np.array([key]),
                                        inplace=True)
        with self.lock:
            if self.version == version:
                self.params = result.params
            else:
                self.params = self.params + (result.params - before)
            self.age += int(result.steps[0] > 0)
            self.updates += 1

    # --- the exchange clock: the protocol's Clock ---------------------------------------------
    def _exchange(self, peer: int, pushers: dict[int, Any], pullers: dict[int, Any]) -> None:
        if peer < 0:
            return
        self.exchanges += 1
        push, pull = protocol.exchange(self.algorithm.mode)
        try:
            if push:
                frames = [f.SerializeToString() for f in self._frames()]
                pushers[peer](iter(frames), timeout=10)
                with self.lock:
                    self.bytes_up += sum(len(f) for f in frames)
            if pull:
                req = schema.PullRequest(node_id=self.node, run_id=self.cfg.runtime.run_id)
                raw = list(pullers[peer](req.SerializeToString(), timeout=10))
                meta, tensor = read_model((parse(schema.Frame, b) for b in raw),
                                          expected_numel=self.exp.spec.numel,
                                          run_id=self.cfg.runtime.run_id, limits=self.limits)
                with self.lock:
                    self.bytes_down += sum(len(b) for b in raw)
                self.received.put((tensor.float().clone(), int(meta.meta)))
        except (grpc.RpcError, WireError) as exc:
            self.dropped += 1
            log.info("peer %d: exchange with %d failed (%s)", self.node, peer,
                     exc.code() if isinstance(exc, grpc.RpcError) else exc)

    def _row(self, round_: int, elapsed: float) -> dict[str, Any]:
        with self.lock:
            params = self.params.clone()
            row = {"round": round_, "sim_time_s": elapsed, "bytes_up": self.bytes_up,
                   "bytes_down": self.bytes_down}
        acc, loss = self.exp.evaluator.evaluate(params)
        row.update(test_accuracy=float(acc[0]), test_loss=float(loss[0]), dp_steps=self.dp_steps())
        if round_ > 0:
            save_checkpoint(self.peer_dir / f"model-{self.node}-r{round_}.pt", {"params": params[0]},
                            keep_previous=False)
        return row

    def run(self, peers: dict[int, str] | Path) -> None:
        with self.serving({"Push": grpc.stream_unary_rpc_method_handler(self.push),
                           "Pull": grpc.unary_stream_rpc_method_handler(self.pull)}, len(self.neighbors) + 4):
            self._run(peers)

    def _run(self, peers: dict[int, str] | Path) -> None:
        worker = threading.Thread(target=self._work, daemon=True)
        computer: threading.Thread | None = None
        try:
            links = self.link(peers, self.neighbors)
            pushers = peering.pushers(links)
            pullers = {j: c.unary_stream(schema.method("Peer", "Pull")) for j, c in links.items()}
            worker.start()
            end_round = protocol.end_round(self.algorithm, self.cfg.stop)
            start, end_s = time.monotonic(), end_round * self.algorithm.period_s
            self.metrics.append(self._row(0, 0.0))
            if self.dual and self.exp.trainer.sizes[self.node] > 0:   # only data holders compute
                computer = threading.Thread(target=self._compute, args=(start, end_s), daemon=True)
                computer.start()
            self._clock(pushers, pullers, start, end_round)
            if computer is not None:                  # its last tick is before end_s: let it finish
                computer.join(timeout=self.cfg.runtime.round_timeout_s)
        finally:
            self.stop.set()
            for thread in (worker, computer):
                if thread is not None and thread.is_alive():
                    thread.join(timeout=5)
            write_json(self.peer_dir / f"gossip-{self.node}.json", {
                "clocks": self.algorithm.clocks, "exchanges": self.exchanges,
                "exchanges_failed": self.dropped, "merges": self.merges, "updates": self.updates,
                "compute_ticks": self.ticks, "compute_skipped": self.skipped})

    def _clock(self, pushers: dict[int, Any], pullers: dict[int, Any], start: float, end_round: int) -> None:
        clock = protocol.Clock(self.algorithm, self.cfg.seed, self.node, self.neighbors,
                               protocol.eval_rounds(self.cfg.eval.every, end_round))
        while (action := clock.next(now := time.monotonic() - start)) is not None:
            if isinstance(action, protocol.Exchange):
                self._exchange(action.peer, pushers, pullers)
            elif isinstance(action, protocol.Record):
                self.metrics.append(self._row(action.round, now))
            else:
                time.sleep(max(0.0, action.seconds))
