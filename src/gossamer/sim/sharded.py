"""The simulator sharded over ``torch.distributed`` ranks (docs/scale.md).

Every rank builds the same experiment and runs the same protocol: selection, simulated times
and accounting are counter-based, so every rank takes every decision identically without
talking. What is split is the work: rank ``k`` owns the contiguous node ids
``[lo_k, hi_k)`` (cut at reduction-block boundaries so that each rank's expected work, the
samples its nodes hold, is about equal) and trains only the selected clients it owns.

The aggregate is reduced in an order fixed by node id, not by rank: node ids fall in blocks
of :data:`BLOCK` ids; each block's weighted sum is formed by the rank that owns the block (a
matrix product over its clients' trained parameters in id order, taken from the trainer's
parameter-major workspace: ``mean_groups``), the round's blocks (those holding a selected
client, at most min(K, N / BLOCK) rows of P values) are exchanged in one ``all_gather``
(each rank sends only its own blocks), and the blocks are added in block order. A run therefore writes the same ``metrics.csv`` with 1, 2 or 4 ranks,
bit for bit, and resumes from its checkpoint with any number of ranks. Rank 0 writes the run
directory; every rank evaluates (so that every rank sees the same stopping decision).

Launch: ``gossamer run CONFIG --ranks K`` starts K processes on this machine (gloo, one
intra-op thread each unless ``--threads``); ``torchrun --nproc-per-node K -m gossamer run
CONFIG --out DIR`` (one or several machines, torchrun's rendezvous) works the same, NCCL is
not used (the exchanged tensors are small and on the CPU). Sharded so far: synchronous FL
whose aggregate is the uploads' weighted mean (FedAvg, FedProx, FedAvgM, FedAdam, ...),
without faults, compression, privacy, attacks, contribution scores or hierarchies.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch

from gossamer.config import ConfigError, ExperimentConfig
from gossamer.errors import RankLost
from gossamer.sim.drivers.sync_fl import SyncFLDriver
from gossamer.sim.experiment import Experiment

BLOCK = 64              # node ids per reduction block: the unit of exact, rank-free sums
TIMEOUT_S = 120         # a collective waiting this long for a dead rank fails the run


@dataclass(frozen=True)
class Shard:
    """Rank ``rank`` of ``world`` owns node ids ``[lo, hi)``."""

    rank: int
    world: int
    lo: int
    hi: int
    edges: tuple[int, ...] = ()      # every rank's first id, then N: rank k owns [edges[k], edges[k+1])

    @property
    def primary(self) -> bool:
        return self.rank == 0


def world_from_env() -> tuple[int, int]:
    """``(rank, world)`` from torchrun's environment (``RANK``, ``WORLD_SIZE``); (0, 1) alone."""
    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ConfigError("WORLD_SIZE", "RANK and WORLD_SIZE must be integers") from None


def ranges(work: np.ndarray, world: int, block: int = BLOCK) -> list[tuple[int, int]]:
    """Contiguous id ranges, one per rank, cut at multiples of ``block`` so that the ranks'
    summed ``work`` (e.g. samples per node) is as equal as whole blocks allow."""
    n = len(work)
    starts = np.arange(0, n, block)
    per_block = np.add.reduceat(np.asarray(work, dtype=np.float64), starts) if n else np.zeros(0)
    cum = np.cumsum(per_block)
    total = cum[-1] if len(cum) else 0.0
    cuts = [0]
    for k in range(1, world):
        b = int(np.searchsorted(cum, total * k / world, side="left")) + 1 if total > 0 else \
            (len(starts) * k) // world
        cuts.append(min(max(b, cuts[-1]), len(starts)))
    cuts.append(len(starts))
    edges = [min(c * block, n) for c in cuts]
    return [(edges[k], edges[k + 1]) for k in range(world)]


def start(exp: Experiment) -> Shard:
    """This process's shard: joins the process group when ``WORLD_SIZE`` > 1 (gloo)."""
    import torch.distributed as dist

    rank, world = world_from_env()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=TIMEOUT_S))
    cuts = ranges(exp.trainer.sizes, world)
    lo, hi = cuts[rank]
    return Shard(rank, world, lo, hi, tuple(a for a, _ in cuts) + (cuts[-1][1],))


def check_config(cfg: ExperimentConfig) -> None:
    """One line for what the sharded simulator cannot run yet (from the config alone, so the
    launcher refuses before it starts any process)."""
    from gossamer.algorithms import ALGORITHMS
    from gossamer.experiment import features_in_use

    algo = ALGORITHMS.get(cfg.algorithm.name).from_params(cfg.algorithm.params)
    if algo.pattern != "sync_fl" or not algo.mean_of_models:
        raise ConfigError("algorithm.name", f"the sharded simulator runs synchronous FL whose aggregate "
                          f"is the uploads' weighted mean (fedavg, fedprox, ...); {cfg.algorithm.name} "
                          "runs in one process (drop --ranks)")
    unsupported = {"population.lazy": cfg.population.lazy, **features_in_use(cfg),
                   "algorithm.params": algo.deadline_s is not None or algo.over_selection}
    field = next((k for k, bad in unsupported.items() if bad), None)
    if field is not None:
        raise ConfigError(field, "not with the sharded simulator yet (it shards synchronous FL "
                          "without faults, attacks, compression, privacy, contribution scores, "
                          "hierarchies, deadlines or a registered population); drop --ranks")


def check(exp: Experiment) -> None:
    """:func:`check_config`, and what needs the built experiment (the model's size)."""
    check_config(exp.cfg)
    if exp.trainer.nodes_per_pass < BLOCK:
        raise ConfigError("model", f"{exp.spec.numel:,} parameters: a training pass holds fewer "
                          f"than the {BLOCK} clients of a reduction block; the sharded simulator "
                          "runs smaller models so far (drop --ranks)")


class ShardedSyncFLDriver(SyncFLDriver):
    """:class:`SyncFLDriver` whose clients train on the rank that owns them (see the module)."""

    def __init__(self, exp: Experiment, shard: Shard) -> None:
        check(exp)
        # batch shapes fixed by the schedule, not by the other clients of a call: a client then
        # trains bit for bit the same whichever rank (and cohort) trains it
        exp.trainer.shrink_batches = False
        super().__init__(exp)
        self.shard = shard

    def _gather(self, send: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``send`` (equal sizes), in rank order; one line if a rank is gone."""
        if self.shard.world == 1:
            return [send]
        import torch.distributed as dist

        out = [torch.empty_like(send) for _ in range(self.shard.world)]
        try:
            dist.all_gather(out, send)
        except (RuntimeError, dist.DistBackendError) as exc:
            reason = str(exc).split("] ", 1)[-1].split(". ")[0]
            raise RankLost(f"rank {self.shard.rank} of {self.shard.world}: another rank stopped "
                           f"during round {self.round + 1}'s aggregate ({reason})") from None
        return out

    def _train_and_aggregate(self, r: int, trained: np.ndarray, delivered: np.ndarray) -> None:
        exp, algo, shard = self.exp, self.algorithm, self.shard
        payload = algo.broadcast(self.state)
        start = payload[: exp.spec.numel]
        with self.timer("train_s"):
            if np.any(np.diff(trained) <= 0):
                raise RuntimeError("the sharded simulator needs each round's clients sorted by id")
            weights = algo.mean_weights(exp.trainer.sizes[trained], start.dtype)      # [K], every rank
            mine = (trained >= shard.lo) & (trained < shard.hi)
            own = trained[mine]
            # the blocks holding this round's clients (the same on every rank), one row each,
            # and which rank owns each block and each client
            active = np.unique(trained // BLOCK)
            edges = np.asarray(shard.edges if shard.world > 1 else (0, exp.num_nodes))
            block_rank = np.searchsorted(edges, active * BLOCK, side="right") - 1
            client_rank = np.searchsorted(edges, trained, side="right") - 1
            width = max(int(np.bincount(block_rank, minlength=shard.world).max()), 1)
            count = max(int(np.bincount(client_rank, minlength=shard.world).max()), 1)
            # what this rank sends: its blocks' sums, then its clients' losses and steps
            # (float32 losses, and step counts below 2^24, are exact in the model's dtype)
            numel = exp.spec.numel
            send = torch.zeros(width * numel + 2 * count, dtype=start.dtype)
            mine_blocks = send[: width * numel].view(width, numel)
            mine_stats = send[width * numel:].view(2, count)
            where = np.flatnonzero(mine)                 # own clients' positions in the round
            w = weights[torch.from_numpy(where)]
            block_of = own // BLOCK
            first_block = int(np.searchsorted(active, shard.lo // BLOCK))
            cuts = np.flatnonzero(np.diff(block_of)) + 1     # own clients, grouped by block
            bounds = np.concatenate([[0], cuts, [len(own)]]).astype(np.int64)
            per_pass = exp.trainer.nodes_per_pass
            g = 0
            while len(own) and g < len(bounds) - 1:      # whole blocks per call, one pass each
                h = g + 1
                while h < len(bounds) - 1 and bounds[h + 1] - bounds[g] <= per_pass:
                    h += 1
                a, b = int(bounds[g]), int(bounds[h])
                result = exp.trainer.train(start.expand(b - a, -1), own[a:b], r,
                                           objective=algo.local_objective(payload, None),
                                           mean_weights=w[a:b], mean_groups=bounds[g:h + 1] - a)
                rows = np.searchsorted(active, block_of[bounds[g:h]]) - first_block
                mine_blocks[torch.from_numpy(rows)] = result.mean
                mine_stats[0, a:b] = result.loss.to(start.dtype)
                mine_stats[1, a:b] = torch.from_numpy(result.steps).to(start.dtype)
                g = h
        with self.timer("communicate_s"):
            received = self._gather(send)
            partial = torch.empty(len(active), numel, dtype=start.dtype)
            stats = torch.empty(2, len(trained), dtype=start.dtype)
            for k, got in enumerate(received):
                blocks, clients = np.flatnonzero(block_rank == k), np.flatnonzero(client_rank == k)
                partial[torch.from_numpy(blocks)] = got[: width * numel].view(width, numel)[: len(blocks)]
                stats[:, torch.from_numpy(clients)] = got[width * numel:].view(2, count)[:, : len(clients)]
            mean = partial.sum(dim=0)
            self.state = algo.aggregate_mean(self.state, mean)
        self.train_loss = float(stats[0].float().mean())
        self.node_steps += int(stats[1].double().sum())


# --- gossamer run --ranks K: K processes on this machine ------------------------------------------
def launch(child_args: list[str], ranks: int, threads: int) -> int:
    """Run ``gossamer run CHILD_ARGS`` as ``ranks`` processes (ranks of one gloo group on
    localhost, ``threads`` intra-op threads each). Rank 0 prints; if a rank dies the others are
    stopped and the run fails in one line (exit 3): it continues from its last checkpoint
    with ``--resume`` and any number of ranks."""
    import signal
    import socket
    import subprocess
    import sys
    import time

    from gossamer.processes import stop as stop_processes

    with socket.socket() as sock:                  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for rank in range(ranks):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(ranks),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GOSSAMER_SHARDED="1",
                   OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        quiet = [] if rank == 0 else ["--quiet"]
        procs.append(subprocess.Popen([sys.executable, "-m", "gossamer", "run", *child_args, *quiet], env=env,
                                      stdout=None if rank == 0 else subprocess.DEVNULL))
    ended: dict[int, float] = {}                   # rank -> when it was seen to fail
    try:
        while not ended and any(p.poll() is None for p in procs):
            time.sleep(0.1)
            for k, p in enumerate(procs):
                if p.poll() not in (None, 0):
                    ended.setdefault(k, time.monotonic())
        if ended:                                  # a rank that lost a peer fails too: wait a
            time.sleep(0.5)                        # moment, then blame a killed rank first
            for k, p in enumerate(procs):
                if p.poll() not in (None, 0):
                    ended.setdefault(k, time.monotonic())
        for k, p in enumerate(procs):
            if p.poll() not in (None, 0):
                ended.setdefault(k, time.monotonic())
    finally:
        stop_processes(procs, grace_s=10.0)
    if not ended:
        return 0
    # the cause first: a killed rank, then one that failed on its own, then one that lost a peer (3)
    rank = min(ended, key=lambda k: (0 if procs[k].returncode < 0 else 2 if procs[k].returncode == 3 else 1,
                                     ended[k], k))
    code = procs[rank].returncode
    how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
    print(f"gossamer: rank {rank} of {ranks} stopped ({how}); the other ranks were stopped; "
          "continue from the last checkpoint with gossamer run --resume RUN_DIR --ranks K", file=sys.stderr)
    return 3
