"""The synchronous FL pattern on real processes: the executor of ``protocols/sync_fl.py``
and of the upload pipeline's server side (``protocols/upload.py``).

Clients pull tasks (``GetTask``) and push uploads (``PutUpdate``); the handlers and caller
checks are :class:`~gossamer.runtime.coordinator.BaseCoordinator`'s. A round ends when every
selected client has delivered (or failed: a rejected upload), when the round's protocol
closes it (over-selection, deadline), or after ``runtime.round_timeout_s``; late clients are
not selected again until they ask for work. A round with fewer than
``runtime.min_participants`` uploads is redone, and after ``runtime.quorum_timeout_s`` the
run fails (:class:`RunFailed`, exit code 3). The server checkpoints after every round;
``--resume`` redoes the interrupted round once its clients have joined again. Metrics use
wall-clock seconds for ``sim_time_s`` and the bytes really sent.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gossamer.config import ExperimentConfig
from gossamer.metrics.runstore import atomic_write_text
from gossamer.protocols.private import build_ledger
from gossamer.protocols.sync_fl import SyncRound
from gossamer.protocols.upload import build_pipeline
from gossamer.runtime import schema
from gossamer.runtime.codec import (
    KIND_DELTA,
    KIND_ENCODED,
    KIND_MODEL,
    bytes_frames,
    state_hash,
)
from gossamer.runtime.common import RunFailed, log
from gossamer.runtime.coordinator import BaseCoordinator
from gossamer.runtime.fl_checkpoint import ServerCheckpoint
from gossamer.runtime.fl_uploads import UploadIntake
from gossamer.runtime.personal import PersonalServer
from gossamer.runtime.secagg_round import KIND_ADVERTISE, SecAggRound, SecureAggregation
from gossamer.runtime.subtree import Subtrees
from gossamer.training.trainer import local_steps

COLUMNS = ["round", "sim_time_s", "bytes_up", "bytes_down", "test_accuracy", "test_loss",
           "train_loss", "participants"]


@dataclass
class RoundState:
    number: int = 0
    selected: set[int] = field(default_factory=set)
    received: dict[int, tuple[torch.Tensor, int]] = field(default_factory=dict)
    model_frames: list[bytes] = field(default_factory=list)
    model_hash: bytes = b""                             # SHA-256 of the round's broadcast
    failed: set[int] = field(default_factory=set)       # selected, then rejected: not waited for
    secagg: SecAggRound | None = None                   # secure aggregation's message rounds
    protocol: SyncRound | None = None                   # the round's decisions
    opened: float = 0.0                                 # time.monotonic() at the round's start
    total: torch.Tensor | None = None                   # hierarchy: the running weighted sum
    weight: float = 0.0                                 # ... and its total weight
    evaluating: bool = False                            # personalized FL's evaluation phase
    node_frames: dict[int, tuple[list[bytes], bytes]] = field(default_factory=dict)  # FedCAC

    def open(self) -> set[int]:
        """Selected clients whose upload is still awaited."""
        return self.selected - self.failed - set(self.received)


class Coordinator(ServerCheckpoint, UploadIntake, SecureAggregation, Subtrees, PersonalServer, BaseCoordinator):
    """The ``sync_fl`` pattern: select, hand out the model, wait for uploads, run the upload
    pipeline's server side, aggregate, evaluate, checkpoint. With ``hierarchy.levels`` the
    clients are reached through ``gossamer aggregator`` processes (``runtime/subtree.py``)."""

    pattern = "sync_fl"
    columns = COLUMNS

    def __init__(self, cfg: ExperimentConfig, run_dir: Path, *, resume: bool = False,
                 listen: str | None = None) -> None:
        self.current = RoundState()
        self.last_sum: tuple[torch.Tensor | None, float] = (None, 0.0)
        super().__init__(cfg, run_dir, resume=resume, listen=listen)

    def _init_pipeline(self) -> None:
        """The server side of the upload pipeline (protocols/upload.py): which upload kind
        arrives (a model row, a DP update, encoded bytes), EF21 estimates, the DP ledger."""
        pipe = self.pipeline = build_pipeline(self.exp.cfg, self.algorithm, self.numel, self.exp.uplink)
        self.upload_kind = KIND_ADVERTISE if pipe.secagg is not None else \
            KIND_ENCODED if pipe.encoded is not None else \
            KIND_DELTA if pipe.dp is not None else KIND_MODEL
        self.secagg_aborted = 0
        self.estimates: dict[int, torch.Tensor] = {}         # EF21: the server's copy per client
        self.last_round: SyncRound | None = None             # the latest round's decisions
        self.dp_ledger = build_ledger(self.exp.cfg, self.numel, self.exp.trainer.sizes, self.exp.num_nodes)
        self.columns = self.columns + pipe.extra_columns      # epsilon, secagg_aborted
        self._init_subtrees()
        self._init_personal()

    @staticmethod
    def check_config(cfg: ExperimentConfig) -> None:
        """What real processes refuse of a synchronous FL config, in one line (the launcher
        calls it before spawning)."""
        from gossamer.config import ConfigError

        if cfg.hierarchy.levels and cfg.contribution.methods:
            raise ConfigError("contribution.methods", "contribution scores need each client's "
                              "upload; with hierarchy.levels the coordinator holds the "
                              "aggregators' sums only (the simulator scores them)")
        if cfg.hierarchy.clients_per_instance is not None:
            raise ConfigError("hierarchy.clients_per_instance", "real aggregators are the processes "
                              "`gossamer launch` starts, one per aggregator: scaling them with load is "
                              "simulated only")
        if cfg.hierarchy.failures:
            raise ConfigError("hierarchy.failures", "real processes fail for real: kill an "
                              "aggregator (its clients re-home); failures are simulated only")
        if cfg.hierarchy.levels and cfg.partition.test_fraction:
            raise ConfigError("partition.test_fraction", "per-client evaluation goes to each client "
                              "directly; with hierarchy.levels it runs in the simulator only so far")
        from gossamer.algorithms import ALGORITHMS

        algo = ALGORITHMS.get(cfg.algorithm.name)
        if algo.personalized and algo.server_personalizes and (
                cfg.compression.uplink is not None or cfg.privacy.dp is not None
                or cfg.algorithm.params.get("prox_mu")):
            raise ConfigError("algorithm.name", f"{cfg.algorithm.name}'s clients start from their "
                              "own rows on real processes; compression, DP and prox_mu (which "
                              "refer to the global model) run with it in the simulator only")

    def _listeners(self) -> set[int]:
        return (set(self.clients) - set(self.via)) | set(self.subs)

    def _init_state(self):
        return self.algorithm.init_state(self.exp.init_params.reshape(-1), self.exp.num_nodes)

    def _client_failed(self, node: int) -> None:
        """``node`` failed its current task (lock held): the round stops waiting for it."""
        cur = self.current
        if node in cur.selected and node not in cur.received:
            cur.failed.add(node)
            self.stale.add(node)

    def _task(self, node: int, last_round: int = 0) -> tuple[object, list[bytes]]:
        """A joined ``node``'s task (lock held): the round's model if it is awaited, else WAIT."""
        self.via.pop(node, None)                            # asking here: a direct client now
        if node in self.stale:
            self.stale.discard(node)
            self.lock.notify_all()                          # it is reachable again
        cur = self.current
        if cur.evaluating:                                  # personalized FL: evaluate and report
            if node not in cur.open():
                return self._wait()
            frames, digest = self._task_frames(node)
            return schema.TaskHeader(kind=schema.TaskHeader.EVAL, round=cur.number,
                                     state_hash=digest), frames
        due = cur.secagg.message_for(node) if cur.secagg is not None else None
        if due is not None:
            stage, data = due
            frames = [schema.TaskFrame(model=f).SerializeToString() for f in bytes_frames(
                data, kind=KIND_ADVERTISE + stage, round=cur.number, run_id=self.cfg.runtime.run_id,
                chunk_bytes=self.limits.chunk_bytes)]
            return schema.TaskHeader(kind=schema.TaskHeader.SECAGG, round=cur.number, stage=stage,
                                     members=cur.secagg.members,
                                     share=cur.secagg.shares.get(node, 0.0)), frames
        if node in cur.open():
            expected = cur.protocol.expected if cur.protocol is not None else 0
            frames, digest = self._task_frames(node)        # FedCAC, FED-PUB: the client's own row
            return schema.TaskHeader(kind=schema.TaskHeader.TRAIN, round=cur.number,
                                     expected=expected, state_hash=digest), frames
        return self._wait()

    def _candidates(self) -> list[int]:
        return sorted(set(self.clients) - self.stale)

    def _quorum(self) -> tuple[int, str]:
        """The uploads a round needs, and what sets that number."""
        return self.cfg.runtime.min_participants, "runtime.min_participants"

    def _enough(self, r: int, received: dict) -> bool:
        """Whether an attempt's uploads complete round ``r``."""
        return len(received) >= self._quorum()[0]

    def _closes(self, cur: RoundState, need: int) -> bool:
        """Whether the round stops waiting (lock held): ``need`` uploads are in, or no
        selected client is still awaited."""
        return len(cur.received) >= need or not cur.open()

    def _open(self, r: int, candidates: np.ndarray) -> SyncRound:
        """Round ``r``'s decisions among ``candidates`` (protocols/sync_fl.py)."""
        return SyncRound(self.algorithm, self.cfg.seed, r, candidates)

    def _run_round(self, r: int) -> None:
        """Round ``r``: redone until the quorum's uploads (``runtime.min_participants``) arrive
        in one attempt, for at most ``runtime.quorum_timeout_s``; then :class:`RunFailed`."""
        rt = self.cfg.runtime
        give_up = time.monotonic() + rt.quorum_timeout_s
        need, what = self._quorum()
        while True:
            received = self._attempt(r, give_up)
            if self._enough(r, received):
                break
            if time.monotonic() >= give_up:
                raise RunFailed(f"round {r}: {len(received)} uploads, fewer than {what} ({need}), "
                                f"for runtime.quorum_timeout_s ({rt.quorum_timeout_s:g} s)")
            log.warning("round %d: %d uploads, fewer than %s (%d); redoing it", r, len(received), what, need)
        self._aggregate(r, received)

    def _payload(self) -> torch.Tensor:
        """What a task carries: the algorithm's broadcast of the server state, flat."""
        return self.algorithm.broadcast(self.state).flat()

    def _aggregate(self, r: int, received: dict[int, tuple[torch.Tensor, int]]) -> None:
        """Round ``r``'s server step from the uploads ``received`` (node -> (row, samples))."""
        algo = self.algorithm
        if self.tree is not None:                  # the sum up the aggregators' tree
            total, weight = self.last_sum
            if self.dp_ledger is not None:         # sample-level DP-SGD, the one DP a tree carries
                ids = np.array(sorted(received))
                self.dp_ledger.sample_steps(ids, local_steps(self.exp.trainer.schedule, self.exp.trainer.sizes[ids]))
            self.state = algo.aggregate_mean(self.state, (total / weight).float())
            self.participants = len(received)
            return
        nodes = sorted(received)
        uploads = self._server_stages(r, torch.stack([received[i][0] for i in nodes]), np.array(nodes))
        sizes = np.array([received[i][1] for i in nodes])
        steps = local_steps(self.exp.trainer.schedule, sizes)
        scorer = self.exp.contribution                # contribution scores: as the simulator
        if scorer is not None and r % self.cfg.contribution.every == 0:
            scorer.observe(r, np.array(nodes), uploads[:, : self.numel],
                           algo.mean_weights(sizes, uploads.dtype), self.state.params.reshape(-1))
        if algo.split_roles:                       # FedAMD: roles from the shared seed
            ids = np.array(nodes, dtype=np.int64)
            self.state = algo.aggregate(self.state, uploads, sizes, steps, self.cfg.local.lr,
                                        clients=ids, anchors=algo.anchors(self.cfg.seed, r, ids))
        else:
            self.state = algo.aggregate(self.state, uploads, sizes, steps, self.cfg.local.lr)
        self._personalize(r, nodes, uploads)
        self.participants = len(received)

    def _server_stages(self, r: int, uploads: torch.Tensor, nodes: np.ndarray) -> torch.Tensor:
        """The upload pipeline's server side before aggregation: FetchSGD's step from the summed
        sketches, or DP-FedAvg's noisy mean of the updates (every row becomes ``start + step``,
        as in the simulator) and the ledger."""
        pipe, ledger, rnd = self.pipeline, self.dp_ledger, self.last_round
        if pipe.compress is not None and pipe.compress.feedback == "fetchsgd":    # the sketches' step
            weights = self.algorithm.mean_weights(self.exp.trainer.sizes[nodes])
            update, extra = pipe.compress.fetch(self.state.extra, uploads, weights, self.numel)
            self.state = replace(self.state, extra=extra)
            return self.state.params.reshape(-1) + update.expand(len(uploads), -1)
        if pipe.dp is not None:
            if pipe.secagg is None:                 # with secure aggregation: done in the sum
                mean = pipe.dp.server(uploads, r, rnd.expected)
                uploads = self.state.params.reshape(-1) + mean.expand(len(uploads), -1)
            ledger.client_round(len(rnd.selected), rnd.candidates)
        elif pipe.rqm is not None:
            ledger.released(nodes)
        elif ledger is not None:                              # sample level: DP-SGD steps
            ledger.sample_steps(nodes, local_steps(self.exp.trainer.schedule, self.exp.trainer.sizes[nodes]))
        return uploads

    def _attempt(self, r: int, give_up: float) -> dict[int, tuple[torch.Tensor, int]]:
        """Select, hand out the model, wait for uploads; the uploads received."""
        rt, (need, what) = self.cfg.runtime, self._quorum()
        with self.lock:
            if not self.lock.wait_for(lambda: len(self._candidates()) >= need,
                                      timeout=max(0.0, give_up - time.monotonic())):
                raise RunFailed(f"round {r}: {len(self._candidates())} of {len(self.clients)} joined "
                                f"clients reachable, fewer than {what} ({need}), for "
                                f"runtime.quorum_timeout_s ({rt.quorum_timeout_s:g} s)")
            candidates = np.array(self._candidates(), dtype=np.int64)
            rnd = self._open(r, candidates)
            ids = rnd.selected
            payload = self._payload()
            frames = self._model_task_frames(payload, r)
            self.last_round = rnd
            self.current = RoundState(r, {int(i) for i in ids}, {}, frames, protocol=rnd,
                                      opened=time.monotonic(), model_hash=state_hash(payload))
            if self.pipeline.secagg is not None:
                self.current.secagg = SecAggRound(self.pipeline.secagg, self.current.selected, self.numel, r)
            self.lock.notify_all()
            # over-selection: the round closes at the first `wanted` uploads; a deadline (wall
            # seconds here) drops the clients still training, like runtime.round_timeout_s
            need = rnd.wanted or len(ids)
            timeout = rt.round_timeout_s if rnd.deadline is None else min(rt.round_timeout_s, rnd.deadline)
            cur = self.current
            finished = self.lock.wait_for(lambda: self._closes(cur, need),
                                          timeout=timeout)
            received = dict(cur.received)
            self.last_sum = (cur.total, cur.weight)
            late = cur.open()
            if cur.secagg is not None:
                received = self._secure_stages(cur)
            if not finished:
                self.stale |= late
                log.warning("round %d: dropped %d late clients %s", r, len(late), sorted(late))
            elif late:
                log.info("round %d: closed after %d uploads (over-selection)", r, len(received))
            if cur.failed:
                log.warning("round %d: %d clients failed (rejected uploads) %s", r, len(cur.failed),
                            sorted(cur.failed))
            self.current = RoundState(r)                   # late uploads are refused as unexpected
        return received

    def _evaluate(self, r: int, start: float) -> dict[str, Any]:
        acc, loss = self.exp.evaluator.evaluate(self.state.params.reshape(1, -1))
        return {"round": r, "sim_time_s": self.elapsed_before + time.monotonic() - start,
                "bytes_up": self.bytes_up, "bytes_down": self.bytes_down,
                "test_accuracy": float(acc[0]), "test_loss": float(loss[0]),
                "participants": getattr(self, "participants", 0),
                **({"epsilon": self.dp_ledger.epsilon()} if self.dp_ledger is not None else {}),
                **self.personal_row,
                **({"secagg_aborted": self.secagg_aborted} if self.pipeline.secagg is not None else {})}

    def _rounds(self, start: float) -> dict[str, Any]:
        self._wait_for_clients(start)
        start = time.monotonic()                     # the clock starts once the clients have joined
        stop = self.cfg.stop
        if self.state.round == 0 and not self.metrics.rows:
            self._personal_phase(0)
            self.metrics.append(self._evaluate(0, start))
        stopped_by, best = "rounds", None
        for r in range(self.state.round + 1, stop.rounds + 1):
            self._run_round(r)
            self._personal_phase(r)
            row = self._evaluate(r, start)
            self.metrics.append(row)
            self._checkpoint(start)
            if str(r) in (os.environ.get("GOSSAMER_TEST_KILL_AT_ROUND"),
                          os.environ.get("GOSSAMER_TEST_KILL_SERVER_AT_ROUND")):
                os.kill(os.getpid(), signal.SIGKILL)         # tests: die like kill -9

            best = row["test_accuracy"] if best is None else max(best, row["test_accuracy"])
            stopped_by = self._stopped(row) or stopped_by
            if stopped_by != "rounds":
                break
        summary = self._summary(stopped_by, self.elapsed_before + time.monotonic() - start)
        scorer, adv = self.exp.contribution, self.exp.adversary
        if scorer is not None:
            summary["contribution"] = scorer.summary(adv.flagged, adv.kinds)
            atomic_write_text(self.run_dir / "contributions.csv", scorer.table(adv.flagged))
        self._write_clients()
        self._write(summary)
        return summary
