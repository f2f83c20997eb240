"""``gossamer run CONFIG --ranks K``: K processes of one sharded run on this machine."""

from __future__ import annotations

import os


def launch(child_args: list[str], ranks: int, threads: int) -> int:
    """Run ``gossamer run CHILD_ARGS`` as ``ranks`` processes (ranks of one gloo group on
    localhost, ``threads`` intra-op threads each). Rank 0 prints; if a rank dies the others are
    stopped and the run fails in one line (exit 3): it continues from its last checkpoint
    with ``--resume`` and any number of ranks."""
    import signal
    import socket
    import sys
    import time

    from gossamer.processes import start
    from gossamer.processes import stop as stop_processes

    with socket.socket() as sock:                  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for rank in range(ranks):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(ranks), LOCAL_WORLD_SIZE=str(ranks),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GOSSAMER_SHARDED="1",
                   OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        quiet = [] if rank == 0 else ["--quiet"]
        procs.append(start(["run", *child_args, *quiet], env, quiet=rank > 0))
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
