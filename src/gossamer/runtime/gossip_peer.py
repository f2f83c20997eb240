"""An asynchronous gossip-learning peer process over gRPC.

It executes :mod:`gossamer.protocols.gossip` for one node on the wall clock: the
protocol's :class:`~gossamer.protocols.gossip.Clock` says when the peer exchanges (the
simulator's counter-based gaps, mean ``period_s``) and with which neighbour (the same draw),
and the peer pushes its model (``push``), pulls the neighbour's (``pull``), or both
(``push_pull``). Received models queue up and a
worker merges and trains on them one at a time with the algorithm's ``merge_models`` and
the simulator's trainer. A "round" is one ``period_s`` of wall time; metrics rows are
written every ``eval.every`` rounds, in the same per-peer format as the D-PSGD peer.

With ``clocks: dual`` (DADAO) the exchange clock above only communicates: a received model
is merged on arrival, without training. A second thread runs the computation clock (mean gap
``compute_period_s``, the simulator's ``STREAM_GOSSIP_COMPUTE`` draws; only a peer with data
has one): at each tick it takes one local update on the own data, unless the previous update
is still running, in which case the tick is skipped (as in the simulator, no backlog builds
up). The update is computed from the model at the tick and applied as a delta to the model
as it is when it completes, so merges that arrived meanwhile are kept (the simulator takes
the gradient at completion; on real processes training takes time). At the end each peer
writes ``peers/gossip-<id>.json``: exchanges, failed exchanges, merges, local updates,
computation ticks and skipped ticks.
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
from gossamer.experiment import build as build_experiment
from gossamer.metrics.runstore import MetricsWriter, save_checkpoint, write_json
from gossamer.protocols import gossip as protocol
from gossamer.runtime import peering, schema
from gossamer.runtime.codec import WireError, model_frames, parse, read_model
from gossamer.runtime.common import limits, log, security
from gossamer.runtime.dl_peer import PEER_COLUMNS


class GossipPeer:
    def __init__(self, cfg: ExperimentConfig, node_id: int, run_dir: Path, *,
                 listen: str = "127.0.0.1:0", resume: bool = False) -> None:
        if resume:
            raise ValueError("--resume: gossip peers restart from a fresh clock; drop --resume")
        self.cfg, self.node, self.run_dir = cfg, node_id, Path(run_dir)
        self.exp = build_experiment(cfg, population=False)
        self.algorithm = self.exp.algorithm
        if not 0 <= node_id < self.exp.num_nodes:
            raise ValueError(f"--id: node id {node_id} is outside 0..{self.exp.num_nodes - 1}")
        if self.exp.dynamic is not None:
            raise ConfigError("topology.name", f"gossip peers need a static graph; {cfg.topology.name} "
                              "(a graph per round) runs in the simulator, or with `gossamer peer` "
                              "for synchronous algorithms such as dpsgd")
        self.dual = not protocol.trains_on_arrival(self.algorithm)
        self.listen = listen
        self.security, self.limits = security(cfg, node=node_id, peer=True), limits(cfg)
        self.token = self.security.resolved_token()
        self.neighbors = [int(j) for j in self.exp.topology.neighbors(node_id)]
        init = self.exp.init_params
        self.params = (init if init.dim() == 1 else init[node_id]).clone().reshape(1, -1)
        self.age = 0
        self.updates = 0
        self.lock = threading.Lock()
        self.received: queue.Queue = queue.Queue()
        self.bytes_up = self.bytes_down = 0
        self.dropped = 0
        self.exchanges = self.merges = 0              # exchange-clock ticks, models merged
        self.ticks = self.skipped = 0                 # computation-clock ticks (dual), skipped ones
        self.version = 0                              # bumped by every merge (dual clocks)
        self.peer_dir = self.run_dir / "peers"
        self.peer_dir.mkdir(parents=True, exist_ok=True)
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
        node = np.array([self.node])
        while not self.stop.is_set():
            try:
                tensor, age = self.received.get(timeout=0.05)
            except queue.Empty:
                continue
            if self.dual:                             # merged on arrival; training has its own clock
                with self.lock:
                    self.params, new_age = self.algorithm.merge_models(
                        self.params, torch.tensor([float(self.age)]), tensor.reshape(1, -1),
                        torch.tensor([float(age)]), spec=self.exp.spec)
                    self.age = int(new_age[0])
                    self.version += 1
                    self.merges += 1
                continue
            with self.lock:
                own, own_age = self.params, torch.tensor([float(self.age)])
            merged, new_age = self.algorithm.merge_models(own, own_age, tensor.reshape(1, -1),
                                                          torch.tensor([float(age)]), spec=self.exp.spec)
            result = self.exp.trainer.train(merged, node, np.array([self.updates]), inplace=True)
            with self.lock:
                self.params = result.params
                self.age = int(new_age[0]) + int(result.steps[0] > 0)
                self.updates += 1
                self.merges += 1

    # --- dual clocks: the computation clock ----------------------------------------------------
    def _compute(self, start: float, end_s: float) -> None:
        """Tick on the computation clock until ``end_s`` (seconds after ``start``); a tick
        takes one local update, or is skipped if the previous one is still running."""
        k, tick = 0, self._gap(0, compute=True)
        while tick < end_s:
            wait = tick - (time.monotonic() - start)
            if wait > 0 and self.stop.wait(wait):
                return
            self.ticks += 1
            self._local_update()
            done = time.monotonic() - start
            k, tick = k + 1, tick + self._gap(k + 1, compute=True)
            while tick < min(done, end_s):            # ticks that found the peer busy
                self.ticks += 1
                self.skipped += 1
                k, tick = k + 1, tick + self._gap(k + 1, compute=True)

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

    # --- the clock: wake, pick a neighbour, exchange -------------------------------------------
    def _gap(self, k: int, compute: bool = False) -> float:
        """Gap from the k-th tick to the next of the exchange (or computation) clock: the
        simulator's counter-based draw, exponential or periodic with a random phase."""
        return self.algorithm.clock_gap(self.cfg.seed, self.node, k, compute=compute)

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
        row.update(test_accuracy=float(acc[0]), test_loss=float(loss[0]))
        if round_ > 0:
            save_checkpoint(self.peer_dir / f"model-{self.node}-r{round_}.pt", {"params": params[0]},
                            keep_previous=False)
        return row

    def run(self, peers: dict[int, str] | Path) -> None:
        server = peering.serve(self.cfg, self.security, self.token, self.node, self.listen, {
            "Push": grpc.stream_unary_rpc_method_handler(self.push),
            "Pull": grpc.unary_stream_rpc_method_handler(self.pull)}, self.peer_dir,
            len(self.neighbors) + 4)
        worker = threading.Thread(target=self._work, daemon=True)
        computer: threading.Thread | None = None
        try:
            if isinstance(peers, Path):
                peers = peering.wait_for_peers(peers, self.exp.num_nodes,
                                               self.cfg.runtime.join_timeout_s)
            links = peering.channels(self.cfg, self.security, self.token, peers, self.neighbors)
            pushers = {j: c.stream_unary(schema.method("Peer", "Push")) for j, c in links.items()}
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
            time.sleep(0.5)
            server.stop(grace=1.0).wait()

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
