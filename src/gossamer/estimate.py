"""Memory and time a simulated run will need, estimated before it starts (``gossamer validate``).

Memory: what the process holds once the experiment is built (libraries, data, graph, mixing
matrix: its resident size) plus what the executor will allocate for the whole run (the population's
``[N, P]`` model copies, per-client state, per-client counters, one training pass), each
named. Time: one training call on a sample of the round's nodes is timed and scaled to a
round's nodes, plus one evaluation spread over ``eval.every`` rounds; it ignores everything
else a round does (mixing, aggregation, messages), so it is a lower bound for DL.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from gossamer import checks, devices
from gossamer.experiment import Experiment, population_buffers

# the field that moves each part of the estimate (any other, e.g. the population's models:
# partition.num_nodes)
_FIELDS = (("client state", "population.state_budget_mb"),
           ("per-client counters", "population.lazy"), ("client rows", "algorithm.params"),
           ("training pass", "local.batch_size"))
_COUNTER_BYTES_PER_CLIENT = 56      # sync FL's dense per-client counters (accounting, has_data)
_SAMPLE = 256                       # nodes in the timed training call


@dataclass
class Estimate:
    """Named memory parts (bytes) and seconds per round."""

    parts: list[tuple[str, float]] = field(default_factory=list)
    round_s: float | None = None
    timed_nodes: int = 0
    round_nodes: int = 0
    device: str | None = None         # a GPU's name, when the run computes on one
    device_free: int | None = None    # its free memory (bytes) once the experiment is built

    @property
    def total(self) -> float:
        return float(sum(b for _, b in self.parts))

    def refusal(self) -> str | None:
        """One line when the estimate exceeds the memory available now, naming the field that
        moves the largest part the executor would allocate; None when it fits. On a GPU the
        parts it allocates are measured against the GPU's free memory."""
        have = self.device_free if self.device is not None else checks.available_memory_bytes()
        planned = [(what, b) for what, b in self.parts if not what.startswith("built")]
        need = sum(b for _, b in planned)             # what is built is already held
        if have is None or not planned or need <= have:
            return None
        what, size = max(planned, key=lambda p: p[1])
        field = next((f for key, f in _FIELDS if what.startswith(key)), "partition.num_nodes")
        where = f"free on {self.device}" if self.device is not None else "of memory available"
        return (f"{field}: the run will allocate about {checks.gb(need)} more ({what}: "
                f"{checks.gb(size)}), more than the {checks.gb(have)} {where}")

    def lines(self, rounds: int) -> list[str]:
        shown = ", ".join(f"{what} {_size(b)}" for what, b in self.parts if b >= 1e6)
        have = checks.available_memory_bytes()
        out = [f"memory estimate: {_size(self.total)} ({shown or 'every part under 1 MB'})"
               + (f"; {checks.gb(have)} available now" if have is not None else "")]
        if self.device is not None:      # the population and training live on the GPU
            out.append(f"device: {self.device}; {checks.gb(self.device_free or 0)} of its memory free "
                       "(the population's buffers, client rows and the training pass go there)")
        if self.round_s is not None:
            out.append(f"time estimate: ~{self.round_s:.3g} s per round, ~{self.round_s * rounds:.3g} s for "
                       f"{rounds} rounds (training timed on {self.timed_nodes:,} nodes, scaled to the "
                       f"round's {self.round_nodes:,}; mixing and messages not included)")
        return out

    def ranks(self, ranks: int) -> tuple[list[str], str | None]:
        """What ``ranks`` ranks on this machine would take (``gossamer validate --ranks``):
        every rank builds the run (its libraries and data: an upper bound, forked ranks share
        the libraries' pages), and what the executor allocates is split by node owner or shared
        between the ranks (DL rows in shared memory), so the machine holds it about once; on
        GPUs each rank's share lands on its own GPU (measured against this GPU's free memory).
        Lines to print, and one line naming ``--ranks`` when the machine or a GPU cannot hold
        them."""
        built = sum(b for what, b in self.parts if what.startswith("built"))
        planned = self.total - built
        gpu = self.device is not None
        in_all, per_rank = ranks * built + planned, built + planned / ranks
        machine = in_all - planned if gpu else in_all          # on GPUs the shares are in their memory
        have = checks.available_memory_bytes()
        out = [f"with {ranks} ranks on this machine: about {_size(per_rank)} a rank (each builds the run: "
               f"{_size(built)}), {_size(in_all)} in all"
               + (f"; {checks.gb(have)} available now" if have is not None else "")]
        if gpu:
            out.append(f"on GPUs: about {_size(planned / ranks)} on each rank's GPU (its share of the "
                       f"population's buffers, client rows and training pass; a GPU a rank); "
                       f"{checks.gb(self.device_free or 0)} free on {self.device}")
        if self.round_s is not None:
            out.append(f"time with {ranks} ranks: at best ~{self.round_s / ranks:.3g} s per round "
                       f"(training and evaluation split by node owner; 2 ranks on 2 cores measured "
                       f"1.2-1.8x one rank, docs/scale.md)")
        refusal = None
        if have is not None and machine > have and ranks > 1:
            refusal = (f"--ranks: {ranks} ranks would hold about {_size(machine)} on this machine (each "
                       f"builds the run: {_size(built)}), more than the {checks.gb(have)} available; use "
                       f"fewer ranks, or torchrun across machines")
        elif gpu and self.device_free is not None and planned / ranks > self.device_free:
            refusal = (f"--ranks: each of {ranks} ranks would allocate about {_size(planned / ranks)} on its "
                       f"GPU, more than the {checks.gb(self.device_free)} free on {self.device}; use more "
                       f"ranks (a GPU each, torchrun across machines) or device: cpu")
        return out, refusal


def _resident_bytes() -> int | None:
    """This process's resident memory now (Linux), else None."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _size(num_bytes: float) -> str:
    return checks.gb(num_bytes) if num_bytes >= 1e9 else f"{num_bytes / 1e6:,.0f} MB"


def _tensor_bytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def round_nodes(exp: Experiment) -> int:
    """Nodes that train in a typical round (sync FL: the expected cohort; async FL: one
    buffer's worth of client updates; DL: everyone)."""
    algo, n = exp.algorithm, exp.num_nodes
    if algo.family == "dl":
        return n
    if algo.pattern == "async_fl":
        return int(algo.due(0) or 1)
    expected = getattr(algo, "expected_clients", None)
    return int(expected(n)) if expected is not None else n


def estimate(exp: Experiment, time_it: bool = True) -> Estimate:
    """The :class:`Estimate` of ``exp``'s run (``time_it``: also time one training call)."""
    cfg, algo, n, numel = exp.cfg, exp.algorithm, exp.num_nodes, exp.spec.numel
    row = 4 * numel
    est = Estimate()
    data = exp.dataset
    built = _resident_bytes()
    if built is None:             # no /proc: count what was built from its arrays
        built = _tensor_bytes(data.x_train, data.y_train, data.x_test, data.y_test)
        if exp.topology is not None:
            built += exp.topology.edges.nbytes + 2 * exp.topology.indices.nbytes
    est.parts.append(("built: libraries, data, graph", built))
    for what, copies in population_buffers(cfg, algo):
        held = copies * n * row
        if what == "client state" and exp.population is not None:     # kept within its budget
            held = min(held, cfg.population.state_budget_mb * 2**20)
        est.parts.append((f"{what} ({n:,} nodes x {numel:,} parameters x {copies})", held))
    if algo.pattern == "sync_fl" and exp.population is None:
        est.parts.append(("per-client counters", n * _COUNTER_BYTES_PER_CLIENT))
    k = round_nodes(exp)
    if algo.family == "fl":
        in_flight = getattr(algo, "concurrency", None) or k
        est.parts.append(("client rows in a round", 3 * max(k, in_flight if algo.pattern == "async_fl" else k) * row))
    est.parts.append(("training pass", 2 * min(k, exp.trainer.nodes_per_pass) * row))
    est.round_nodes = k
    if exp.device.type == "cuda":
        est.device = f"{exp.device} ({torch.cuda.get_device_name(exp.device)})"
        est.device_free = devices.spare_bytes(exp.device)
    if time_it:
        batch = max(k, getattr(algo, "concurrency", None) or 0) if algo.pattern == "async_fl" else k
        est.round_s, est.timed_nodes = _time_round(exp, k, batch)
    return est


def _time_round(exp: Experiment, k: int, batch: int) -> tuple[float, int]:
    """Seconds one round's training of ``k`` nodes takes, plus evaluation: a call on up to
    ``_SAMPLE`` of the ``batch`` nodes a training call takes (asynchronous FL trains every
    task in flight together) timed after one warm-up call, and scaled."""
    n = exp.num_nodes
    sample = np.arange(min(batch, _SAMPLE, n), dtype=np.int64)
    if exp.population is None:                       # nodes with data
        sample = np.flatnonzero(exp.trainer.sizes > 0)[: len(sample)]
    if len(sample) == 0:
        return 0.0, 0
    init = exp.init_params.reshape(-1, exp.spec.numel)
    rows = init[: len(sample)] if init.shape[0] > 1 else init.expand(len(sample), -1)
    # a GPU runs its kernels after the call returns: the clock stops when they are done
    sync = torch.cuda.synchronize if exp.device.type == "cuda" else (lambda: None)
    exp.trainer.train(rows.clone(), sample, 0)       # warm-up: workspaces, first page faults
    sync()
    start = time.perf_counter()
    exp.trainer.train(rows.clone(), sample, 1)
    sync()
    train_s = (time.perf_counter() - start) * k / len(sample)
    start = time.perf_counter()
    exp.evaluator.evaluate(init[:1])
    sync()
    eval_s = (time.perf_counter() - start) / max(1, exp.cfg.eval.every)
    return train_s + eval_s, len(sample)


def privacy_lines(exp: Experiment) -> list[str]:
    """What Gaussian DP (``privacy.dp``) will spend, before the run (``gossamer validate``):
    :func:`gossamer.privacy.plan.planned` at the run's noise (with ``target_epsilon``, the
    noise the builder calibrated, printed too)."""
    from gossamer.privacy.plan import planned

    cfg, dp = exp.cfg, exp.cfg.privacy.dp
    if dp is None or dp.mechanism != "gaussian":
        return []
    sizes, schedule = (None, None) if exp.population is not None else (exp.trainer.sizes, exp.trainer.schedule)
    plan = planned(cfg, exp.algorithm, dp.noise_multiplier, sizes, schedule,
                   exp.num_nodes if exp.population is not None else None)
    if plan is None:
        return []
    what = {"exact": "", "upper": "at most ", "lower": "at least "}[plan.bound]
    after = f"{cfg.stop.rounds} server updates" if exp.algorithm.pattern == "async_fl" else f"{cfg.stop.rounds} rounds"
    noise = (f"; noise multiplier {dp.noise_multiplier:.6g}, the smallest that plans at most "
             f"target_epsilon {dp.target_epsilon:g}" if dp.target_epsilon is not None else "")
    return [f"privacy: epsilon {what}{plan.epsilon:.6g} at delta {dp.delta:g} after {after} ({plan.words}){noise}"]
