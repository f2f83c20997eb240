"""``gossamer aggregator``: an intermediate process of hierarchical aggregation (LIFL).

To its children (clients, or the aggregators of the level below) an aggregator is a
coordinator: they join it, ask it for work and upload to it, with every check the
coordinator makes (``runtime/fl_server.py``). To its parent (the coordinator or the
aggregator above) it is a client that reports the clients it reaches, receives each round's
model once with the list of its clients the round awaits, and sends partial aggregates: the
weighted sum of the models it has received, added on arrival (eager aggregation), once every
awaited client has delivered or failed. A round still open after half of
``runtime.round_timeout_s`` sends what it has, and the rest when it completes, so the clients
that delivered are not lost with a slow one. When the parent's round ends with clients still
awaited, they are not offered to the next round until they ask for work again.

Shixiong Qi, K. K. Ramakrishnan, Myungjin Lee, "LIFL: A Lightweight, Event-driven Serverless
Platform for Federated Learning", MLSys 2024, arXiv:2405.10968.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import grpc
import torch

from gossamer.config import ConfigError, ExperimentConfig
from gossamer.metrics.runstore import write_json
from gossamer.runtime import schema
from gossamer.runtime.codec import (
    KIND_PARTIAL,
    WireError,
    model_frames,
    parse,
    read_model,
    state_hash,
)
from gossamer.runtime.common import Rehoming, log, parent_stubs, retry, security
from gossamer.runtime.fl_server import Coordinator, RoundState


class Aggregator(Rehoming, Coordinator):
    """Aggregator ``index`` (``protocols/hierarchy.py`` numbers them level by level from the
    top); ``parents``: its parent's address, then addresses to re-home to if it dies."""

    writes_metrics = False         # its parent writes the run's metrics

    def __init__(self, cfg: ExperimentConfig, index: int, run_dir: Path, *, parents: list[str],
                 listen: str | None = None) -> None:
        if not cfg.hierarchy.levels:
            raise ConfigError("hierarchy.levels", "an aggregator needs a tree of aggregators")
        self.me = index
        super().__init__(cfg, run_dir, listen=listen)
        if not 0 <= index < self.tree.count:
            raise ValueError(f"--id: aggregator {index} is outside 0..{self.tree.count - 1}")
        self.wire_id = self.exp.num_nodes + index
        self.up_security = security(cfg, node=self.wire_id)
        self.up_token = self.up_security.resolved_token(self.wire_id)
        self.addresses, self.who = parents, f"aggregator {index}"
        self._connect(0)
        self.flushed: set[int] = set()                # the current round's clients sent up
        self.next_flush = float("inf")
        self.bytes_to_parent = self.bytes_from_parent = 0

    # --- to the parent: a client ---------------------------------------------------------------
    def _connect(self, at: int) -> None:
        self.at = at
        self.channel, self._up_join, self._up_task, self._up_put = parent_stubs(
            self.addresses[at], self.up_security, self.up_token, self.cfg)

    def _call(self, call, what: str):
        """``call`` with retries; re-homing down ``parents`` while one stays unreachable for
        ``runtime.retry_max_s``, for at most ``runtime.join_timeout_s`` in all."""
        rt = self.cfg.runtime
        end = time.monotonic() + rt.join_timeout_s
        while True:
            try:
                return retry(call, deadline_s=self._deadline(), max_backoff_s=rt.retry_max_s, what=what)
            except grpc.RpcError as exc:
                if time.monotonic() > end or not self._fail_over(exc):
                    raise
                self._join_parent(rejoin=False)
                with self.lock:                  # what went to the dead parent is lost: its
                    cur = self.current           # clients are awaited again (and retrain)
                    for m in self.flushed:
                        cur.received.pop(m, None)
                    self.flushed = set()

    def _join_parent(self, rejoin: bool = True) -> None:
        req = schema.JoinRequest(node_id=self.wire_id, run_id=self.cfg.runtime.run_id).SerializeToString()
        join = (lambda: self._call(lambda: self._up_join(req, timeout=10), "join")) if rejoin else \
            (lambda: self._up_join(req, timeout=10))
        reply = parse(schema.JoinReply, join())
        if not reply.ok:
            raise RuntimeError(f"aggregator {self.me} refused: {reply.reason}")

    def _poll(self) -> tuple[object, torch.Tensor | None]:
        """One GetTask to the parent, reporting the clients this aggregator reaches."""
        with self.lock:
            reach = sorted((m, s) for m, s in self.clients.items() if m not in self.stale)
            holds = self.current.number if self.current.model_frames else 0
        req = schema.TaskRequest(node_id=self.wire_id, run_id=self.cfg.runtime.run_id, last_round=holds,
                                 members=[m for m, _ in reach], member_samples=[s for _, s in reach])
        frames = iter(self._up_task(req.SerializeToString(), timeout=self.cfg.runtime.round_timeout_s))
        first = next(frames)
        header = parse(schema.TaskFrame, first).header
        rest = list(frames)
        self.bytes_from_parent += len(first) + sum(len(f) for f in rest)
        if header.kind != schema.TaskHeader.TRAIN or not rest:
            return header, None
        _, model = read_model((parse(schema.TaskFrame, f).model for f in rest),
                              expected_numel=self.algorithm.download_vectors * self.numel,
                              run_id=self.cfg.runtime.run_id, limits=self.limits)
        if state_hash(model) != header.state_hash:
            raise WireError(f"the model of round {header.round} does not match its hash")
        return header, model

    # --- a round, as the parent hands it down ------------------------------------------------
    def _take(self, header: object, model: torch.Tensor | None) -> None:
        """The parent's TRAIN (lock held): a new round (with its model), or more of its clients."""
        r, nodes, cur = int(header.round), set(header.nodes), self.current
        if r == cur.number and cur.model_frames:
            cur.selected |= nodes
        elif model is not None:
            self._close()
            frames = self._model_task_frames(model, r)
            self.current = RoundState(r, nodes, {}, frames, model_hash=bytes(header.state_hash),
                                      opened=time.monotonic())
            self.flushed = set()
            self.next_flush = time.monotonic() + self.cfg.runtime.round_timeout_s / 2
        self.lock.notify_all()

    def _file(self, node: int, row: torch.Tensor, samples: int) -> None:
        super()._file(node, row, samples)
        self._die_if_asked()

    def _accept_partial(self, node: int, bound: int | None, meta: object, tensor: torch.Tensor,
                        size: int) -> None:
        super()._accept_partial(node, bound, meta, tensor, size)
        self._die_if_asked()

    def _die_if_asked(self) -> None:
        """Tests: die like ``kill -9`` holding a model, in the round the environment names."""
        if os.environ.get("GOSSAMER_TEST_KILL_AGGREGATOR_AT") == f"{self.me}:{self.current.number}":
            os.kill(os.getpid(), signal.SIGKILL)

    def _close(self) -> None:
        """The parent awaits nothing more of the current round from here (lock held): clients
        still awaited are not offered again until they ask for work."""
        cur = self.current
        late = cur.open()
        if late and cur.model_frames:
            self.stale |= late
            log.warning("aggregator %d: round %d ended without clients %s", self.me, cur.number, sorted(late))
        self.current = RoundState(cur.number)

    def _due(self) -> bool:
        cur = self.current
        pending = set(cur.received) - self.flushed
        return bool(pending) and (not cur.open() or time.monotonic() >= self.next_flush)

    def _flush(self) -> None:
        """Send the partial aggregate of the clients received and not yet sent, when due."""
        with self.lock:
            if not self._due():
                return
            cur = self.current
            nodes = sorted(set(cur.received) - self.flushed)
            total, r = cur.total, cur.number
            cur.total, cur.weight = None, 0.0
            self.flushed |= set(nodes)
            self.next_flush = time.monotonic() + self.cfg.runtime.round_timeout_s / 4
        frames = [f.SerializeToString() for f in model_frames(
            total.float(), kind=KIND_PARTIAL, sender=self.wire_id, round=r, meta=len(nodes),
            run_id=self.cfg.runtime.run_id, chunk_bytes=self.limits.chunk_bytes, nodes=nodes)]
        self.bytes_to_parent += sum(len(f) for f in frames)
        ack = parse(schema.Ack, self._call(lambda: self._up_put(iter(frames), timeout=60), "put partial"))
        if not ack.ok:
            log.warning("aggregator %d: partial aggregate of round %d refused: %s", self.me, r, ack.reason)

    def _rounds(self, start: float) -> dict[str, Any]:
        self._join_parent()
        rt = self.cfg.runtime
        while True:
            try:
                header, model = self._call(self._poll, "get task")
            except WireError as exc:
                log.warning("aggregator %d: bad task from the parent (%s); asking again", self.me, exc)
                time.sleep(rt.poll_interval_s)
                continue
            if header.kind == schema.TaskHeader.DONE:
                break
            if header.kind == schema.TaskHeader.JOIN:
                self._join_parent()
                continue
            with self.lock:
                if header.kind == schema.TaskHeader.TRAIN:
                    self._take(header, model)
                elif self.current.model_frames:           # nothing awaited from here any more
                    self._close()
                self.lock.wait_for(self._due, timeout=rt.poll_interval_s)
            self._flush()
        summary = {"aggregator": self.me, "clients_reached": len(self.clients),
                   "bytes_from_children": self.bytes_up, "bytes_to_children": self.bytes_down,
                   "bytes_to_parent": self.bytes_to_parent, "bytes_from_parent": self.bytes_from_parent,
                   "partials_received": self.partials, "rejected_messages": self.rejected,
                   "wall_time_s": time.monotonic() - start}
        write_json(self.run_dir / "summary.json", summary)
        return summary

    def _write(self, summary: dict[str, Any]) -> None:       # an aggregator keeps no model
        write_json(self.run_dir / "summary.json", summary)

    def _restore(self) -> None:                               # it holds nothing to resume
        pass
