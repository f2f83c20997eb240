"""The sharded simulator's barrier through shared memory (``SharedBarrier``): it lets no rank
past until every rank arrived, the rows written before it are seen after it, and a rank that is
gone fails the waiting ones in one line."""

import mmap
import multiprocessing as mp
import platform
import subprocess
import sys

import numpy as np
import pytest

from gossamer.errors import RankLost
from gossamer.sim.sharded.barrier import SharedBarrier, _alive
from gossamer.sim.sharded.base import Shard

pytestmark = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                                reason="the shared barrier runs on x86 only (other machines use gloo's)")


def _table(buf: mmap.mmap, world: int) -> tuple[np.ndarray, np.ndarray]:
    arr = np.frombuffer(buf, dtype=np.int64)
    return arr[: 3 * world].reshape(3, world), arr[3 * world:].reshape(-1, world)


def _rank(buf: mmap.mmap, rank: int, world: int, rounds: int, out) -> None:
    table, rows = _table(buf, world)
    fence = SharedBarrier(Shard(rank, world, 0, 0), table)
    seen = []
    for r in range(1, rounds + 1):
        rows[r % 2, rank] = r * 10 + rank          # this round's row, in one of two slots
        fence.wait(f"round {r}")
        seen.append([int(v) for v in rows[r % 2]])  # every rank's row of this round
    out.put((rank, seen))


def test_every_rank_sees_every_rows_of_the_round_after_the_barrier():
    world, rounds = 3, 200
    buf = mmap.mmap(-1, 8 * (3 * world + 2 * world))
    table, _ = _table(buf, world)
    ctx = mp.get_context("fork")
    procs, out = [], ctx.Queue()
    for k in range(world):
        procs.append(ctx.Process(target=_rank, args=(buf, k, world, rounds, out)))
    for k, p in enumerate(procs):
        p.start()
        table[1, k] = p.pid
    got = dict(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=10)
    want = [[r * 10 + k for k in range(world)] for r in range(1, rounds + 1)]
    assert all(got[k] == want for k in range(world))
    assert table[0].tolist() == [rounds] * world


def test_a_gone_rank_fails_the_waiting_one_in_one_line():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()                                    # gone (reaped): its pid runs nothing
    table = np.zeros((3, 2), dtype=np.int64)
    table[1] = [0, dead.pid]
    fence = SharedBarrier(Shard(0, 2, 0, 0), table)
    with pytest.raises(RankLost, match=rf"rank 0 of 2: another rank stopped during round 4's aggregate "
                                       rf"\(rank 1, pid {dead.pid}, is gone\)"):
        fence.wait("round 4's aggregate")


def test_a_killed_rank_not_yet_reaped_counts_as_gone():
    zombie = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert _alive(zombie.pid)
        zombie.kill()
        for _ in range(200):                       # dead but not reaped: a zombie
            if not _alive(zombie.pid):
                break
            import time
            time.sleep(0.01)
        assert not _alive(zombie.pid)
    finally:
        zombie.wait()
    assert not _alive(zombie.pid)


def test_a_rank_already_past_lets_the_others_through_at_once():
    table = np.zeros((3, 2), dtype=np.int64)
    table[0, 1] = 5                                # the other rank is 5 barriers along
    fence = SharedBarrier(Shard(0, 2, 0, 0), table)
    for _ in range(5):
        fence.wait("a step")
    assert table[0].tolist() == [5, 5]
