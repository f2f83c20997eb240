"""``gossamer launch``: a server and clients as separate OS processes on loopback.

The launcher writes the resolved config into the run directory, starts the coordinator on
a free port (it reports its address in ``server.json``), starts one client process per
node, and waits for the coordinator to finish. Every process logs to ``logs/``. On Ctrl-C,
SIGTERM, or any failure every child is terminated (SIGKILL after a grace period), so no
process is left behind. The run directory has the simulator's format. Unless the config
names credentials of its own, FL clients get per-node tokens (``run_dir/secrets``), so each
can act only as its own node. ``gossamer launch --resume RUN_DIR`` restarts every process
from its checkpoint; a server that cannot gather a quorum of clients fails (exit code 3).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from gossamer.config import ExperimentConfig, dump
from gossamer.processes import Process, start
from gossamer.processes import stop as stop_processes


def _spawn(args: list[str], log_path: Path, threads: int) -> Process:
    """``gossamer ARGS`` in a session of its own (the launcher stops it), logging to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    src = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return start(args, env, log=log_path, new_session=True)


def threads_per_process(cfg: ExperimentConfig, processes: int) -> int:
    """Threads for each child: the config's, or the cores shared out (at least one). More
    threads than cores makes every process spin: 8 clients with 2 threads each on 2 cores
    ran rounds 10x slower than with 1 thread each (docs/benchmarks.md)."""
    if cfg.runtime.threads_per_process is not None:
        return cfg.runtime.threads_per_process
    return max(1, (os.cpu_count() or 1) // processes)


def with_node_tokens(cfg: ExperimentConfig, run_dir: Path) -> ExperimentConfig:
    """``cfg`` with per-node tokens in ``run_dir/secrets`` when it names no credentials of its
    own, so that a launched client can only act as its own node id (the secret is kept, and
    reused on ``--resume``)."""
    from gossamer import config as config_mod
    from gossamer.provision import write_node_tokens
    from gossamer.runtime.security import SECRET_FILE

    sec = cfg.runtime.security
    if sec.token or sec.token_file or sec.node_tokens_dir or sec.require_client_cert:
        return cfg
    secrets = (run_dir / "secrets").resolve()
    if not (secrets / SECRET_FILE).exists():           # aggregators are nodes N, N + 1, ...
        write_node_tokens(secrets, cfg.partition.num_nodes + aggregator_count(cfg))
    overrides = [f"runtime.security.node_tokens_dir={secrets}"]
    if not sec.tls:                                  # the launcher's own processes, as configured
        overrides.append("runtime.security.allow_insecure=true")
    return config_mod.validate(config_mod.apply_overrides(cfg.to_dict(), overrides))


def aggregator_count(cfg: ExperimentConfig) -> int:
    """Aggregator processes of ``hierarchy.levels``."""
    return sum(cfg.hierarchy.levels)


def _wait_for(path: Path, proc: Process, what: str, log: Path, timeout_s: float) -> str:
    """The address ``proc`` (``what``) writes to ``path`` once it listens, or RuntimeError."""
    end = time.monotonic() + timeout_s
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}; see {log}")
        if time.monotonic() > end:
            raise RuntimeError(f"{what} did not start listening in time")
        time.sleep(0.05)
    return json.loads(path.read_text())["address"]


def _spawn_tree(cfg: ExperimentConfig, run_dir: Path, config_path: Path, root: str, threads: int,
                timeout_s: float) -> tuple[list[Process], list[list[str]]]:
    """``gossamer aggregator`` processes, top level first, each with its parent's address (then
    the coordinator's, to re-home to); returns them and each client's addresses: its leaf, the
    other leaves in order after it, the coordinator (where it re-homes if its aggregator dies,
    as ``hierarchy.rehome`` has it in the simulator)."""
    from gossamer.experiment import build as build_experiment

    tree = build_experiment(cfg, population=False).hierarchy
    host = cfg.runtime.server.rsplit(":", 1)[0]
    procs, addresses = [], {}
    for g in range(tree.count):
        parent = tree.parent(g)
        parents = [root] if parent < 0 else [addresses[parent], root]
        (run_dir / "aggregators" / str(g) / "server.json").unlink(missing_ok=True)
        log = run_dir / "logs" / f"aggregator-{g}.log"
        procs.append(_spawn(["aggregator", str(config_path), "--id", str(g), "--parent", ",".join(parents),
                             "--listen", f"{host}:0", "--out", str(run_dir)], log, threads))
        addresses[g] = _wait_for(run_dir / "aggregators" / str(g) / "server.json", procs[-1],
                                 f"aggregator {g}", log, timeout_s)
    first = tree.number(tree.depth - 1, 0)                  # the first leaf
    leaves = tree.count - first
    homes = []
    for i in range(cfg.partition.num_nodes):
        home = tree.home(i) - first
        homes.append([addresses[first + (home + j) % leaves] for j in range(leaves)] + [root])
    return procs, homes


def tree_summary(cfg: ExperimentConfig, run_dir: Path) -> None:
    """Add the bytes per tier to ``summary.json`` from the aggregators' own summaries (tier 0:
    the coordinator's link; a killed aggregator reports nothing, ``aggregators_reporting``)."""
    from gossamer.metrics.runstore import write_json

    path = run_dir / "summary.json"
    if not path.exists():
        return
    summary = json.loads(path.read_text())
    levels = list(cfg.hierarchy.levels)
    up, down, reporting, g = [summary["bytes_up_total"]], [summary["bytes_down_total"]], 0, 0
    for count in levels:
        up.append(0)
        down.append(0)
        for _ in range(count):
            agg = run_dir / "aggregators" / str(g) / "summary.json"
            if agg.exists():
                one = json.loads(agg.read_text())
                up[-1] += one["bytes_from_children"]
                down[-1] += one["bytes_to_children"]
                reporting += 1
            g += 1
    summary["hierarchy"] = {"levels": levels, "bytes_up_by_tier": up, "bytes_down_by_tier": down,
                            "aggregators_reporting": reporting}
    write_json(path, summary)


def launch(cfg: ExperimentConfig, run_dir: Path, *, resume: bool = False,
           startup_timeout_s: float = 120.0) -> int:
    """Run ``cfg`` on real processes (``resume``: continue the run in ``run_dir`` from its
    checkpoints); returns the coordinator's (or the worst peer's) exit code."""
    from gossamer.algorithms import ALGORITHMS
    from gossamer.experiment import build_trackers
    from gossamer.runtime.common import refuse_simulator_only
    from gossamer.runtime.roles import coordinator_class

    refuse_simulator_only(cfg)
    build_trackers(cfg.output.trackers)              # a bad tracker: one line before anything runs
    algorithm = ALGORITHMS.get(cfg.algorithm.name)
    check = None if algorithm.family == "dl" else getattr(coordinator_class(algorithm.pattern), "check_config", None)
    if check is not None:                            # what the coordinator refuses, before spawning
        check(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    if algorithm.family == "dl":
        return _launch_peers(cfg, run_dir, startup_timeout_s, resume)
    cfg = with_node_tokens(cfg, run_dir)
    host = cfg.runtime.server.rsplit(":", 1)[0]
    config_path = run_dir / "launch.yaml"
    config_path.write_text(dump(cfg))
    procs: list[Process] = []
    previous = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        (run_dir / "server.json").unlink(missing_ok=True)
        threads = threads_per_process(cfg, cfg.partition.num_nodes + 1 + aggregator_count(cfg))
        what = ["--resume", str(run_dir)] if resume else [str(config_path), "--out", str(run_dir)]
        server = _spawn(["server", *what, "--listen", f"{host}:0"],
                        run_dir / "logs" / "server.log", threads)
        procs.append(server)
        address = _wait_for(run_dir / "server.json", server, "server", run_dir / "logs" / "server.log",
                            startup_timeout_s)
        homes = [[address]] * cfg.partition.num_nodes
        if cfg.hierarchy.levels:
            aggregators, homes = _spawn_tree(cfg, run_dir, config_path, address, threads, startup_timeout_s)
            procs += aggregators
        for i in range(cfg.partition.num_nodes):
            procs.append(_spawn(["client", str(config_path), "--id", str(i), "--server", ",".join(homes[i])],
                                run_dir / "logs" / f"client-{i}.log", threads))
        code = server.wait()
        clients_end = time.monotonic() + 10
        for p in procs[1:]:
            try:
                p.wait(timeout=max(0.0, clients_end - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        if cfg.hierarchy.levels and code == 0:
            tree_summary(cfg, run_dir)
        return code
    finally:
        stop_processes(procs)
        signal.signal(signal.SIGTERM, previous)


def _launch_peers(cfg: ExperimentConfig, run_dir: Path, startup_timeout_s: float,
                  resume: bool = False) -> int:
    """One ``gossamer peer`` process per node; the launcher gathers their addresses into a
    peers file, waits for all of them, and merges their metrics."""
    from gossamer.algorithms import ALGORITHMS
    from gossamer.metrics.runstore import atomic_write_text, environment, write_json
    from gossamer.runtime.roles import merger, peer_class

    pattern = ALGORITHMS.get(cfg.algorithm.name).pattern
    role = peer_class(pattern, cfg.algorithm.name)   # refuse an unsupported pattern before spawning
    if hasattr(role, "check_config"):                # and what the role cannot run, in one line
        role.check_config(cfg)

    host = cfg.runtime.server.rsplit(":", 1)[0]
    config_path = run_dir / "config.yaml"
    atomic_write_text(config_path, dump(cfg))
    write_json(run_dir / "environment.json", environment())
    peers_file = run_dir / "peers.json"
    peers_file.unlink(missing_ok=True)
    n = cfg.partition.num_nodes
    threads = threads_per_process(cfg, n)
    procs: list[Process] = []
    previous = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        for i in range(n):
            (run_dir / "peers" / f"address-{i}.json").unlink(missing_ok=True)
            procs.append(_spawn(["peer", str(config_path), "--id", str(i), "--listen", f"{host}:0",
                                 "--peers", str(peers_file), "--out", str(run_dir)]
                                + (["--resume"] if resume else []),
                                run_dir / "logs" / f"peer-{i}.log", threads))
        addresses = {}
        end = time.monotonic() + startup_timeout_s
        while len(addresses) < n:
            for i in range(n):
                path = run_dir / "peers" / f"address-{i}.json"
                if i not in addresses and path.exists():
                    addresses[i] = json.loads(path.read_text())["address"]
            if any(p.poll() not in (None, 0) for p in procs):
                raise RuntimeError(f"a peer exited early; see {run_dir}/logs")
            if time.monotonic() > end:
                raise RuntimeError("peers did not start listening in time")
            time.sleep(0.05)
        atomic_write_text(peers_file, json.dumps({str(k): v for k, v in sorted(addresses.items())}))
        codes = [p.wait() for p in procs]
        if any(c > 0 for c in codes):                 # an error, not a node killed by a signal
            return max(codes)
        killed = [i for i, c in enumerate(codes) if c < 0]
        merger(pattern)(cfg, run_dir, killed)
        return 0
    finally:
        stop_processes(procs)
        signal.signal(signal.SIGTERM, previous)
