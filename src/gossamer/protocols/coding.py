"""The decisions of gradient coding, without clock or storage: codes, decoding, when a round closes.

Gradient coding (Tandon, Lei, Dimakis, Karampatziakis, "Gradient Coding: Avoiding Stragglers in
Distributed Learning", ICML 2017, arXiv:1612.03301). The data is split into ``n`` partitions
(node ``i``'s shard is partition ``i``); worker ``i`` holds the partitions in the support of row
``i`` of an ``n x n`` encoding matrix ``B`` (``s + 1`` of them), computes their gradients at the
current model and sends one vector, ``B[i] . g`` (``g``: the partitions' gradients, one row
each). For any set ``F`` of ``n - s`` workers there is a decoding vector ``a`` with
``a^T B_F = 1^T``, so ``a^T (B_F g) = sum_j g_j``: the server decodes the exact full gradient
from the first ``n - s`` arrivals. Two codes of the paper: fractional repetition (``n / (s+1)``
groups of ``s + 1`` workers holding the same ``s + 1`` partitions; needs ``(s + 1) | n``;
0/1 coefficients) and cyclic repetition (worker ``i`` holds partitions ``i, ..., i + s`` mod
``n``; the paper's Algorithm 2: a random ``s x n`` matrix ``H`` with ``H 1 = 0`` and every row
of ``B`` in its null space).

Sequential gradient coding, the selective-reattempt scheme (SR-SGC; Krishnan, Ebrahimi, Khisti,
"Sequential Gradient Coding For Straggler Mitigation", ICLR 2023, arXiv:2211.13802), under the
paper's ``(B, W, lambda)``-bursty straggler model: in every window of ``W`` consecutive rounds at
most ``lambda`` distinct workers straggle, and the rounds in which one worker straggles lie
within ``B`` consecutive rounds. Both are checked as the authors' simulation code
(github.com/mamaj/Sequential-Gradient-Coding, ``selective_repeat_sgc.py``) checks them: a
straggler of round ``r`` straggled in none of rounds ``r - W + 1 .. r - B``; and ``W - 1`` must
be a multiple of ``B``, as that code asserts (for other ``W`` this implementation met random
patterns within the model that it could not decode in time). Job ``t`` (the gradient at the
model of round ``t``) starts in round ``t`` and is decoded at the end of round ``t + B``
(delay ``T = B``). Every worker runs gradient coding with
``s = ceil(B lambda / (W - 1 + B))`` (below ``lambda``): in round ``t + B`` it works on job
``t + B``, except that when ``v > s`` workers did not return their task of job ``t`` in round
``t``, ``v - s`` of them (here: the lowest ids) reattempt that task instead; job ``t`` then has
``n - s`` results. Per round and worker that is ``s + 1`` partition gradients, where classic
gradient coding tolerating ``lambda`` stragglers in every round computes ``lambda + 1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from gossamer import rng
from gossamer.algorithms.fl.gradient_coding import (
    GradientCoding,
    SequentialGradientCoding,
    sequential_s,
)
from gossamer.config import ConfigError

RESIDUAL_TOLERANCE = 1e-9
"""The largest ``|a^T B_F - 1|`` a decoding may leave (float64 arithmetic)."""

CODE_KEY = 1 << 62
"""Key of the cyclic code's random matrix under ``rng.STREAM_SYSTEM`` (the profile fields use
keys 0..5)."""


# --- codes ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Code:
    """An encoding matrix ``B`` ``[n, n]`` (float64): worker ``i`` sends ``B[i] . g``."""

    matrix: np.ndarray
    kind: str                      # "fractional" or "cyclic"

    @property
    def n(self) -> int:
        return self.matrix.shape[0]

    def partitions(self) -> list[np.ndarray]:
        """The partitions each worker holds and computes the gradient of: row ``i``'s support."""
        return [np.flatnonzero(row) for row in self.matrix]

    @property
    def load(self) -> int:
        """Partition gradients a worker computes per round (the most any row holds)."""
        return int((self.matrix != 0).sum(axis=1).max())

    def decoding_vector(self, arrived: np.ndarray) -> tuple[np.ndarray, float]:
        """``(a, residual)``: ``a`` ``[n]`` (0 for workers not in ``arrived``) with
        ``a^T B = 1^T``, and ``max |a^T B - 1|``. The fractional repetition code takes the
        lowest arrived id of each group (coefficients 0/1); the cyclic code the least-squares
        solution over the arrived rows. Raises ``ValueError`` when the arrived workers cannot
        decode (residual over :data:`RESIDUAL_TOLERANCE`)."""
        arrived = np.unique(np.asarray(arrived, dtype=np.int64))
        a = np.zeros(self.n)
        if self.kind == "fractional":
            covered = np.zeros(self.n, dtype=bool)
            for i in arrived:                    # one worker per group: a sum of 0/1 rows
                if not covered[i]:
                    a[i] = 1.0
                    covered |= self.matrix[i] == 1
        elif len(arrived):
            a[arrived] = np.linalg.lstsq(self.matrix[arrived].T, np.ones(self.n), rcond=None)[0]
        residual = float(np.max(np.abs(a @ self.matrix - 1.0)))
        if not residual <= RESIDUAL_TOLERANCE:
            raise ValueError(f"{len(arrived)} of {self.n} workers cannot decode the full gradient "
                             f"(residual {residual:.3g})")
        return a, residual


def fractional_code(n: int, s: int) -> Code:
    """Fractional repetition: ``n / (s + 1)`` groups of ``s + 1`` consecutive workers, each worker
    of group ``k`` holding partitions ``k (s + 1) .. k (s + 1) + s`` with coefficient 1."""
    _check(n, s)
    if n % (s + 1):
        raise ValueError(f"the fractional repetition code needs s + 1 ({s + 1}) to divide the "
                         f"number of workers ({n}); use code: cyclic")
    group = np.arange(n) // (s + 1)
    return Code((group[:, None] == group[None, :]).astype(np.float64), "fractional")


def cyclic_code(n: int, s: int, generator: np.random.Generator) -> Code:
    """Cyclic repetition (the paper's Algorithm 2): row ``i`` is supported on partitions
    ``i, i + 1, ..., i + s`` (mod ``n``) with ``B[i, i] = 1``, and lies in the null space of a
    random ``s x n`` matrix ``H`` whose columns sum to 0. With probability 1 any ``n - s`` rows
    span that null space, which holds the all-ones vector."""
    _check(n, s)
    matrix = np.eye(n)
    if s:
        h = generator.standard_normal((s, n))
        h[:, -1] = -h[:, :-1].sum(axis=1)
        for i in range(n):
            cols = (i + np.arange(s + 1)) % n
            matrix[i, cols[1:]] = np.linalg.solve(h[:, cols[1:]], -h[:, cols[0]])
    return Code(matrix, "cyclic")


def build_code(algorithm, n: int, seed: int) -> Code:
    """``algorithm``'s code over ``n`` workers (the cyclic one drawn from the run's seed), the
    same in every executor and process."""
    if algorithm.code == "fractional":
        return fractional_code(n, algorithm.code_s)
    return cyclic_code(n, algorithm.code_s, rng.generator(seed, rng.STREAM_SYSTEM, CODE_KEY))


def encode(code: Code, workers: np.ndarray, weights: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """The coded vectors ``B[i] . (w * g)`` of ``workers`` ``[k, P]`` (float64), from the
    gradients ``grads`` of their partitions, ``[k, s + 1, P]`` in each row's support order
    (:meth:`Code.partitions`; ``weights``: the partitions' ``w``, float64 ``[n]``). Each row is
    summed term by term in that order, elementwise, so a worker encoding its own row alone and
    the simulator encoding all rows at once get the same bits."""
    support = [code.partitions()[i] for i in workers]
    out = torch.zeros(len(workers), grads.shape[-1], dtype=torch.float64, device=grads.device)
    for t in range(grads.shape[1]):
        cols = torch.tensor([int(s[t]) for s in support], device=grads.device)
        coef = torch.from_numpy(code.matrix[np.asarray(workers), cols.cpu().numpy()]).to(grads.device)
        out += coef[:, None] * (weights[cols, None] * grads[:, t].double())
    return out


def decode(code: Code, arrived: np.ndarray, coded: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The full gradient ``a^T (B_F g)`` (float64 ``[P]``) from the coded vectors ``coded``
    ``[len(arrived), P]`` of the workers ``arrived`` (ascending), and the decoding's residual.
    Summed term by term in worker order, zero coefficients skipped: with the fractional code
    every choice of arrivals adds the same vectors in the same order (one per group), so the
    simulator's arrivals and a real run's decode the same bits. ValueError when they cannot."""
    a, residual = code.decoding_vector(arrived)
    gradient = torch.zeros(coded.shape[1], dtype=torch.float64, device=coded.device)
    for row, i in enumerate(np.asarray(arrived, dtype=np.int64)):
        if a[i] != 0.0:
            gradient += float(a[i]) * coded[row].double()
    return gradient, residual


def _check(n: int, s: int) -> None:
    if not 0 <= s < n:
        raise ValueError(f"s must be in 0..{n - 1} (below the {n} workers), got {s}")


def first_arrivals(arrival_s: np.ndarray, count: int) -> tuple[np.ndarray, float]:
    """Classic gradient coding's round: the ``count`` earliest workers (ties by id) and the time
    the last of them arrives, when the round closes."""
    order = np.argsort(arrival_s, kind="stable")[:count]
    return np.sort(order), float(arrival_s[order].max()) if count else 0.0


# --- sequential gradient coding: selective reattempts -----------------------------------------
@dataclass
class Closing:
    """What the server decided when a round closed."""

    round_s: float                 # when it closed, from the round's start
    stragglers: np.ndarray         # bool [n]: workers it did not wait for
    job: int                       # the job decoded at the close (0: none yet)
    contributors: np.ndarray       # int: workers whose task of ``job`` the server holds
    waited_for_decoding: bool      # the straggler model allowed an earlier close that could
                                   # not decode (the scheme's guarantee says never)


class SelectiveReattempt:
    """The server's side of the selective-reattempt scheme for ``n`` workers: which job each
    worker works on in a round, when the round may close and which job it decodes.

    A round closes at the earliest arrival after which the workers not yet arrived are
    stragglers allowed by the ``(B, W, lambda)`` model (given the stragglers of the previous
    ``W - 1`` rounds) and the job due in this round can be decoded. Waiting for everyone always
    qualifies, so a straggler pattern outside the model costs time, never exactness.
    """

    def __init__(self, n: int, burst: int, window: int, stragglers: int) -> None:
        if burst < 1:
            raise ValueError(f"burst (B) must be >= 1, got {burst}")
        if window < burst + 1 or (window - 1) % burst:
            raise ValueError(f"window (W) must be 1 plus a multiple of burst (B = {burst}): "
                             f"{burst + 1}, {2 * burst + 1}, ...; got {window}")
        if not 1 <= stragglers < n:
            raise ValueError(f"stragglers (lambda) must be in 1..{n - 1} (below the {n} workers), "
                             f"got {stragglers}")
        self.n, self.burst, self.window, self.lam = n, burst, window, stragglers
        self.s = sequential_s(burst, window, stragglers)
        # stragglers of the previous W - 1 rounds, oldest first (rounds before 1: none)
        self.straggled = np.zeros((window - 1, n), dtype=bool)
        # delivered[k, i]: worker i's task of job r - B + k was received (jobs r - B .. r)
        self.delivered = np.zeros((burst + 1, n), dtype=bool)
        self.round = 0

    def tasks(self, r: int) -> np.ndarray:
        """The job each worker computes its task of in round ``r`` (``r``, or ``r - B`` for a
        reattempt)."""
        if r != self.round + 1:
            raise ValueError(f"rounds run in order: expected {self.round + 1}, got {r}")
        jobs = np.full(self.n, r, dtype=np.int64)
        old = r - self.burst
        if old >= 1:
            missing = np.flatnonzero(~self.delivered[1])        # job r - B, as of round r - B
            extra = len(missing) - self.s
            if extra > 0:
                jobs[missing[:extra]] = old
        return jobs

    def conforms(self, stragglers: np.ndarray) -> bool:
        """Whether ``stragglers`` (bool ``[n]``) this round keep the pattern in the model."""
        if (self.straggled.any(axis=0) | stragglers).sum() > self.lam:
            return False
        earlier = self.straggled[: self.window - self.burst]    # rounds r - W + 1 .. r - B
        return not (earlier.any(axis=0) & stragglers).any()

    def decodable(self, r: int, jobs: np.ndarray, late: np.ndarray) -> bool:
        """Whether the job due in round ``r`` (``r - B``) can be decoded if the workers ``late``
        (bool ``[n]``) are not waited for."""
        old = r - self.burst
        return old < 1 or (self.delivered[1] | ((jobs == old) & ~late)).sum() >= self.n - self.s

    def ready(self, r: int, jobs: np.ndarray, late: np.ndarray) -> bool:
        """Whether round ``r`` may close without the workers ``late``: the pattern stays in the
        straggler model and the due job decodes (an executor that sees arrivals one at a time
        closes at the first arrival after which this holds; :meth:`close` replays that)."""
        return self.conforms(late) and self.decodable(r, jobs, late)

    def close(self, r: int, jobs: np.ndarray, arrival_s: np.ndarray) -> Closing:
        """Close round ``r`` given each worker's job (:meth:`tasks`) and arrival time: at the
        earliest arrival after which :meth:`ready` holds."""
        waited_for_decoding = False
        for tau in np.unique(arrival_s):
            late = arrival_s > tau
            if not self.conforms(late):
                continue
            if not self.decodable(r, jobs, late):
                waited_for_decoding = True
                continue
            return self.commit(r, jobs, late, float(tau), waited_for_decoding)
        # waiting for everyone qualifies whenever jobs came from tasks()
        raise ValueError(f"round {r}: no close decodes job {r - self.burst}; jobs must come from tasks({r})")

    def commit(self, r: int, jobs: np.ndarray, late: np.ndarray, round_s: float = 0.0,
               waited_for_decoding: bool = False) -> Closing:
        """Round ``r`` closed without the workers ``late`` (it must be :meth:`ready`): the
        scheme's memory moves on; the job decoded now and whose tasks the server holds for it."""
        if not self.ready(r, jobs, late):
            raise ValueError(f"round {r} cannot close without workers {np.flatnonzero(late).tolist()}")
        old, got = r - self.burst, ~late
        contributors = np.zeros(0, dtype=np.int64)
        if old >= 1:
            contributors = np.flatnonzero(self.delivered[1] | ((jobs == old) & got))
        self.straggled = np.concatenate([self.straggled[1:], late[None]])
        self.delivered = np.concatenate([self.delivered[1:], ((jobs == r) & got)[None]])
        self.round = r
        return Closing(round_s, late, max(old, 0), contributors, waited_for_decoding)

    def state_dict(self) -> dict[str, np.ndarray | int]:
        return {"straggled": self.straggled.copy(), "delivered": self.delivered.copy(),
                "round": self.round}

    def load_state_dict(self, state: dict) -> None:
        self.straggled = np.asarray(state["straggled"], dtype=bool).copy()
        self.delivered = np.asarray(state["delivered"], dtype=bool).copy()
        self.round = int(state["round"])


def refuse_unsupported(exp) -> None:
    """One-line config errors for what coded rounds do not run with (both executors)."""
    cfg, algo, n = exp.cfg, exp.algorithm, exp.num_nodes
    name = cfg.algorithm.name
    if isinstance(algo, GradientCoding) and algo.s >= n:
        raise ConfigError("algorithm.params.s", f"{name} tolerates s stragglers per round, which "
                          f"must be below the number of workers: s = {algo.s}, partition.num_nodes "
                          f"= {n}")
    if isinstance(algo, SequentialGradientCoding) and algo.stragglers >= n:
        raise ConfigError("algorithm.params.stragglers", f"{name}: stragglers (lambda = "
                          f"{algo.stragglers}) must be below the number of workers "
                          f"(partition.num_nodes = {n})")
    if algo.code == "fractional" and n % (algo.code_s + 1):
        raise ConfigError("algorithm.params.code", f"the fractional repetition code needs s + 1 = "
                          f"{algo.code_s + 1} to divide the {n} workers; use code: cyclic")
    empty = np.flatnonzero(exp.trainer.sizes == 0)
    if len(empty):
        raise ConfigError("partition", f"{name} codes over every node's shard: node {empty[0]} "
                          "has no samples")
    for key in ("crash", "churn", "message_loss"):
        if getattr(cfg.faults, key) is not None:
            raise ConfigError(f"faults.{key}", f"{name} tolerates slow workers (faults.stragglers, "
                              f"faults.delay_spikes, system profiles); faults.{key} is not supported")
    for key in ("events", "partitions"):
        if getattr(cfg.faults, key):
            raise ConfigError(f"faults.{key}", f"{name} tolerates slow workers (faults.stragglers, "
                              f"faults.delay_spikes, system profiles); faults.{key} is not supported")
    if cfg.system.availability.model != "always":
        raise ConfigError("system.availability", f"{name} needs every worker every round: "
                          "availability always")
    if exp.adversary is not None and exp.adversary.model_attack:
        raise ConfigError("adversary.attack", f"{name} does not support model attacks (data "
                          "attacks such as label_flip work)")
    if cfg.privacy.dp is not None:
        raise ConfigError("privacy.dp", f"{name} does not support differential privacy")
    if cfg.privacy.secure_aggregation is not None:
        raise ConfigError("privacy.secure_aggregation", f"{name} does not support secure aggregation")
    for key in ("uplink", "downlink"):
        if getattr(cfg.compression, key) is not None:
            raise ConfigError(f"compression.{key}", f"{name} decodes exact coded vectors: no "
                              "compression")
    if cfg.model.init == "independent":
        raise ConfigError("model.init", f"{name} trains one global model: use model.init: same")
    local = cfg.local
    if local.steps is not None or local.epochs not in (None, 1):
        raise ConfigError("local.steps" if local.steps is not None else "local.epochs",
                          f"{name} computes one full-shard gradient per partition per round")
    if local.optimizer != "sgd":
        raise ConfigError("local.optimizer", f"{name} steps on the server "
                          "(algorithm.params.server_optimizer); local.optimizer must be sgd")
    for key in ("momentum", "weight_decay", "sam_rho"):
        if getattr(local, key):
            raise ConfigError(f"local.{key}", f"{name} steps on the server "
                              f"(algorithm.params.server_*); local.{key} must be 0")
