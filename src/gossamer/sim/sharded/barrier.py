"""Barriers of the sharded simulator: through shared memory where every rank is on this
machine (:class:`SharedBarrier`), else gloo's (docs/scale.md)."""

from __future__ import annotations

import os

import numpy as np
import torch

from gossamer.errors import RankLost
from gossamer.sim.sharded.base import (
    TIMEOUT_S,
    Shard,
    one_host,
    rank_lost,
    shared_tensor,
    transport,
)


class SharedBarrier:
    """A barrier for ranks on one machine through shared memory: each rank writes how many
    barriers it has reached into its own slot of a shared table and waits until every slot has
    reached as many (one writer a slot, counts that only grow: no atomics needed).

    gloo's barrier is a round trip through its TCP sockets, ~0.9 ms on this 2-core machine even
    with every rank waiting; this one is a few microseconds, and the exchanges through shared
    memory take one a round (FedAvg) or a mixing step (D-PSGD). It needs stores seen in program
    order (x86's memory model: the rows a rank writes before its count are visible once its
    count is), so other machines keep gloo's. A waiting rank spins, then yields its core, then
    sleeps, and checks every few milliseconds that the ranks it waits for are alive (their pids,
    in the table, valid here because every rank shares this machine's pid namespace: checked
    when the table is made), failing in one line like a collective does."""

    SPIN = 500              # checks (a microsecond or two each) before a waiting rank yields
    YIELD_S = 0.002         # then yields for this long before it sleeps between checks
    SLEEP_S = 0.0002        # the longest sleep between checks
    CHECK_S = 0.05          # how often a waiting rank checks that the others are alive

    def __init__(self, shard: Shard, table: np.ndarray) -> None:
        self.shard = shard
        self.table = table             # [3, world] int64: barriers reached, pids, pid namespaces
        self.count = int(table[0, shard.rank])

    @classmethod
    def make(cls, shard: Shard) -> SharedBarrier | None:
        """Every rank's (a collective): the barrier where the ranks share this machine, its pid
        namespace and an ordered memory model, and :func:`transport` allows shared memory;
        None elsewhere (then gloo's barrier)."""
        import platform

        import torch.distributed as dist

        if (shard.world == 1 or transport() == "p2p" or not shard.on_host or not one_host(shard)
                or platform.machine().lower() not in ("x86_64", "amd64")):
            return None
        shared = shared_tensor(shard, (3, shard.world), torch.int64)
        if shared is None:
            return None
        table = shared.numpy()
        table[1, shard.rank] = os.getpid()
        table[2, shard.rank] = _pid_namespace()
        try:
            dist.barrier()
            same = table[2].min() == table[2].max() != 0 and all(_alive(int(p)) for p in table[1])
            votes = torch.tensor([int(same)], device="cpu")
            dist.all_reduce(votes, op=dist.ReduceOp.MIN)     # every rank decides alike
        except (RuntimeError, dist.DistBackendError) as exc:
            raise rank_lost(shard, exc, "setting up shared memory") from None
        return cls(shard, table) if int(votes) == 1 else None

    def wait(self, during: str) -> None:
        """Return once every rank has reached this barrier; :class:`RankLost` if a rank it
        waits for is gone (or none moves for :data:`TIMEOUT_S`)."""
        import time

        self.count += 1
        table, count = self.table, self.count
        table[0, self.shard.rank] = count
        checks, began, checked = 0, None, 0.0
        while table[0].min() < count:
            checks += 1
            if checks < self.SPIN:
                continue
            now = time.monotonic()
            if began is None:
                began = checked = now
            if now - began < self.YIELD_S:
                os.sched_yield()
            else:
                time.sleep(min(self.SLEEP_S, (now - began) / 16))
            if now - checked >= self.CHECK_S:
                checked = now
                for k in np.flatnonzero(table[0] < count).tolist():
                    if not _alive(int(table[1, k])):
                        raise RankLost(f"rank {self.shard.rank} of {self.shard.world}: another rank "
                                       f"stopped during {during} (rank {k}, pid {int(table[1, k])}, "
                                       "is gone)")
                if now - began > TIMEOUT_S:
                    raise RankLost(f"rank {self.shard.rank} of {self.shard.world}: another rank "
                                   f"stopped during {during} (no rank moved for {TIMEOUT_S} s)")


def _pid_namespace() -> int:
    """This process's pid namespace (its inode), 0 where it cannot be read."""
    try:
        return int(os.readlink("/proc/self/ns/pid").split("[", 1)[1].rstrip("]"))
    except (OSError, IndexError, ValueError):
        return 0


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, killed but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OSError, OverflowError):
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except (OSError, IndexError):
        return True


_BARRIERS: dict[tuple[int, int], SharedBarrier | None] = {}   # (rank, world) -> this process's


def barrier(shard: Shard, during: str) -> None:
    """Wait for every rank; one line if a rank is gone. Through shared memory where the ranks
    share this machine (:class:`SharedBarrier`, made at the first barrier: every rank reaches it
    together), else gloo's."""
    if shard.world == 1:
        return
    import torch.distributed as dist

    key = (shard.rank, shard.world)
    if key not in _BARRIERS:
        _BARRIERS[key] = SharedBarrier.make(shard)
    fast = _BARRIERS[key]
    if fast is not None:
        fast.wait(during)
        return
    try:
        dist.barrier()
    except (RuntimeError, dist.DistBackendError) as exc:
        raise rank_lost(shard, exc, during) from None
