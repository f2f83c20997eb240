"""Command line: ``gossamer run | plot | compare | sweep | validate | list`` and the runtime commands.

User errors (config, data, paths) print one line and exit with code 2; bugs raise.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from gossamer.errors import RankLost, UserError  # noqa: E402  (re-exported: gossamer.cli.UserError)

EXIT_USER_ERROR = 2
EXIT_RUN_FAILED = 3


def _run_dir(cfg, out: str | None) -> Path:
    if out is not None:
        path = Path(out)
        if (path / "metrics.csv").exists():
            raise UserError(f"--out: {path} already holds a run; use --resume {path} or another directory")
        return path
    from gossamer.metrics.rundir import new_run_dir

    return new_run_dir(cfg.output.dir, cfg.name)


_RESUME_OVERRIDABLE = ("stop.", "output.progress", "device=")


def _load_for_run(args: argparse.Namespace):
    from gossamer import config as config_mod

    if args.resume is None:
        if args.config is None:
            raise UserError("CONFIG: give a config file (or --resume RUN_DIR)")
        return config_mod.load(args.config, args.set), False
    run_dir = Path(args.resume)
    stored = run_dir / "config.yaml"
    if not stored.exists():
        raise UserError(f"--resume: {run_dir} holds no config.yaml; is it a run directory?")
    bad = [s for s in args.set if not s.startswith(_RESUME_OVERRIDABLE)]
    if bad:
        raise UserError(f"--set {bad[0]}: only stop.*, output.progress and device may change on --resume")
    cfg = config_mod.load(stored, args.set)
    if args.config is not None:
        given = config_mod.load(args.config, args.set)
        if config_mod.dump(given) != config_mod.dump(cfg):
            first = config_mod.first_difference(given.to_dict(), cfg.to_dict())
            raise UserError(f"--resume: {args.config} differs from the run's config at {first}")
    return cfg, True


def _resumable(run_dir: Path, command: str, accepted: tuple[str, ...]) -> None:
    from gossamer.metrics.rundir import check_resume

    try:
        check_resume(run_dir, command, accepted)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def _record_mode(run_dir: Path, mode: str) -> None:
    from gossamer.metrics.rundir import record

    run_dir.mkdir(parents=True, exist_ok=True)
    record(run_dir, mode)


def cmd_run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    if args.resume is not None:
        _resumable(Path(args.resume), "gossamer run", ("simulator",))
    cfg, resume = _load_for_run(args)
    if args.ranks is not None:             # K processes of one sharded run (sim/sharded/)
        return _run_ranks(args, cfg, resume)
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and not (resume or args.out):
        raise UserError("torchrun: give --out RUN_DIR (or --resume RUN_DIR) so that every rank "
                        "writes to the same run directory")
    run_dir = Path(args.resume) if resume else _run_dir(cfg, args.out)
    from gossamer.sim.runner import run_simulation

    summary = run_simulation(cfg, run_dir, resume=resume, start_time=start,
                             progress=cfg.output.progress and not args.quiet)
    acc = summary["final_test_accuracy"]
    if int(os.environ.get("RANK", "0") or 0) != 0:         # a sharded run: rank 0 reports
        return 0
    # grank ranks instead of classifying: its measure is the mean NDCG over nodes
    measure = f"test accuracy {acc:.4f}" if acc is not None or "final_ndcg" not in summary \
        else f"mean NDCG {summary['final_ndcg']:.4f}"
    print(f"run {run_dir}: {summary['rounds']} rounds, {measure}, "
          f"simulated {summary['sim_time_s']:.1f} s, {summary['bytes_sent_total'] / 1e6:.1f} MB sent, "
          f"wall {summary['wall_time_s']:.1f} s")
    return 0


def _run_ranks(args: argparse.Namespace, cfg, resume: bool) -> int:
    from gossamer.sim.sharded import check_config, launch

    if args.ranks < 1 or args.threads < 1:
        raise UserError("--ranks and --threads: give positive counts")
    check_config(cfg, args.ranks)            # one line here, before any process starts
    if resume:
        child = ["--resume", args.resume]
    else:
        child = [args.config, "--out", str(_run_dir(cfg, args.out))]
    for item in args.set:
        child += ["--set", item]
    if args.quiet:
        child.append("--quiet")
    return launch(child, args.ranks, args.threads)


def cmd_plot(args: argparse.Namespace) -> int:
    from gossamer.metrics.plot import plot_runs

    written = plot_runs([Path(p) for p in args.runs], Path(args.out) if args.out else None)
    for path in written:
        print(path)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from gossamer.metrics import report

    runs, out = [Path(p) for p in args.runs], Path(args.out)
    if args.watch:
        if args.every <= 0 or args.timeout <= 0:
            raise UserError("--every and --timeout: give positive seconds")
        report.watch(runs, out, every_s=args.every, timeout_s=args.timeout)
    else:
        report.write_report(runs, out)
        print(out)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from gossamer import config as config_mod
    from gossamer.estimate import estimate, privacy_lines
    from gossamer.sim.experiment import build_experiment

    cfg = config_mod.load(args.config, args.set)
    if args.ranks is not None:                    # what the sharded simulator would refuse
        from gossamer.sim.sharded import check_config

        if args.ranks < 1:
            print(f"gossamer: --ranks must be at least 1, not {args.ranks}", file=sys.stderr)
            return EXIT_USER_ERROR
        check_config(cfg, args.ranks)
    exp = build_experiment(cfg)
    if exp.spec is None:                          # grank: click logs, no model (docs/grank.md)
        print(f"ok: {cfg.algorithm.name} on {cfg.data.dataset}, {exp.num_nodes} nodes, no model")
        return 0
    print(f"ok: {cfg.algorithm.name} on {cfg.data.dataset}, {exp.num_nodes} nodes, "
          f"{exp.spec.numel} parameters, message {exp.message_bytes} bytes")
    est = estimate(exp)
    for line in est.lines(cfg.stop.rounds) + privacy_lines(exp):
        print(line)
    refusal = est.refusal()
    if args.ranks is not None:
        lines, too_many = est.ranks(args.ranks)
        for line in lines:
            print(line)
        refusal = refusal or too_many
    if refusal is not None:
        print(f"gossamer: config error: {refusal}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from gossamer.aggregators import AGGREGATORS
    from gossamer.algorithms import ALGORITHMS
    from gossamer.attacks import ATTACKS
    from gossamer.compression import COMPRESSORS
    from gossamer.data import DATASETS, PARTITIONERS
    from gossamer.models import MODELS
    from gossamer.topology import DYNAMIC_TOPOLOGIES, MIXING, TOPOLOGIES

    for reg in (ALGORITHMS, DATASETS, PARTITIONERS, MODELS, TOPOLOGIES, DYNAMIC_TOPOLOGIES, MIXING,
                AGGREGATORS, ATTACKS, COMPRESSORS):
        print(f"{reg.kind}: {', '.join(reg.names())}")
    from gossamer.registry import loaded_plugins

    if loaded_plugins():                                  # main() loaded them at start
        print(f"plugins: {', '.join(loaded_plugins())}")
    return 0


def _load_plugins() -> None:
    """Import the installed ``gossamer.plugins`` entry points, so their parts are selectable
    (and listed); a broken plugin is one warning line, and the command goes on."""
    from gossamer.registry import PluginError, load_plugins

    try:
        load_plugins()
    except PluginError as exc:
        print(f"gossamer: warning: {exc}", file=sys.stderr)


def _configure_runtime(cfg) -> None:
    """Logging for long-running processes, and the configured thread count."""
    import logging

    import torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if cfg.runtime.threads_per_process is not None:
        torch.set_num_threads(cfg.runtime.threads_per_process)


def cmd_server(args: argparse.Namespace) -> int:
    from gossamer import config as config_mod
    from gossamer.runtime.common import RunFailed
    from gossamer.runtime.roles import make_coordinator

    if args.resume:
        run_dir = Path(args.resume)
        _resumable(run_dir, "gossamer server", ("server", "launch"))
        if not (run_dir / "config.yaml").exists():
            raise UserError(f"--resume: {run_dir} holds no config.yaml; is it a run directory?")
        cfg = config_mod.load(run_dir / "config.yaml", args.set)
    else:
        if args.config is None:
            raise UserError("CONFIG: give a config file (or --resume RUN_DIR)")
        cfg = config_mod.load(args.config, args.set)
        run_dir = _run_dir(cfg, args.out)
    _configure_runtime(cfg)
    coordinator = make_coordinator(cfg, run_dir, resume=bool(args.resume), listen=args.listen)
    _record_mode(run_dir, "server")
    try:
        summary = coordinator.serve()
    except RunFailed as exc:
        print(f"gossamer: run failed: {exc}; resume with gossamer server --resume {run_dir}",
              file=sys.stderr)
        return EXIT_RUN_FAILED
    print(f"run {run_dir}: {summary['rounds']} rounds, test accuracy "
          f"{summary['final_test_accuracy']:.4f}, "
          f"{(summary['bytes_up_total'] + summary['bytes_down_total']) / 1e6:.1f} MB moved, "
          f"wall {summary['wall_time_s']:.1f} s")
    return 0


def cmd_client(args: argparse.Namespace) -> int:
    from gossamer import config as config_mod
    from gossamer.algorithms import ALGORITHMS
    from gossamer.runtime.roles import client_class

    cfg = config_mod.load(args.config, args.set)
    _configure_runtime(cfg)
    try:
        client = client_class(ALGORITHMS.get(cfg.algorithm.name).pattern)(cfg, args.id, args.server)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    rounds = client.run()
    print(f"client {args.id}: trained {rounds} rounds")
    return 0


def cmd_aggregator(args: argparse.Namespace) -> int:
    from gossamer import config as config_mod
    from gossamer.runtime.aggregator import Aggregator

    cfg = config_mod.load(args.config, args.set)
    _configure_runtime(cfg)
    parents = [a for a in (args.parent or cfg.runtime.server).split(",") if a]
    try:
        aggregator = Aggregator(cfg, args.id, Path(args.out) / "aggregators" / str(args.id),
                                parents=parents, listen=args.listen)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    summary = aggregator.serve()
    print(f"aggregator {args.id}: {summary['bytes_from_children'] / 1e6:.1f} MB from its children, "
          f"{summary['bytes_to_parent'] / 1e6:.1f} MB to its parent")
    return 0


def cmd_peer(args: argparse.Namespace) -> int:
    from gossamer import config as config_mod
    from gossamer.algorithms import ALGORITHMS
    from gossamer.runtime.roles import peer_class

    cfg = config_mod.load(args.config, args.set)
    if args.resume:
        _resumable(Path(args.out), "gossamer launch", ("launch",))
    _configure_runtime(cfg)
    pattern = ALGORITHMS.get(cfg.algorithm.name).pattern
    try:                        # a peer class refuses what it cannot do (e.g. gossip --resume)
        peer = peer_class(pattern, cfg.algorithm.name)(cfg, args.id, Path(args.out),
                                                       listen=args.listen, resume=args.resume)
    except ValueError as exc:
        if isinstance(exc, config_mod.ConfigError):
            raise
        raise UserError(str(exc)) from None
    peer.run(Path(args.peers))
    print(f"peer {args.id}: done")
    return 0


def cmd_launch(args: argparse.Namespace) -> int:
    from gossamer import config as config_mod
    from gossamer.runtime.launcher import launch

    overrides = list(args.set) + ([f"partition.num_nodes={args.nodes}"] if args.nodes else [])
    if args.resume is not None:
        run_dir = Path(args.resume)
        _resumable(run_dir, "gossamer launch", ("launch",))
        bad = [s for s in overrides if not s.startswith(_RESUME_OVERRIDABLE)]
        if args.config is not None or bad:
            raise UserError("--resume: the run's own config is used; give no CONFIG, --nodes or --set "
                            "other than stop.*")
        if not (run_dir / "config.yaml").exists():
            raise UserError(f"--resume: {run_dir} holds no config.yaml; is it a run directory?")
        cfg = config_mod.load(run_dir / "config.yaml", overrides)
    else:
        if args.config is None:
            raise UserError("CONFIG: give a config file (or --resume RUN_DIR)")
        cfg = config_mod.load(args.config, overrides)
        run_dir = _run_dir(cfg, args.out)
    _record_mode(run_dir, "launch")
    code = launch(cfg, run_dir, resume=args.resume is not None)
    if code == 0 and (run_dir / "summary.json").exists():
        import json

        s = json.loads((run_dir / "summary.json").read_text())
        print(f"run {run_dir}: {s['rounds']} rounds on {cfg.partition.num_nodes} processes, "
              f"test accuracy {s['final_test_accuracy']:.4f}, wall {s['wall_time_s']:.1f} s")
    elif code != 0:
        print(f"gossamer: launch failed (exit {code}); logs in {run_dir}/logs; resume with "
              f"gossamer launch --resume {run_dir}", file=sys.stderr)
    return code


def _parse_targets(text: str) -> list[float]:
    try:
        targets = sorted({float(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise UserError(f"--targets: {text!r} is not a comma-separated list of accuracies") from None
    if not targets or any(not 0 < x <= 1 for x in targets):
        raise UserError("--targets: give accuracies in (0, 1], e.g. 0.8,0.85")
    return targets


def _compare_seeds(args: argparse.Namespace, targets: list[float], out: Path) -> int:
    """``compare --seeds N``: each config at N seeds into OUT/<config name>/seed=<s>; the table
    gives mean ± 95% CI and the figure a band per config."""
    from gossamer import config as config_mod
    from gossamer.metrics.compare import compare_seeds
    from gossamer.metrics.sweep import Run, complete, seed_values

    groups: list[tuple[str, list[Run]]] = []
    for path in args.configs:
        cfg = config_mod.load(path, args.set)                     # fail early, one line
        stem = Path(path).stem
        groups.append((stem, [Run(f"{stem}/seed={s}", out / stem / f"seed={s}", path,
                                  list(args.set) + [f"seed={s}"])
                              for s in seed_values(cfg.seed, args.seeds)]))
    failed = complete([r for _, runs in groups for r in runs], args.jobs)
    if failed:
        raise UserError(f"{len(failed)} runs failed (first: {failed[0].run_dir}); see their output "
                        "above; run the same command again to retry them")
    md, fig = compare_seeds([(stem, [r.run_dir for r in runs]) for stem, runs in groups], targets, out)
    print(md.read_text(), end="")
    print(f"wrote {md} and {fig}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """Run CONFIG over the --grid cells at --seeds seeds each (reusing finished runs, resuming
    interrupted ones), then write the table of mean ± 95% CI per cell."""
    from gossamer import config as config_mod
    from gossamer.metrics.sweep import complete, plan, write_results

    targets = _parse_targets(args.targets)
    if args.jobs < 1:
        raise UserError(f"--jobs {args.jobs}: give at least 1")
    if args.out is None:
        cfg = config_mod.load(args.config, args.set)
        out = Path(cfg.output.dir) / f"{cfg.name}-sweep"
    else:
        out = Path(args.out)
    sweep = plan(args.config, args.set, args.grid, args.seeds, out)
    failed = complete(sweep.runs, args.jobs)
    md, _ = write_results(sweep, targets)
    print(md.read_text(), end="")
    print(f"wrote {md}, {out / 'sweep.csv'}, {out / 'sweep.json'}")
    if failed:
        raise UserError(f"{len(failed)} of {len(sweep.runs)} runs failed (first: {failed[0].run_dir}); "
                        "the table holds the finished ones; run the same command again to retry")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Run each config into OUT/<config name> (resuming an unfinished one, reusing a finished
    one) with up to --jobs runs at once, then write the table and figure into OUT."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    from gossamer import config as config_mod
    from gossamer.metrics.compare import compare
    from gossamer.metrics.sweep import execute

    targets = _parse_targets(args.targets)
    out = Path(args.out)
    if args.seeds != 1:
        return _compare_seeds(args, targets, out)
    jobs: list[tuple[Path, list[str]]] = []
    for path in args.configs:
        config_mod.load(path, args.set)                           # fail early, one line
        run_dir = out / Path(path).stem
        if (run_dir / "summary.json").exists():
            continue
        cmd = ["run", "--quiet"]
        cmd += ["--resume", str(run_dir), path] if (run_dir / "config.yaml").exists() else [path, "--out", str(run_dir)]
        for s in args.set:
            cmd += ["--set", s]
        jobs.append((run_dir, cmd))
    env = dict(os.environ)
    if args.jobs > 1:
        env.setdefault("OMP_NUM_THREADS", "1")                    # one core per run

    def run_one(job: tuple[Path, list[str]]) -> tuple[Path, int, str]:
        code, output = execute(job[1], env)
        return job[0], code, output.strip().splitlines()[-1:]

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for run_dir, code, last in pool.map(run_one, jobs):
            print(f"{run_dir.name}: {'ok' if code == 0 else f'failed (exit {code})'} {' '.join(last)}")
            if code != 0:
                raise UserError(f"{run_dir}: the run failed; see its output above")
    md, fig = compare([out / Path(p).stem for p in args.configs], targets, out)
    print(md.read_text(), end="")
    print(f"wrote {md} and {fig}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gossamer", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run an experiment in the simulator")
    run.add_argument("config", nargs="?", help="experiment YAML")
    run.add_argument("--out", help="run directory (default: output.dir/NAME-TIMESTAMP)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config field, e.g. --set partition.num_nodes=400")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument("--ranks", type=int, help="shard the population over this many processes "
                     "(torch.distributed, gloo, on this machine; docs/scale.md)")
    run.add_argument("--threads", type=int, default=1, help="--ranks: intra-op threads per rank (default 1)")
    run.set_defaults(func=cmd_run)
    plot = sub.add_parser("plot", help="plot accuracy against round, simulated time and bytes")
    plot.add_argument("runs", nargs="+", metavar="RUN_DIR")
    plot.add_argument("--out", help="folder for the PNGs (default: the first run directory)")
    plot.set_defaults(func=cmd_plot)
    rep = sub.add_parser("report", help="one self-contained HTML report of one or more run directories")
    rep.add_argument("runs", nargs="+", metavar="RUN_DIR")
    rep.add_argument("--out", default="report.html", help="the HTML file to write (default: report.html)")
    rep.add_argument("--watch", action="store_true", help="re-render until every run has finished; "
                     "the page refreshes itself meanwhile")
    rep.add_argument("--every", type=float, default=5.0, help="--watch: seconds between renders (default 5)")
    rep.add_argument("--timeout", type=float, default=3600.0, help="--watch: stop after this many seconds "
                     "(default 3600)")
    rep.set_defaults(func=cmd_report)
    val = sub.add_parser("validate", help="check a config (schema, data, topology) without running")
    val.add_argument("config")
    val.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    val.add_argument("--ranks", type=int, default=None, metavar="K",
                     help="also estimate K ranks of the sharded simulator on this machine")
    val.set_defaults(func=cmd_validate)
    lst = sub.add_parser("list", help="list registered algorithms, datasets, models, topologies")
    lst.set_defaults(func=cmd_list)
    srv = sub.add_parser("server", help="run the FL coordinator of a real deployment")
    srv.add_argument("config", nargs="?")
    srv.add_argument("--out", help="run directory")
    srv.add_argument("--listen", help="HOST:PORT to listen on (default runtime.server; port 0: any free)")
    srv.add_argument("--resume", metavar="RUN_DIR", help="continue from the server's last checkpoint")
    srv.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    srv.set_defaults(func=cmd_server)
    cli = sub.add_parser("client", help="run one FL client of a real deployment")
    cli.add_argument("config")
    cli.add_argument("--id", type=int, required=True, help="this client's node id")
    cli.add_argument("--server", help="HOST:PORT of the coordinator or its aggregator (default "
                     "runtime.server); more, comma-separated, to re-home to in order")
    cli.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    cli.set_defaults(func=cmd_client)
    agg = sub.add_parser("aggregator", help="run one aggregator between FL clients and the "
                         "coordinator (hierarchy.levels)")
    agg.add_argument("config")
    agg.add_argument("--id", type=int, required=True, help="this aggregator's number (level by "
                     "level from the top, from 0)")
    agg.add_argument("--parent", help="HOST:PORT of the coordinator or the aggregator above "
                     "(default runtime.server); more, comma-separated, to re-home to in order")
    agg.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0: any free)")
    agg.add_argument("--out", required=True, help="run directory (aggregators/ID holds its files)")
    agg.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    agg.set_defaults(func=cmd_aggregator)
    peer = sub.add_parser("peer", help="run one decentralized peer of a real deployment")
    peer.add_argument("config")
    peer.add_argument("--id", type=int, required=True)
    peer.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0: any free)")
    peer.add_argument("--peers", required=True, help="JSON file: node id -> HOST:PORT")
    peer.add_argument("--out", required=True, help="run directory (peers/ holds per-peer files)")
    peer.add_argument("--resume", action="store_true", help="continue from this peer's checkpoint")
    peer.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    peer.set_defaults(func=cmd_peer)
    lau = sub.add_parser("launch", help="run server and clients as local processes")
    lau.add_argument("config", nargs="?")
    lau.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted launch")
    lau.add_argument("--nodes", type=int, help="number of clients (sets partition.num_nodes)")
    lau.add_argument("--out", help="run directory")
    lau.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    lau.set_defaults(func=cmd_launch)
    cmp_ = sub.add_parser("compare", help="run several configs and tabulate time and bytes to "
                          "target accuracies, with a figure of accuracy against simulated time")
    cmp_.add_argument("configs", nargs="+", metavar="CONFIG")
    cmp_.add_argument("--out", required=True, help="folder: one run directory per config, plus the table")
    cmp_.add_argument("--targets", default="0.8,0.85", help="target accuracies (default 0.8,0.85)")
    cmp_.add_argument("--jobs", type=int, default=1, help="runs at once (default 1)")
    cmp_.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a field in every config, e.g. --set stop.max_sim_time_s=60")
    cmp_.add_argument("--seeds", type=int, default=1, metavar="N",
                      help="runs per config at seeds cfg.seed, cfg.seed+1, ... (default 1); with more "
                      "than one, OUT/<config>/seed=<s> and a table of mean ± 95%% CI")
    cmp_.set_defaults(func=cmd_compare)
    swp = sub.add_parser("sweep", help="run a config over a grid of values at several seeds; one "
                         "table of mean ± 95%% CI per grid cell (finished runs are reused)")
    swp.add_argument("config", metavar="CONFIG")
    swp.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                     help="values of one config field, parsed like --set values (commas inside "
                     "[...] stay, e.g. model.params.hidden=[32],[64,32]); several flags: every "
                     "combination")
    swp.add_argument("--seeds", type=int, default=1, metavar="N",
                     help="runs per grid cell, at seeds cfg.seed, cfg.seed+1, ..., "
                     "cfg.seed+N-1 (default 1)")
    swp.add_argument("--out", help="folder: OUT/<key=value,...>/seed=<s> per run, plus sweep.md, "
                     "sweep.csv, sweep.json, sweep.png (default output.dir/NAME-sweep)")
    swp.add_argument("--targets", default="0.8,0.85", help="target accuracies (default 0.8,0.85)")
    swp.add_argument("--jobs", type=int, default=1, help="runs at once (default 1)")
    swp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a field in every run, e.g. --set stop.rounds=5")
    swp.set_defaults(func=cmd_sweep)
    sub.add_parser("certs", help="generate a self-signed CA and node certificates "
                   "(gossamer certs --help)")
    sub.add_parser("tokens", help="generate a node secret and per-node tokens that bind node ids "
                   "(gossamer tokens --help)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["certs"]:                     # its own parser (gossamer.runtime.security)
        from gossamer.provision import certs_main

        return certs_main(argv[1:])
    if argv[:1] == ["tokens"]:
        from gossamer.provision import tokens_main

        return tokens_main(argv[1:])
    args = build_parser().parse_args(argv)
    from gossamer.config import ConfigError
    from gossamer.metrics.runstore import CheckpointError

    _load_plugins()
    try:
        return args.func(args)
    except (ConfigError, UserError, CheckpointError) as exc:
        prefix = "config error: " if isinstance(exc, ConfigError) else "error: "
        print(f"gossamer: {prefix}{exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except RankLost as exc:
        print(f"gossamer: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        how = (f"gossamer {args.command} --resume RUN_DIR" if args.command in ("run", "server", "launch")
               else "the same command (finished runs are reused)" if args.command in ("sweep", "compare")
               else "--resume")
        print(f"gossamer: interrupted; resume with {how}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
