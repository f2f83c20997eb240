"""The run's ``metrics.csv``, ``summary.json`` and ``model.pt`` from what decentralized peers recorded.

One merger for every peer pattern: it reads the peers' records in ``peers/`` and builds each
row with the pattern's builders in :mod:`gossamer.protocols.dl_metrics`, as the simulator's
drivers do. ``sync_dl``, ``gradient_tracking`` and ``async_gossip`` rows hold the peers'
accuracy spread, summed bytes, the slowest peer's wall time, and the consensus of the models
saved at that round; ``sampled_dl`` rows the first aggregator's model (lowest in round
``r + 1``'s ranking), the round's trainers, aggregators and timeouts, model bytes so far and
wall seconds; ``random_walk`` rows the tokens after ``r`` hops, whenever each got there, and
the visit statistics of their paths (the availability and fault columns stay empty). Peers
that died (``killed``) count for what they recorded.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gossamer.config import ExperimentConfig
from gossamer.experiment import Experiment, build_trackers
from gossamer.experiment import build as build_experiment
from gossamer.metrics.runstore import MetricsWriter, load_checkpoint, save_checkpoint, write_json
from gossamer.metrics.trackers import replay
from gossamer.privacy import sample_ledger
from gossamer.privacy.plan import calibrated
from gossamer.protocols import dl_metrics

Rows = list[dict[str, Any]]


def merge_metrics(cfg: ExperimentConfig, run_dir: Path, killed: list[int] | None = None) -> dict[str, Any]:
    """Write the run's ``metrics.csv`` and ``summary.json`` from ``run_dir/peers``; returns the summary."""
    run_dir = Path(run_dir)
    exp = build_experiment(cfg, population=False)
    pattern = exp.algorithm.pattern
    merge = {"sampled_dl": _modest, "random_walk": _walk}.get(pattern, _peers)
    columns, rows, extra = merge(exp, run_dir)
    (run_dir / "metrics.csv").unlink(missing_ok=True)
    MetricsWriter(run_dir / "metrics.csv", columns).append_many(rows)
    last = rows[-1] if rows else {}
    summary = {"name": cfg.name, "algorithm": cfg.algorithm.name, "executor": "runtime",
               "num_nodes": exp.num_nodes, "num_params": exp.spec.numel,
               "rounds": last.get("round", 0), "final_test_accuracy": last.get("test_accuracy"),
               "final_test_loss": last.get("test_loss"), "sim_time_s": last.get("sim_time_s"),
               "wall_time_s": last.get("sim_time_s"), "bytes_sent_total": last.get("bytes_up", 0),
               **extra, **calibrated(exp.cfg), "failed_peers": sorted(killed or [])}
    write_json(run_dir / "summary.json", summary)
    replay(build_trackers(cfg.output.trackers), run_dir, cfg.to_dict(), rows, summary)   # output.trackers
    return summary


def _csv(path: Path) -> Rows:
    if not path.exists():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


def _num(value: str | None, default: float = 0.0) -> float:
    return float(value) if value not in ("", None) else default


def _models(files: list[Path]) -> torch.Tensor | None:
    """The saved models ``[k, P]``, or None when one is missing (its peer died first)."""
    if not files or not all(f.exists() for f in files):
        return None
    return torch.stack([load_checkpoint(f)["params"] for f in files])


def _save_model(exp: Experiment, params: torch.Tensor, target: Path) -> None:
    """The run's ``model.pt`` (a state dict, as the simulator writes)."""
    exp.spec.load_into(exp.model, params)
    save_checkpoint(target, {k: v.detach().clone() for k, v in exp.model.state_dict().items()},
                    keep_previous=False)


# --- one row per evaluated round from every peer's own model ---------------------------------------
def _peers(exp: Experiment, run_dir: Path) -> tuple[list[str], Rows, dict[str, Any]]:
    n = exp.num_nodes
    per_peer = [{int(r["round"]): r for r in _csv(run_dir / "peers" / f"metrics-{i}.csv")} for i in range(n)]
    ledger = sample_ledger(exp.cfg, exp.trainer.sizes)
    rows = []
    for r in sorted(set().union(*per_peer)):
        have = [per_peer[i][r] for i in range(n) if r in per_peer[i]]
        acc = torch.tensor([float(x["test_accuracy"]) for x in have])
        loss = torch.tensor([float(x["test_loss"]) for x in have])
        row = {"round": r, "sim_time_s": max(float(x["sim_time_s"]) for x in have),
               "bytes_up": sum(int(x["bytes_up"]) for x in have),
               "bytes_down": sum(int(x["bytes_down"]) for x in have), **dl_metrics.accuracy_row(acc, loss)}
        models = _models([run_dir / "peers" / f"model-{i}-r{r}.pt" for i in range(n) if r in per_peer[i]])
        if r > 0 and models is not None:
            row.update(dl_metrics.consensus_row(exp.evaluator.evaluate, models, exp.cfg.eval.average_model))
        if ledger is not None:      # every node's DP-SGD steps by round r (a dead peer: its last)
            steps = np.zeros(n, dtype=np.int64)
            for i in range(n):
                seen = [k for k in per_peer[i] if k <= r and per_peer[i][k].get("dp_steps")]
                steps[i] = int(per_peer[i][max(seen)]["dp_steps"]) if seen else 0
            row["epsilon"] = ledger.with_steps(steps).epsilon()
        rows.append(row)
    columns = dl_metrics.SYNC_DL_COLUMNS + (["epsilon"] if ledger is not None else [])
    extra = {"spectral_gap": exp.spectral_gap}
    if ledger is not None and rows:
        extra.update(dp_epsilon=rows[-1]["epsilon"], dp_delta=exp.cfg.privacy.dp.delta)
    return columns, rows, extra



# --- MoDeST: one row per aggregated round ----------------------------------------------------------
def _modest(exp: Experiment, run_dir: Path) -> tuple[list[str], Rows, dict[str, Any]]:
    n, algo = exp.num_nodes, exp.algorithm
    peers = [_csv(run_dir / "peers" / f"metrics-{i}.csv") for i in range(n)]
    records = [dict(x, peer=i) for i, rs in enumerate(peers) for x in rs]
    t0 = min((_num(x["wall_time"]) for x in records if x["role"] == "start"), default=0.0)
    by_role: dict[str, dict[int, Rows]] = {}
    for x in records:
        by_role.setdefault(x["role"], {}).setdefault(int(x["round"]), []).append(x)
    aggs, trains = by_role.get("aggregate", {}), by_role.get("train", {})
    sent: dict[int, float] = {}
    timeouts: dict[int, int] = {}
    for role in ("train", "feed"):
        for r, rs in by_role.get(role, {}).items():
            sent[r] = sent.get(r, 0.0) + sum(_num(x["sent"]) for x in rs)
            timeouts[r] = timeouts.get(r, 0) + sum(int(_num(x["timeouts"])) for x in rs)
    init = exp.init_params
    acc, loss = exp.evaluator.evaluate(init.reshape(1, -1) if init.dim() == 1 else init[:1])
    rows: Rows = [{"round": 0, "sim_time_s": 0.0, "bytes_up": 0, "bytes_down": 0,
                   "test_accuracy": float(acc[0]), "test_loss": float(loss[0]), "participants": 0,
                   "aggregators": 0, "timeouts": 0, "view_size": n, **dl_metrics.node_bytes_row(np.zeros(n))}]
    first = None
    for r in sorted(aggs):
        evaluated = [x for x in aggs[r] if x["test_accuracy"] != ""]
        if not evaluated:
            continue
        first = min(evaluated, key=lambda x: int(x["rank"]))
        t = _num(first["wall_time"])
        model_bytes = int(sum(v for k, v in sent.items() if k <= r))
        losses = [_num(x["train_loss"]) for x in trains.get(r, [])]
        rows.append({"round": r, "sim_time_s": t - t0, "bytes_up": model_bytes, "bytes_down": model_bytes,
                     "test_accuracy": _num(first["test_accuracy"]), "test_loss": _num(first["test_loss"]),
                     "train_loss": float(np.mean(losses)) if losses else None,
                     "participants": len(trains.get(r, [])), "aggregators": len(aggs[r]),
                     "timeouts": timeouts.get(r, 0), "view_size": n,
                     **dl_metrics.node_bytes_row(np.array([_bytes_at(rs, t) for rs in peers]))})
    ledger = sample_ledger(exp.cfg, exp.trainer.sizes)
    trains_all = [x for x in records if x["role"] == "train"]
    if ledger is not None:         # every node's DP-SGD steps by each row's round: the steps a
        for row in rows:           # train record holds, taken when its round's training ended
            steps = np.zeros(n, dtype=np.int64)
            for x in trains_all:
                if int(x["round"]) <= row["round"] and x.get("dp_steps"):
                    steps[x["peer"]] = max(steps[x["peer"]], int(x["dp_steps"]))
            row["epsilon"] = ledger.with_steps(steps).epsilon()
    rounds = max(aggs, default=0)
    if first is not None and int(first["round"]) == rounds:
        models = _models([run_dir / "peers" / f"model-{first['peer']}-r{rounds}.pt"])
        if models is not None:
            _save_model(exp, models[0], run_dir / "model.pt")
    final = [_bytes_at(rs, float("inf")) for rs in peers]
    ends = [rs[-1] for rs in peers if rs]
    extra = {"rounds": rounds, "stopped_by": "rounds" if rounds >= exp.cfg.stop.rounds else "stalled",
             "bytes_sent_total": int(sum(_num(x["bytes_up"]) for x in ends)),
             "bytes_received_total": int(sum(_num(x["bytes_down"]) for x in ends)),
             "model_bytes_total": rows[-1]["bytes_up"],
             "wall_time_s": max((_num(x["wall_time"]) for x in records), default=t0) - t0,
             "sample_size": algo.sample_size, "aggregators": algo.aggregators, "quorum": algo.quorum(),
             "timeouts_total": int(sum(timeouts.values())),
             "mean_bytes_per_node": float(np.mean(final)) if final else 0.0,
             "max_bytes_per_node": int(max(final, default=0))}
    if ledger is not None and rows:
        extra.update(dp_epsilon=rows[-1]["epsilon"], dp_delta=exp.cfg.privacy.dp.delta)
    return dl_metrics.MODEST_COLUMNS + (["epsilon"] if ledger is not None else []), rows, extra


def _bytes_at(rows: Rows, t: float) -> float:
    """A peer's bytes sent plus received by its last row written at or before ``t``."""
    before = [x for x in rows if _num(x["wall_time"]) <= t]
    return _num(before[-1]["bytes_up"]) + _num(before[-1]["bytes_down"]) if before else 0.0


# --- random walks: one row per evaluated hop -------------------------------------------------------
def read_visits(run_dir: Path, num_nodes: int) -> dict[int, dict[int, dict[str, Any]]]:
    """token -> hop -> visit record, from every peer's log (a dead peer's log may be absent)."""
    out: dict[int, dict[int, dict[str, Any]]] = {}
    for i in range(num_nodes):
        path = Path(run_dir) / "peers" / f"visits-{i}.jsonl"
        for line in path.read_text().splitlines() if path.exists() else []:
            if line.strip():
                rec = json.loads(line)
                out.setdefault(int(rec["token"]), {})[int(rec["round"])] = rec
    return out


def token_paths(visits: dict[int, dict[int, dict[str, Any]]]) -> dict[int, list[int]]:
    """Each token's positions: its start, then where it was after each hop (up to the last
    hop on record)."""
    paths = {}
    for t, hops in sorted(visits.items()):
        last = max(hops)
        path = [int(hops[r]["node"]) for r in range(1, last + 1) if r in hops]
        paths[t] = [int(hops[0]["node"])] if last == 0 else path + [int(hops[last]["next"])]
    return paths


def _walk(exp: Experiment, run_dir: Path) -> tuple[list[str], Rows, dict[str, Any]]:
    algo, n, tokens, rounds = exp.algorithm, exp.num_nodes, exp.algorithm.num_tokens, exp.cfg.stop.rounds
    mu = algo.target(exp.topology.degrees())
    visits = read_visits(run_dir, n)
    counts = np.zeros((tokens, n), dtype=np.int64)
    ledger, dp_steps = sample_ledger(exp.cfg, exp.trainer.sizes), np.zeros(n, dtype=np.int64)
    rows, added = [], 0
    for r in sorted({r for hops in visits.values() for r, rec in hops.items() if "acc" in rec}):
        for t, hops in visits.items():              # visits up to hop r, per token
            for h in range(added + 1, r + 1):
                if h in hops:
                    counts[t, int(hops[h]["node"])] += 1
                    dp_steps[int(hops[h]["node"])] += int(hops[h].get("steps", 0))   # its visit's training
        added = r
        have = [t for t in sorted(visits) if "acc" in visits[t].get(r, {})]
        nbytes = sum(int(rec["bytes"]) for t in visits for h, rec in visits[t].items() if 1 <= h <= r)
        acc = torch.tensor([visits[t][r]["acc"] for t in have], dtype=torch.float32)
        loss = torch.tensor([visits[t][r]["loss"] for t in have], dtype=torch.float32)
        row = {"round": r, "sim_time_s": max(float(visits[t][r]["time"]) for t in have),
               "bytes_up": nbytes, "bytes_down": nbytes, **dl_metrics.accuracy_row(acc, loss, median=False)}
        if r > 0:
            losses = [visits[t][r]["train_loss"] for t in have if visits[t][r]["steps"] > 0]
            row["train_loss"] = float(torch.tensor(losses, dtype=torch.float32).mean()) if losses else None
        models = _models([run_dir / "peers" / f"token-{t}-r{r}.pt" for t in have])
        if exp.cfg.eval.average_model and models is not None:
            row.update(dl_metrics.average_model_row(exp.evaluator.evaluate, models.mean(0, keepdim=True)))
        if ledger is not None:                     # every node's DP-SGD steps by hop r
            row["epsilon"] = ledger.with_steps(dp_steps).epsilon()
        rows.append({**row, **dl_metrics.visit_row(counts, mu)})
    paths = token_paths(visits)
    records = [rec for hops in visits.values() for h, rec in hops.items() if h >= 1]
    final = _models([run_dir / "peers" / f"token-{t}-r{rounds}.pt" for t in range(tokens)])
    if final is not None:
        _save_model(exp, final.mean(0), run_dir / "model.pt")
    done = min(len(paths.get(t, [None])) - 1 for t in range(tokens))
    extra = {"stopped_by": "rounds" if done >= rounds else "incomplete",
             "bytes_received_total": rows[-1]["bytes_down"] if rows else 0,
             "node_steps": sum(int(rec.get("steps", 0)) for rec in records),
             "walk": algo.walk, "num_tokens": tokens,
             "hop_bytes": max((int(rec["bytes"]) for rec in records), default=0),
             "visits_per_node": counts.sum(axis=0).tolist(),
             "reroutes": sum(len(rec.get("failed", [])) for rec in records),
             "paths": {str(t): p for t, p in paths.items()}}
    if ledger is not None and rows:
        extra.update(dp_epsilon=rows[-1]["epsilon"], dp_delta=exp.cfg.privacy.dp.delta)
    return dl_metrics.WALK_COLUMNS + (["epsilon"] if ledger is not None else []), rows, extra
