"""The run's ``metrics.csv`` and ``summary.json`` from MoDeST peers' ``peers/metrics-<id>.csv``.

Per evaluated round ``r`` the row has the simulator's MoDeST columns: the test accuracy and
loss of the first aggregator's model (the lowest in round ``r + 1``'s ranking, as the
simulator evaluates ``aggregates[0]``); the mean train loss and number of the round's trainers;
its aggregators; the timeouts (skipped candidates) of the round's feeds and uploads; model
bytes of every message of rounds ``<= r`` (each counted once as sent and once as received, as
the simulator counts them; DONE notices are left out); ``sim_time_s`` the wall seconds from
the first peer's start to that aggregate; ``bytes_per_node_*`` each peer's own counters
(sent plus received, everything) at that moment.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from gossamer.config import ExperimentConfig
from gossamer.metrics.runstore import MetricsWriter, load_checkpoint, save_checkpoint, write_json


def _read(run_dir: Path, n: int) -> list[list[dict[str, str]]]:
    out = []
    for i in range(n):
        path = run_dir / "peers" / f"metrics-{i}.csv"
        if not path.exists():
            out.append([])
            continue
        with path.open() as f:
            out.append(list(csv.DictReader(f)))
    return out


def _num(value: str, default: float = 0.0) -> float:
    return float(value) if value not in ("", None) else default


def merge_modest_metrics(cfg: ExperimentConfig, run_dir: Path,
                         killed: list[int] | None = None) -> dict[str, Any]:
    from gossamer.experiment import build as build_experiment
    from gossamer.sim.drivers.modest import ModestDriver

    exp = build_experiment(cfg, population=False)
    n, algo = exp.num_nodes, exp.algorithm
    peers = _read(run_dir, n)
    rows = [dict(row, peer=i) for i, rs in enumerate(peers) for row in rs]
    starts = [_num(r["wall_time"]) for r in rows if r["role"] == "start"]
    t0 = min(starts, default=0.0)
    by_role: dict[str, dict[int, list[dict]]] = {}
    for row in rows:
        by_role.setdefault(row["role"], {}).setdefault(int(row["round"]), []).append(row)
    aggs, trains = by_role.get("aggregate", {}), by_role.get("train", {})
    sent_by_round: dict[int, float] = {}
    for role in ("train", "feed"):
        for r, rs in by_role.get(role, {}).items():
            sent_by_round[r] = sent_by_round.get(r, 0.0) + sum(_num(x["sent"]) for x in rs)
    timeouts = {r: sum(int(_num(x["timeouts"])) for x in rs) for r, rs in trains.items()}
    for r, rs in by_role.get("feed", {}).items():
        timeouts[r] = timeouts.get(r, 0) + sum(int(_num(x["timeouts"])) for x in rs)

    writer = MetricsWriter(run_dir / "metrics.csv", ModestDriver.columns)
    (run_dir / "metrics.csv").unlink(missing_ok=True)
    init = exp.init_params
    acc, loss = exp.evaluator.evaluate(init.reshape(1, -1) if init.dim() == 1 else init[:1])
    writer.append({"round": 0, "sim_time_s": 0.0, "bytes_up": 0, "bytes_down": 0,
                   "test_accuracy": float(acc[0]), "test_loss": float(loss[0]), "participants": 0,
                   "aggregators": 0, "timeouts": 0, "view_size": n, "bytes_per_node_mean": 0.0,
                   "bytes_per_node_max": 0})
    last: dict[str, Any] = {"round": 0, "test_accuracy": float(acc[0]), "test_loss": float(loss[0])}
    first_of: dict[int, dict] = {}
    for r in sorted(aggs):
        evaluated = [x for x in aggs[r] if x["test_accuracy"] != ""]
        if not evaluated:
            continue
        first = first_of[r] = min(evaluated, key=lambda x: int(x["rank"]))
        t = _num(first["wall_time"])
        per_node = np.array([_bytes_at(rs, t) for rs in peers], dtype=np.float64)
        model_bytes = int(sum(v for k, v in sent_by_round.items() if k <= r))
        losses = [_num(x["train_loss"]) for x in trains.get(r, [])]
        last = {"round": r, "sim_time_s": t - t0, "bytes_up": model_bytes, "bytes_down": model_bytes,
                "test_accuracy": _num(first["test_accuracy"]), "test_loss": _num(first["test_loss"]),
                "train_loss": float(np.mean(losses)) if losses else None,
                "participants": len(trains.get(r, [])), "aggregators": len(aggs[r]),
                "timeouts": timeouts.get(r, 0), "view_size": n,
                "bytes_per_node_mean": float(per_node.mean()), "bytes_per_node_max": int(per_node.max())}
        writer.append(last)
    final = [_bytes_at(rs, float("inf")) for rs in peers]
    ends = [_num(x["wall_time"]) for x in rows]
    rounds = max(aggs, default=0)
    if rounds in first_of:
        _save_model(exp, run_dir / "peers" / f"model-{first_of[rounds]['peer']}-r{rounds}.pt",
                    run_dir / "model.pt")
    summary = {"name": cfg.name, "algorithm": cfg.algorithm.name, "executor": "runtime",
               "num_nodes": n, "num_params": exp.spec.numel, "rounds": rounds,
               "stopped_by": "rounds" if rounds >= cfg.stop.rounds else "stalled",
               "final_test_accuracy": last.get("test_accuracy"), "final_test_loss": last.get("test_loss"),
               "bytes_sent_total": int(sum(_num(x["bytes_up"]) for x in _finals(peers))),
               "bytes_received_total": int(sum(_num(x["bytes_down"]) for x in _finals(peers))),
               "model_bytes_total": last.get("bytes_up", 0),
               "sim_time_s": last.get("sim_time_s"), "wall_time_s": max(ends, default=t0) - t0,
               "sample_size": algo.sample_size, "aggregators": algo.aggregators,
               "quorum": algo.quorum(), "timeouts_total": int(sum(timeouts.values())),
               "mean_bytes_per_node": float(np.mean(final)) if final else 0.0,
               "max_bytes_per_node": int(max(final, default=0)),
               "failed_peers": sorted(killed or [])}
    write_json(run_dir / "summary.json", summary)
    return summary


def _bytes_at(rows: list[dict[str, str]], t: float) -> float:
    """A peer's bytes sent plus received by its last row written at or before ``t``."""
    before = [x for x in rows if _num(x["wall_time"]) <= t]
    return _num(before[-1]["bytes_up"]) + _num(before[-1]["bytes_down"]) if before else 0.0


def _finals(peers: list[list[dict[str, str]]]) -> list[dict[str, str]]:
    return [rs[-1] for rs in peers if rs]


def _save_model(exp: Any, source: Path, target: Path) -> None:
    """The run's ``model.pt`` (a state dict, as the simulator writes) from a peer's saved row."""
    if not source.exists():
        return
    exp.spec.load_into(exp.model, load_checkpoint(source)["params"])
    save_checkpoint(target, {k: v.detach().clone() for k, v in exp.model.state_dict().items()},
                    keep_previous=False)
