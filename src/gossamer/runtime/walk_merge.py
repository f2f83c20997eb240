"""Merge walk peers' visit logs into the simulator's random-walk ``metrics.csv`` and a summary.

Every peer appends one JSON line per visit to ``peers/visits-<id>.jsonl`` (the token's hop
``round``, the ``node`` it trained at, the ``next`` node it went to, the ``bytes`` delivered,
wall seconds, and at evaluation hops its test accuracy and loss; hop 0 is the start). Rows
follow :class:`~gossamer.sim.drivers.random_walk.RandomWalkDriver`'s columns: a row for hop
``r`` holds the tokens' models after ``r`` hops, whenever each token got there (tokens walk
at their own pace on real processes); ``sim_time_s`` is the wall time at which the last token
finished hop ``r``; the visit statistics are computed from the paths exactly as the simulator
does. ``online``, ``token_skips``, ``tokens_waiting`` and ``lost_messages`` describe the
simulated availability and faults and stay empty.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gossamer.algorithms.dl.random_walk import total_variation
from gossamer.config import ExperimentConfig
from gossamer.experiment import Experiment
from gossamer.experiment import build as build_experiment
from gossamer.metrics.runstore import MetricsWriter, load_checkpoint, save_checkpoint, write_json


def read_visits(run_dir: Path, num_nodes: int) -> dict[int, dict[int, dict[str, Any]]]:
    """token -> hop -> visit record, from every peer's log (a dead peer's log may be absent)."""
    out: dict[int, dict[int, dict[str, Any]]] = {}
    for i in range(num_nodes):
        path = Path(run_dir) / "peers" / f"visits-{i}.jsonl"
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
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


def _row(exp: Experiment, run_dir: Path, visits: dict, r: int, counts: np.ndarray,
         mu: np.ndarray) -> dict[str, Any]:
    have = [t for t in sorted(visits) if "acc" in visits[t].get(r, {})]
    done = [rec for t in visits for h, rec in visits[t].items() if 1 <= h <= r]
    acc = torch.tensor([visits[t][r]["acc"] for t in have], dtype=torch.float32)
    loss = torch.tensor([visits[t][r]["loss"] for t in have], dtype=torch.float32)
    nbytes = sum(int(rec["bytes"]) for rec in done)
    row: dict[str, Any] = {
        "round": r, "sim_time_s": max(float(visits[t][r]["time"]) for t in have),
        "bytes_up": nbytes, "bytes_down": nbytes,
        "test_accuracy": float(acc.mean()), "test_loss": float(loss.mean()),
        "acc_min": float(acc.min()), "acc_max": float(acc.max())}
    if r > 0:
        losses = [visits[t][r]["train_loss"] for t in have if visits[t][r]["steps"] > 0]
        row["train_loss"] = float(torch.tensor(losses, dtype=torch.float32).mean()) if losses else None
    files = [run_dir / "peers" / f"token-{t}-r{r}.pt" for t in have]
    if exp.cfg.eval.average_model and all(f.exists() for f in files):
        models = torch.stack([load_checkpoint(f)["params"] for f in files])
        avg_acc, avg_loss = exp.evaluator.evaluate(models.mean(0, keepdim=True))
        row.update(avg_model_accuracy=float(avg_acc[0]), avg_model_loss=float(avg_loss[0]))
    per_token = counts.sum(axis=1)
    total = int(per_token.sum())
    row["visits"] = total
    if total:
        row["visit_tv"] = float(total_variation(counts.sum(axis=0) / total, mu))
        seen = per_token > 0
        row["visit_tv_token"] = float(total_variation(counts[seen] / per_token[seen, None], mu).mean())
    return row


def merge_walk_metrics(cfg: ExperimentConfig, run_dir: Path,
                       killed: list[int] | None = None) -> dict[str, Any]:
    """Write ``metrics.csv`` (the random-walk driver's columns), ``summary.json`` and
    ``model.pt`` (the mean of the tokens' final models) from the peers' visit logs."""
    from gossamer.sim.drivers.random_walk import RandomWalkDriver

    run_dir = Path(run_dir)
    exp = build_experiment(cfg, population=False)
    algo, n, tokens = exp.algorithm, exp.num_nodes, exp.algorithm.num_tokens
    mu = algo.target(exp.topology.degrees())
    visits = read_visits(run_dir, n)
    (run_dir / "metrics.csv").unlink(missing_ok=True)
    writer = MetricsWriter(run_dir / "metrics.csv", RandomWalkDriver.columns)
    evaluated = sorted({r for hops in visits.values() for r, rec in hops.items() if "acc" in rec})
    counts = np.zeros((tokens, n), dtype=np.int64)
    added = 0
    row: dict[str, Any] = {}
    for r in evaluated:
        for t, hops in visits.items():              # visits up to hop r, per token
            for h in range(added + 1, r + 1):
                if h in hops:
                    counts[t, int(hops[h]["node"])] += 1
        added = r
        row = _row(exp, run_dir, visits, r, counts, mu)
        writer.append(row)
    paths = token_paths(visits)
    hops_done = [len(paths.get(t, [None])) - 1 for t in range(tokens)]
    records = [rec for hops in visits.values() for h, rec in hops.items() if h >= 1]
    sent = [int(rec["bytes"]) for rec in records if int(rec["bytes"]) > 0]
    final = [run_dir / "peers" / f"token-{t}-r{cfg.stop.rounds}.pt" for t in range(tokens)]
    if all(f.exists() for f in final):
        params = torch.stack([load_checkpoint(f)["params"] for f in final]).mean(0)
        exp.spec.load_into(exp.model, params)
        save_checkpoint(run_dir / "model.pt",
                        {k: v.detach().clone() for k, v in exp.model.state_dict().items()},
                        keep_previous=False)
    summary = {"name": cfg.name, "algorithm": cfg.algorithm.name, "executor": "runtime",
               "num_nodes": n, "num_params": exp.spec.numel, "rounds": row.get("round", 0),
               "stopped_by": "rounds" if min(hops_done) >= cfg.stop.rounds else "incomplete",
               "final_test_accuracy": row.get("test_accuracy"),
               "final_test_loss": row.get("test_loss"),
               "bytes_sent_total": row.get("bytes_up", 0),
               "bytes_received_total": row.get("bytes_down", 0),
               "sim_time_s": row.get("sim_time_s"), "wall_time_s": row.get("sim_time_s"),
               "node_steps": sum(int(rec.get("steps", 0)) for rec in records),
               "walk": algo.walk, "num_tokens": tokens,
               "hop_bytes": max(sent, default=0), "visits_per_node": counts.sum(axis=0).tolist(),
               "reroutes": sum(len(rec.get("failed", [])) for rec in records),
               "paths": {str(t): p for t, p in paths.items()},
               "failed_peers": sorted(killed or [])}
    write_json(run_dir / "summary.json", summary)
    return summary
