"""The ``islands`` pattern (Streaming DiLoCo, CO2) on real processes: the executor of
``protocols/islands.py``.

Every worker keeps its own model, inner AdamW state and a copy of the outer model (with the
outer optimizer's buffers), as the simulator's ``IslandsDriver`` does for all of them. Round
``r``: a worker uploads its outer gradient for the round's fragment (``local - outer``, through
``compression.uplink`` if set: ``PutUpdate`` with round ``r``); the coordinator averages the
uploads of every worker and serves the average as the task of round ``r + 1``
(``GetTask`` with ``last_round = r``: the average, float32 or re-encoded once, and the SHA-256
of the outer model after it is applied). Each worker applies the average to its copy of the
outer model itself, checks the hash (a worker whose copy differs stops with one line instead
of training on a diverged model), and merges where the protocol says:

- Streaming DiLoCo: the exchange of round ``r`` flies while the worker takes the first
  ``overlap`` inner steps of round ``r + 1``; it then fetches it, merges the fragment
  (``alpha * local + (1 - alpha) * outer``) and takes the round's other steps;
- CO2: the exchange of round ``r`` flies during the whole of round ``r + 1``; at the end of
  round ``r + 1`` (after its own upload) the worker fetches it, steps the outer model and goes
  on from it.

So a worker waits for an exchange only when it is slower than the compute it overlaps. Every
worker takes part in every exchange: a worker that does not upload within
``runtime.round_timeout_s`` fails the run (exit code 3, naming it); elastic membership is
DiLoCo's (``sync_fl``). The coordinator computes what the simulator computes, upload by upload,
so a run equals the simulator's at equal thread counts. ``sim_time_s`` is wall-clock seconds.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import numpy as np
import torch

from gossamer.algorithms.local import LocalObjective
from gossamer.config import ConfigError, ExperimentConfig
from gossamer.protocols.islands import (
    DOWNLINK_KEY,
    OVERLAP_KEY,
    delay,
    downlink,
    merged,
    model_parts,
    outer_apply,
    synced_fragment,
)
from gossamer.protocols.upload import upload_keys
from gossamer.runtime import schema
from gossamer.runtime.codec import (
    KIND_DELTA,
    KIND_ENCODED,
    WireError,
    bytes_frames,
    model_frames,
    read_counted_model,
    read_model,
    state_hash,
)
from gossamer.runtime.common import RunFailed, log
from gossamer.runtime.coordinator import BaseCoordinator
from gossamer.runtime.fl_client import Client
from gossamer.runtime.guard import Refused
from gossamer.training.trainer import AdamW

COLUMNS = ["round", "sim_time_s", "bytes_up", "bytes_down", "test_accuracy", "test_loss",
           "participants", "fragment", "exchange_bytes"]


def _workers(exp) -> np.ndarray:
    return np.flatnonzero(exp.trainer.sizes > 0)


class IslandsCoordinator(BaseCoordinator):
    """Collects each exchange's uploads from every worker, averages them, serves the average
    and keeps the outer model (evaluated every round, as the simulator)."""

    pattern = "islands"
    columns = COLUMNS

    def _init_state(self):
        exp, algo = self.exp, self.algorithm
        state = algo.init_state(exp.init_params.reshape(-1), exp.num_nodes)
        self.parts = model_parts(algo, exp.spec, state.params)
        self.workers = _workers(exp)
        self.weights = algo.mean_weights(exp.trainer.sizes[self.workers], state.params.dtype)
        self.late = delay(algo) == 1
        self.uploads: dict[int, dict[int, torch.Tensor]] = {}   # exchange -> worker -> row
        self.next_upload = {int(w): 1 for w in self.workers}     # the exchange each worker owes
        self.served: dict[int, tuple[list[bytes], bytes]] = {}   # exchange -> (frames, hash)
        self.closed = 0                                           # exchanges averaged so far
        self.in_flight: torch.Tensor | None = None                # CO2: the average not yet applied
        self.fragment, self.exchange_bytes = -1, 0
        self.init_hash = state_hash(state.params)
        self.started = False                          # round 0 is evaluated before anyone trains
        return state

    def _restore(self) -> None:
        raise ConfigError("runtime", f"{self.cfg.algorithm.name} runs on real processes without "
                          "resume so far: every worker keeps its own model; start the run again")

    def _task(self, node: int, last_round: int = 0) -> tuple[object, list[bytes]]:
        """The average of exchange ``last_round`` for ``node`` (lock held); round 1's task is
        the hash of the initial model alone, once every worker has joined and round 0 is
        evaluated. WAIT while that exchange is still open."""
        if last_round == 0:
            if not self.started:
                return self._wait()
            return schema.TaskHeader(kind=schema.TaskHeader.TRAIN, round=1,
                                     state_hash=self.init_hash), []
        if last_round not in self.served:
            if last_round < self.closed - 1:
                log.warning("node %d asks for exchange %d, which is no longer kept", node, last_round)
            return self._wait()
        frames, digest = self.served[last_round]
        return schema.TaskHeader(kind=schema.TaskHeader.TRAIN, round=last_round + 1,
                                 state_hash=digest), frames

    def _read_upload(self, chunks) -> tuple[object, torch.Tensor, int]:
        encoded = self.exp.uplink is not None
        meta, tensor, size = read_counted_model(
            chunks, expected_numel=None, run_id=self.cfg.runtime.run_id, limits=self.limits,
            dtype=torch.uint8 if encoded else torch.float32)
        if meta.kind != (KIND_ENCODED if encoded else KIND_DELTA):
            raise WireError(f"upload kind {meta.kind} where {KIND_ENCODED if encoded else KIND_DELTA} "
                            "is expected")
        if tensor.dim() != 1:
            raise WireError(f"an upload is one flat row, not shape {list(tensor.shape)}")
        return meta, tensor, size

    def _fragment_numel(self, exchange: int) -> int:
        return len(self.parts[synced_fragment(exchange, self.algorithm.fragments)])

    def _decode(self, node: int, exchange: int, tensor: torch.Tensor) -> torch.Tensor:
        numel = self._fragment_numel(exchange)
        if self.exp.uplink is None:
            if tensor.numel() != numel:
                raise WireError(f"exchange {exchange} carries {numel} values, the upload has "
                                f"{tensor.numel()}")
            return tensor.float().clone()
        if tensor.numel() > 8 * numel + 4096:
            raise WireError(f"encoded upload of {tensor.numel()} bytes is larger than the fragment")
        try:
            row = self.exp.uplink.from_bytes(tensor.numpy().tobytes(), numel, seed=self.cfg.seed,
                                             key=int(upload_keys(np.array([node]), exchange)[0]))
        except ValueError as exc:
            raise WireError(str(exc)) from None
        if row.numel() != numel or not bool(torch.isfinite(row).all()):
            raise WireError("the encoded upload decodes to a malformed or non-finite vector")
        return row.float()

    def _accept(self, node: int, bound: int | None, meta: object, tensor: torch.Tensor,
                size: int) -> None:
        """File a worker's upload for the exchange it owes, or raise :class:`Refused`."""
        with self.lock:
            if node not in self.clients or node not in self.next_upload:
                raise Refused(f"node {node} is not a joined worker", bound, strike=False)
            if int(meta.meta) != self.clients[node]:
                raise Refused(f"node {node} reports {int(meta.meta)} samples but joined with "
                              f"{self.clients[node]}", bound)
            exchange, owed = int(meta.round), self.next_upload[node]
            if exchange != owed or exchange > self.closed + 1 + delay(self.algorithm):
                raise Refused(f"upload from {node} for exchange {exchange}; it owes exchange "
                              f"{owed}", bound, strike=exchange > owed)
            try:
                row = self._decode(node, exchange, tensor)
            except WireError as exc:
                raise Refused(str(exc), bound) from None
            self.uploads.setdefault(exchange, {})[node] = row
            self.next_upload[node] = exchange + 1
            self.bytes_up += size
            self.lock.notify_all()

    def _close(self, k: int) -> None:
        """Average exchange ``k`` (every worker's upload is in; lock held) and step the outer
        model as the simulator does at the end of round ``k``."""
        algo, exp = self.algorithm, self.exp
        got = self.uploads.pop(k)
        mean = self.weights @ torch.stack([got[int(w)] for w in self.workers])
        mean, payload, down = downlink(exp.uplink, mean, self.cfg.seed, k)
        if self.late:
            if self.in_flight is not None:
                self.state = outer_apply(algo, self.state, self.parts, k - 1, self.in_flight)
            self.in_flight = mean
            after = outer_apply(algo, self.state, self.parts, k, mean)   # where workers go on
        else:
            self.state = after = outer_apply(algo, self.state, self.parts, k, mean)
        rt = self.cfg.runtime
        frames = bytes_frames(payload, kind=KIND_ENCODED, round=k, run_id=rt.run_id,
                              chunk_bytes=self.limits.chunk_bytes) if payload is not None else \
            model_frames(mean, kind=KIND_DELTA, round=k, run_id=rt.run_id, chunk_bytes=self.limits.chunk_bytes)
        self.served[k] = ([schema.TaskFrame(model=f).SerializeToString() for f in frames],
                          state_hash(after.params))
        self.served.pop(k - 2, None)
        self.closed = k
        self.fragment = synced_fragment(k, algo.fragments)
        self.exchange_bytes = down
        self.lock.notify_all()

    def _rounds(self, start: float) -> dict[str, Any]:
        self._wait_for_clients(start)
        missing = sorted(set(map(int, self.workers)) - set(self.clients))
        if missing:
            raise RunFailed(f"workers {missing} did not join within runtime.join_timeout_s; "
                            f"{self.cfg.algorithm.name} needs every worker in every exchange")
        start = time.monotonic()
        self.metrics.append(self._evaluate(0, start))
        with self.lock:                                # now the workers may start
            self.started = True
            self.lock.notify_all()
        rt, stop = self.cfg.runtime, self.cfg.stop
        stopped_by = "rounds"
        for k in range(1, stop.rounds + 1):
            with self.lock:
                every = set(map(int, self.workers))
                if not self.lock.wait_for(lambda k=k, every=every: set(self.uploads.get(k, {})) >= every,
                                          timeout=rt.round_timeout_s):
                    late = sorted(every - set(self.uploads.get(k, {})))
                    raise RunFailed(f"exchange {k}: workers {late} did not upload within "
                                    f"runtime.round_timeout_s ({rt.round_timeout_s:g} s); "
                                    f"{self.cfg.algorithm.name} needs every worker in every exchange")
                self._close(k)
            row = self._evaluate(k, start)
            self.metrics.append(row)
            stopped_by = self._stopped(row) or stopped_by
            if stopped_by != "rounds":
                break
        summary = self._summary(stopped_by, time.monotonic() - start)
        self._write(summary)
        return summary

    def _evaluate(self, r: int, start: float) -> dict[str, Any]:
        acc, loss = self.exp.evaluator.evaluate(self.state.params.reshape(1, -1))
        return {"round": r, "sim_time_s": time.monotonic() - start, "bytes_up": self.bytes_up,
                "bytes_down": self.bytes_down, "test_accuracy": float(acc[0]),
                "test_loss": float(loss[0]), "participants": len(self.workers) if r else 0,
                "fragment": self.fragment, "exchange_bytes": self.exchange_bytes}


class _Done(Exception):
    """The coordinator said the run is over."""


class IslandsWorker(Client):
    """One island: trains its own model, uploads each round's outer gradient and applies the
    averages the coordinator serves to its copy of the outer model (see the module doc)."""

    def __init__(self, cfg: ExperimentConfig, node_id: int, server: str | None = None) -> None:
        super().__init__(cfg, node_id, server)
        exp, algo = self.exp, self.algorithm
        self.outer = algo.init_state(exp.init_params.reshape(-1), exp.num_nodes)
        self.local = self.outer.params.reshape(1, -1).clone()
        self.inner = torch.zeros(1, AdamW.state_width(exp.spec.numel))
        self.parts = model_parts(algo, exp.spec, self.outer.params)
        self.every = cfg.local.steps // algo.fragments
        self.late = delay(algo) == 1

    def run(self) -> int:
        """Train every round until the coordinator says DONE; returns the rounds uploaded."""
        if self.num_samples == 0:
            return 0                                   # no data: not a worker (as the simulator)
        self.join()
        done = 0
        try:
            self._check(self._fetch_exchange(0)[1], "the initial model")
            for r in range(1, self.cfg.stop.rounds + 1):
                self._round(r)
                done = r
            while True:                                # the coordinator's last rounds, then DONE
                self._fetch_exchange(done)
                done += 1
        except _Done:
            return done

    def _round(self, r: int) -> None:
        algo = self.algorithm
        if str(r) == os.environ.get("GOSSAMER_TEST_KILL_AT_ROUND"):
            os.kill(os.getpid(), signal.SIGKILL)       # tests: die like kill -9
        if self.late:                                  # CO2
            self._train(self.every, r)
            self._upload(r)
            if r > 1:                                  # the previous exchange steps the outer model
                self._apply(r - 1)
            self.local[0] = self.outer.params          # every worker goes on from the outer model
            return
        overlapped = algo.overlap if r > 1 else 0      # Streaming DiLoCo
        self._train(overlapped, r + OVERLAP_KEY)
        if r > 1:
            index = self._apply(r - 1)
            self.local[0, index] = merged(algo.alpha, self.local[0, index], self.outer.params[index])
        self._train(self.every - overlapped, r)
        self._upload(r)

    def _train(self, steps: int, key: int) -> None:
        if steps:
            self.exp.trainer.train(self.local, np.array([self.node]), key, inplace=True,
                                   steps=np.array([steps]),
                                   objective=LocalObjective(optimizer_state=self.inner))

    def _upload(self, r: int) -> None:
        index = self.parts[synced_fragment(r, self.algorithm.fragments)]
        sent = (self.local[0, index] - self.outer.params[index]).reshape(1, -1)
        uplink = self.exp.uplink
        if uplink is None:
            self._send(sent[0], r, KIND_DELTA)
            return
        enc = uplink.compress(sent, seed=self.cfg.seed, keys=upload_keys(np.array([self.node]), r))
        self._send(uplink.to_bytes(enc, 0), r, KIND_ENCODED)

    def _apply(self, k: int) -> torch.Tensor:
        """Fetch exchange ``k``'s average, step the outer model with it, check the hash;
        returns the fragment's indices."""
        mean, digest = self._fetch_exchange(k)
        self.outer = outer_apply(self.algorithm, self.outer, self.parts, k, mean)
        self._check(digest, f"the outer model after exchange {k}")
        return self.parts[synced_fragment(k, self.algorithm.fragments)]

    def _check(self, digest: bytes, what: str) -> None:
        if digest != state_hash(self.outer.params):
            raise RuntimeError(f"worker {self.node}: {what} differs from the coordinator's "
                               "(hash mismatch): the configs or the builds differ")

    def _fetch_exchange(self, k: int) -> tuple[torch.Tensor | None, bytes]:
        """The average of exchange ``k`` (None for ``k = 0``) and the outer model's hash once
        it is applied; waits while the exchange is open."""
        rt = self.cfg.runtime
        while True:
            req = schema.TaskRequest(node_id=self.node, run_id=rt.run_id,
                                     last_round=k).SerializeToString()

            def call(req=req):
                frames = iter(self._get_task(req, timeout=rt.round_timeout_s))
                return schema.TaskFrame.FromString(next(frames)).header, frames

            header, frames = self._retry(call, "get exchange")
            if header.kind == schema.TaskHeader.DONE:
                raise _Done
            if header.kind == schema.TaskHeader.JOIN:
                self.join()
                continue
            if header.kind != schema.TaskHeader.TRAIN or int(header.round) != k + 1:
                time.sleep(header.retry_after_s or rt.poll_interval_s)
                continue
            if k == 0:
                return None, bytes(header.state_hash)
            try:
                return self._read_mean(k, frames), bytes(header.state_hash)
            except (WireError, ValueError) as exc:
                log.warning("worker %d: bad exchange %d from the coordinator (%s); asking again",
                            self.node, k, exc)
                time.sleep(rt.poll_interval_s)

    def _read_mean(self, k: int, frames) -> torch.Tensor:
        numel = len(self.parts[synced_fragment(k, self.algorithm.fragments)])
        uplink, rt = self.exp.uplink, self.cfg.runtime
        encoded = uplink is not None
        _, tensor = read_model((schema.TaskFrame.FromString(f).model for f in frames),
                               expected_numel=None if encoded else numel, run_id=rt.run_id,
                               limits=self.limits, dtype=torch.uint8 if encoded else torch.float32)
        if not encoded:
            return tensor.float().clone()
        return uplink.from_bytes(tensor.numpy().tobytes(), numel, seed=self.cfg.seed,
                                 key=DOWNLINK_KEY + k)

