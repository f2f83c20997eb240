"""A decentralized peer process: the synchronous D-PSGD pattern over gRPC.

It executes :mod:`gossamer.protocols.sync_dl` for one node: each round it trains on its shard,
pushes its model to the round's receivers, waits for its senders' models of that round (at
most ``runtime.round_timeout_s``) and merges them with ``protocol.held_weights``. It accepts
pushes from its neighbours (anyone, on a dynamic topology), checkpoints after every round
(``--resume`` continues from there), catches up with its neighbours' round after being down,
and writes rows (own accuracy and loss, bytes, wall seconds) to ``peers/metrics-<id>.csv``.

``final_merge``: every peer sends its model to every other and averages what it holds
(``protocol.merge_all``). A peer that acknowledged our model is waited for (up to
``join_timeout_s``); one our push could not reach within ``round_timeout_s`` is left out, as
the simulator leaves out offline nodes. It is a direct all-to-all exchange (``n - 1`` model
messages each way per peer, counted), where the simulator costs a ring all-reduce.
``runtime/tracking_peer.py`` extends the peer to the ``gradient_tracking`` pattern.
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

from gossamer.aggregators import needs_losses
from gossamer.config import ConfigError, ExperimentConfig
from gossamer.metrics.runstore import (
    MetricsWriter,
    checkpoint_exists,
    load_checkpoint,
    save_checkpoint,
)
from gossamer.protocols import sync_dl as protocol
from gossamer.runtime import peering, schema
from gossamer.runtime.codec import WireError, model_frames, peek_meta
from gossamer.runtime.common import log, retry
from gossamer.training.evaluator import local_losses

PEER_COLUMNS = ["round", "sim_time_s", "bytes_up", "bytes_down", "test_accuracy", "test_loss", "dp_steps"]
FINAL_MERGE = 1 << 32       # ModelMeta.meta of the final merge's messages (else the gossip step)


class Peer(peering.PeerNode):
    pattern = "sync_dl"     # the algorithm pattern this class runs
    vectors = 1             # model-sized vectors per gossip message

    def __init__(self, cfg: ExperimentConfig, node_id: int, run_dir: Path, *,
                 listen: str = "127.0.0.1:0", resume: bool = False) -> None:
        self.check_config(cfg)
        super().__init__(cfg, node_id, run_dir, listen)
        self.dynamic = self.exp.dynamic
        self.static = protocol.static_graph(self.exp.topology, self.exp.mixing_scipy)
        if self.dynamic is None:
            self.neighbors = [int(j) for j in self.exp.topology.neighbors(node_id)]
            self.view = protocol.peer_view(self.static, node_id)
        else:   # a graph per round: anyone may become a neighbour; `_use_round` picks the round's
            self.neighbors = [j for j in range(self.exp.num_nodes) if j != node_id]
            self.view = protocol.PeerView([], [], {})
        # whom this peer links to: its neighbours, or everyone when the final merge needs it
        others = [j for j in range(self.exp.num_nodes) if j != node_id]
        self.contacts = others if self.algorithm.final_merge else self.neighbors
        self.round = 0
        self.bytes_up = self.bytes_down = 0
        self.elapsed_before = 0.0
        self.inbox: dict[tuple[int, int], dict[int, torch.Tensor]] = {}
        self.down: set[int] = set()                   # neighbours that missed a round
        self.latest: dict[int, int] = {}              # latest round heard from each neighbour
        self._receivers: dict[int, set[int]] = {}     # whom this peer sends to, by round
        self.lock = threading.Condition()
        self.sender = futures.ThreadPoolExecutor(max_workers=2 * max(1, len(self.neighbors)))
        self._init_state()
        self.metrics = MetricsWriter(self.peer_dir / f"metrics-{node_id}.csv", PEER_COLUMNS)
        self.ckpt = self.peer_dir / f"checkpoint-{node_id}.pt"
        if resume and checkpoint_exists(self.ckpt):
            state = load_checkpoint(self.ckpt)        # or checkpoint-i.prev.pt, if damaged
            self.params, self.round = state["params"], int(state["round"])
            self.bytes_up, self.bytes_down = int(state["bytes_up"]), int(state["bytes_down"])
            self.elapsed_before = float(state["elapsed"])
            if self.dp_ledger is not None and "dp_steps" in state:
                self.dp_ledger.steps[self.node] = int(state["dp_steps"])
            self._load_state(state)
            self.metrics.load_existing(self.round)

    @classmethod
    def check_config(cls, cfg: ExperimentConfig) -> Any:
        """What this peer refuses, as one-line errors naming the field (the launcher asks
        before spawning): another pattern, and the protocol's refusals of the final merge.
        Returns the config's algorithm (for a subclass's own checks)."""
        from gossamer.algorithms import ALGORITHMS

        kind = ALGORITHMS.get(cfg.algorithm.name)
        if kind.pattern != cls.pattern:
            raise ConfigError("algorithm.name", f"this peer runs the {cls.pattern} pattern; "
                              f"{cfg.algorithm.name} is {kind.pattern} (see runtime/roles.py)")
        try:
            algorithm = kind.from_params(cfg.algorithm.params)
        except ValueError as exc:
            raise ConfigError("algorithm.params", str(exc).splitlines()[0]) from None
        protocol.check_final_merge(algorithm, cfg, protocol.gathered(algorithm, None))
        return algorithm

    # --- what a subclass adds to a peer's state -------------------------------------------------
    def _init_state(self) -> None:
        """Extra per-node state (gradient tracking: the correction), before any resume."""

    def _state(self) -> dict[str, Any]:
        """Extra tensors for the checkpoint."""
        return {}

    def _load_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`_state` saved."""

    # --- the Peer service ---------------------------------------------------------------------
    def push(self, chunks, context: grpc.ServicerContext) -> bytes:
        try:
            meta, tensor, size = self._accept(chunks)
            peering.check_sender(context, int(meta.sender), self.security)
        except WireError as exc:
            return peering.reject(self.node, exc)
        sender = int(meta.sender)
        with self.lock:
            if int(meta.round) >= self.round:         # older rounds are over: drop
                self.inbox.setdefault((int(meta.round), int(meta.meta)), {})[sender] = tensor
            if int(meta.meta) != FINAL_MERGE:         # a final merge says nothing of a round's pace
                self.latest[sender] = max(self.latest.get(sender, 0), int(meta.round))
            self.down.discard(sender)
            self.bytes_down += size
            self.lock.notify_all()
        return schema.Ack(ok=True).SerializeToString()

    def _accept(self, chunks) -> tuple[Any, torch.Tensor, int]:
        """Validate a push. Its first frame says what it is: a gossip message (``vectors``
        model-sized vectors, from a neighbour) or a final-merge model (one vector, from any
        peer when the final merge is on); the payload is then checked against that."""
        meta, chunks = peek_meta(chunks)
        final = int(meta.meta) == FINAL_MERGE
        return peering.accept_push(
            chunks, node=self.node,
            neighbors=self.contacts if final else self.neighbors,
            numel=self.exp.spec.numel * (1 if final else self.vectors),
            run_id=self.cfg.runtime.run_id, limits=self.limits)

    # --- rounds ---------------------------------------------------------------------------------
    def _use_round(self, r: int) -> None:
        """Round ``r``'s links of a dynamic topology: this peer's view of the protocol's graph."""
        if self.dynamic is not None:
            graph = protocol.round_graph(self.static, self.dynamic, self.cfg.topology.mixing, r)
            self.view = protocol.peer_view(graph, self.node)

    def _receivers_at(self, r: int) -> set[int]:
        """Whom this peer sends to in round ``r`` (kept for the rounds still ahead: a wait
        asks again at every push it receives)."""
        if r not in self._receivers:
            for old in [k for k in self._receivers if k <= self.round]:
                del self._receivers[old]
            self._receivers[r] = protocol.round_receivers(self.static, self.dynamic, self.node, r)
        return self._receivers[r]

    def _send(self, stubs: dict[int, Any], round_: int, step: int, payload: torch.Tensor | None = None,
              to: list[int] | None = None) -> list[futures.Future]:
        """Push ``payload`` (default: the model) to ``to`` (default: this round's receivers),
        in the background; returns the pushes' futures."""
        frames = [f.SerializeToString() for f in model_frames(
            self.params[0] if payload is None else payload, sender=self.node, round=round_,
            meta=step, run_id=self.cfg.runtime.run_id, chunk_bytes=self.limits.chunk_bytes)]
        nbytes = sum(len(f) for f in frames)

        def one(j: int) -> bool:
            """Push to ``j``; whether ``j`` acknowledged it (it is alive)."""
            # a neighbour known to be down gets one quick try, so a restarted one hears from us
            patience = 1.0 if j in self.down else self.cfg.runtime.round_timeout_s
            try:
                retry(lambda: stubs[j](iter(frames), timeout=patience + 5), what=f"push to {j}",
                      deadline_s=patience, max_backoff_s=self.cfg.runtime.retry_max_s)
                with self.lock:
                    self.bytes_up += nbytes
                return True
            except grpc.RpcError as exc:
                log.warning("peer %d: neighbour %d unreachable (%s)", self.node, j, exc.code())
                return False

        # in the background: never wait on a slow link
        return [self.sender.submit(one, j) for j in (self.view.receivers if to is None else to)]

    def _gather(self, round_: int, step: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """:meth:`_gather_ids` without the senders' ids."""
        weights, _, received = self._gather_ids(round_, step)
        return weights, received

    def _gather_ids(self, round_: int, step: int) -> tuple[torch.Tensor, list[int], list[torch.Tensor]]:
        """Wait for this step's messages; returns the mixing weights (own first, the missing
        neighbours' folded onto it), the senders heard and their payloads, in node-id order. A sender
        that already went past a round in which it waited for this peer (this peer was down and is
        catching up: the sender gave up on it, :func:`protocol.gave_up`) is not waited for, nor
        marked down. A sender ahead that never needed this peer since is waited for (on a dynamic
        graph that is normal, and its message for this round may still be in flight)."""
        key, senders = (round_, step), self.view.senders

        def ahead() -> set[int]:
            return set(senders) & protocol.gave_up(self.latest, round_, self._receivers_at)

        with self.lock:
            expected = set(senders) - self.down
            self.lock.wait_for(lambda: expected - ahead() <= set(self.inbox.get(key, {})),
                               timeout=self.cfg.runtime.round_timeout_s)
            got = self.inbox.pop(key, {})
            ids, weights = protocol.held_weights(self.view, self.node, got)
            missing = [j for j in senders if j not in ids]
            self.down |= set(missing) - ahead()
            for old in [k for k in self.inbox if k[0] < round_]:
                del self.inbox[old]
        if missing:
            log.warning("peer %d round %d: no model from %s; mixing without them",
                        self.node, round_, missing)
        return weights, ids, [got[j].reshape(1, -1) for j in ids]

    def _mix(self, round_: int, step: int) -> None:
        weights, received = self._gather(round_, step)
        models = torch.cat([self.params] + received)
        losses = None
        if needs_losses(self.algorithm.aggregator):      # Bristle scores on this node's data
            losses = local_losses(self.exp.trainer)(models[None], np.array([self.node]))[0]
        self.params = self.algorithm.mix_row(weights, models, losses).reshape(1, -1)

    def _round(self, stubs: dict[int, Any], r: int) -> None:
        """Round ``r``: train on the own shard, then the round's gossip steps."""
        if self.exp.trainer.sizes[self.node] > 0:
            self.exp.trainer.train(self.params, np.array([self.node]), r, inplace=True)
        for step in range(self.algorithm.gossip_steps_at(r, self.cfg.stop.rounds)):
            self._send(stubs, r, step)
            self._mix(r, step)

    def _merge_all(self, stubs: dict[int, Any], r: int) -> None:
        """The final merge after round ``r``: send the model to every other peer, wait for
        theirs, and take the exact mean of the models held, in node-id order (the simulator's
        all-reduce over its online rows). A peer is left out only when our push to it failed
        (it is down: the simulator's offline node) or, having acknowledged it, it sent nothing
        for ``join_timeout_s``; a live peer that is merely slower is waited for, so the merge
        does not depend on which peer finished its rounds first."""
        others = [j for j in range(self.exp.num_nodes) if j != self.node]
        sent = dict(zip(others, self._send(stubs, r, FINAL_MERGE, to=others), strict=True))
        key = (r, FINAL_MERGE)

        def wake(_: futures.Future) -> None:          # a push finished: re-check who is awaited
            with self.lock:
                self.lock.notify_all()

        for f in sent.values():
            f.add_done_callback(wake)

        def unreachable(j: int) -> bool:
            return sent[j].done() and (sent[j].exception() is not None or not sent[j].result())

        with self.lock:
            self.lock.wait_for(lambda: all(j in self.inbox.get(key, {}) or unreachable(j)
                                           for j in others),
                               timeout=max(self.cfg.runtime.join_timeout_s,
                                           self.cfg.runtime.round_timeout_s + 5))
            got = dict(self.inbox.pop(key, {}))
        # the row counts the bytes sent: wait for the pushes to the peers that answered
        futures.wait([sent[j] for j in got], timeout=self.cfg.runtime.round_timeout_s + 5)
        missing = [j for j in others if j not in got]
        if missing:
            log.warning("peer %d: final merge without %s (no model in time)", self.node, missing)
        if not got:                                   # alone: nothing to merge with
            return
        got[self.node] = self.params[0]
        self.params = protocol.merge_all({j: m.to(self.params.dtype) for j, m in got.items()})

    def _next_round(self, r: int) -> int:
        """The round to run next: r + 1, or the neighbours' round if this peer fell behind
        (it was down); it then continues from its own model at their pace."""
        with self.lock:
            nxt = protocol.next_round(r, self.latest, self.cfg.stop.rounds,
                                      protocol.gave_up(self.latest, r, self._receivers_at))
        if nxt > r + 1:
            log.warning("peer %d: behind (round %d, neighbours at %d); catching up", self.node, r, nxt)
        return nxt

    def _row(self, start: float) -> dict[str, Any]:
        acc, loss = self.exp.evaluator.evaluate(self.params)
        return {"round": self.round, "sim_time_s": self.elapsed_before + time.monotonic() - start,
                "bytes_up": self.bytes_up, "bytes_down": self.bytes_down,
                "test_accuracy": float(acc[0]), "test_loss": float(loss[0]), "dp_steps": self.dp_steps()}

    def run(self, peers: dict[int, str] | Path) -> None:
        start = time.monotonic()
        with self.serving({"Push": grpc.stream_unary_rpc_method_handler(self.push)}, len(self.contacts) + 4):
            try:
                self._rounds(peering.pushers(self.link(peers, self.contacts)), start)
            finally:
                self.sender.shutdown(wait=True)       # our last pushes reach the neighbours

    def _rounds(self, stubs: dict[int, Any], start: float) -> None:
        every = self.cfg.eval.every
        if self.round == 0 and not self.metrics.rows:
            self.metrics.append(self._row(start))
        r = self.round
        while r < self.cfg.stop.rounds:
            r = self._next_round(r)
            self._use_round(r)
            self._round(stubs, r)
            if protocol.final_merge_due(self.algorithm, r, self.cfg.stop.rounds):
                self._merge_all(stubs, r)
            self.round = r
            if r % every == 0 or r == self.cfg.stop.rounds:
                self.metrics.append(self._row(start))
                save_checkpoint(self.peer_dir / f"model-{self.node}-r{r}.pt", {"params": self.params[0]},
                                keep_previous=False)
            save_checkpoint(self.ckpt, {"params": self.params, "round": r, "bytes_up": self.bytes_up,
                                        "bytes_down": self.bytes_down,
                                        "elapsed": self.elapsed_before + time.monotonic() - start,
                                        "dp_steps": self.dp_steps() or 0, **self._state()})
            if os.environ.get("GOSSAMER_TEST_KILL_AT_ROUND") == f"{self.node}:{r}":
                os.kill(os.getpid(), signal.SIGKILL)
            self._test_pause(r)

    def _test_pause(self, r: int) -> None:
        """Tests: ``GOSSAMER_TEST_ROUND_PAUSE_S=s`` makes every peer sleep ``s`` seconds after
        each round, ``id:s`` only peer ``id`` (a slow peer, on purpose);
        ``GOSSAMER_TEST_HOLD_AT_ROUND=r:j`` holds the peer after round ``r`` until it hears from
        neighbour ``j`` again (at most ``join_timeout_s``), so a test can order a restart by
        events instead of timings."""
        pause = os.environ.get("GOSSAMER_TEST_ROUND_PAUSE_S")
        if pause:
            node, _, seconds = pause.rpartition(":")
            if not node or int(node) == self.node:
                time.sleep(float(seconds))
        hold = os.environ.get("GOSSAMER_TEST_HOLD_AT_ROUND", "")
        at, _, node = hold.partition(":")
        if hold and int(at) == r:
            with self.lock:
                self.lock.wait_for(lambda: int(node) not in self.down,
                                   timeout=self.cfg.runtime.join_timeout_s)

