"""Contribution scores of FL clients, from the uploads the server already holds.

Each scored round the server has the delivered clients' models ``x_i`` (``[K, P]``), their
aggregation weights ``w_i`` (summing to 1) and the round's start model ``x_0``. A coalition
``S`` of clients is worth ``U(S)``: the utility (minus the validation loss, or the validation
accuracy) of its model, by default (``coalition: partial``) the round's aggregate with only
``S``'s updates in it, ``x_0 + sum_{i in S} w_i (x_i - x_0)``, or (``coalition: mean``) the
weighted mean of its models, ``sum_{i in S} w_i x_i / sum_{i in S} w_i``, as if only ``S`` had
taken part; the empty coalition keeps the start model. Methods (``contribution.methods``):

- ``loo`` (leave one out): ``U(all) - U(all \\ {i})``; ``K + 1`` evaluations.
- ``cosine`` (gradient similarity): the cosine of the client's update ``x_i - x_0`` with the
  update of the others' mean; no evaluation. Free-riders (no update) score about 0, clients
  pulling against the others below 0.
- ``shapley``: truncated Monte Carlo Shapley values (Ghorbani and Zou, "Data Shapley: Equitable
  Valuation of Data for Machine Learning", ICML 2019, arXiv:1904.02868): over ``permutations``
  random orders, a client's marginal gain ``U(prefix + i) - U(prefix)``, averaged. With
  ``truncation`` t > 0 an order stops once its prefix is within ``t |U(all) - U(empty)|`` of
  ``U(all)`` (the remaining clients get 0 in it) and those prefixes are never evaluated.

Models are evaluated in batches (``evaluate``: stacked models ``[M, P]`` to utilities ``[M]``).
Orders come from the counter-based stream ``(seed, STREAM_CONTRIB, round)``, so scores are
reproducible and equal across executors. Per client the scores are summed over the rounds it
took part in; :meth:`Contribution.table` gives each client's mean per participation.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from gossamer import rng

METHODS = ("loo", "cosine", "shapley")


def coalition_models(rows: torch.Tensor, weights: torch.Tensor, members: torch.Tensor,
                     start: torch.Tensor | None = None) -> torch.Tensor:
    """The models ``[M, P]`` of the coalitions ``members`` ``[M, K]`` (bool) of ``rows``:
    their weighted mean (``start`` None), or with ``start`` the partial aggregate ``start +
    sum_{i in S} w_i (x_i - start)`` (weights summing to 1 over everyone)."""
    w = members.to(rows.dtype) * weights[None, :]
    if start is not None:
        return start[None, :] + w @ (rows - start[None, :])
    return (w @ rows) / w.sum(1, keepdim=True)


def leave_one_out(rows: torch.Tensor, weights: torch.Tensor, start: torch.Tensor,
                  evaluate: Callable[[torch.Tensor], torch.Tensor], partial: bool = True) -> torch.Tensor:
    """``U(all) - U(all without i)`` for each of the ``K`` rows (``U(start)`` for a lone one)."""
    k = len(rows)
    full = weights @ rows
    if k == 1:
        utilities = evaluate(torch.stack([full, start]))
        return utilities[:1] - utilities[1:]
    if partial:
        others = full[None, :] - weights[:, None] * (rows - start[None, :])
    else:
        others = (full[None, :] - weights[:, None] * rows) / (1 - weights)[:, None]
    utilities = evaluate(torch.cat([full[None, :], others]))
    return utilities[0] - utilities[1:]


def cosine_to_others(rows: torch.Tensor, weights: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """Cosine of each update ``x_i - start`` with the update of the others' weighted mean
    (0 where either is zero or the client is alone)."""
    k = len(rows)
    if k == 1:
        return torch.zeros(1, device=rows.device)
    full = weights @ rows
    others = (full[None, :] - weights[:, None] * rows) / (1 - weights)[:, None] - start
    own = rows - start
    den = own.norm(dim=1) * others.norm(dim=1)
    dot = (own * others).sum(1)
    return torch.where(den > 0, dot / den.clamp_min(1e-30), torch.zeros_like(dot))


def monte_carlo_shapley(rows: torch.Tensor, weights: torch.Tensor, start: torch.Tensor,
                        evaluate: Callable[[torch.Tensor], torch.Tensor], orders: np.ndarray,
                        truncation: float = 0.0, block: int = 8, partial: bool = True
                        ) -> tuple[torch.Tensor, int]:
    """Truncated Monte Carlo Shapley values ``[K]`` over ``orders`` ``[M, K]`` (permutations
    of ``0..K-1``) and the number of coalitions evaluated."""
    k, m = len(rows), len(orders)
    ends = evaluate(torch.stack([weights @ rows, start]))
    full, empty = float(ends[0]), float(ends[1])
    tolerance = truncation * abs(full - empty)
    values = torch.zeros(k, dtype=torch.float64, device=rows.device)
    previous = torch.full((m,), empty, dtype=torch.float64, device=rows.device)
    alive = np.ones(m, dtype=bool)
    order_t = torch.from_numpy(orders).to(rows.device)
    ranks = torch.from_numpy(np.argsort(orders, axis=1)).to(rows.device)       # ranks[o, c]: c's position in order o
    evaluated = 2
    for p0 in range(0, k, block):
        live = np.flatnonzero(alive)
        if len(live) == 0:
            break
        positions = range(p0, min(k, p0 + block))
        # coalition j of live order o: its first p + 1 clients
        members = ranks[live][:, None, :] <= torch.tensor(list(positions), device=ranks.device)[None, :, None]
        utilities = evaluate(coalition_models(rows, weights, members.reshape(-1, k),
                                              start if partial else None))
        utilities = utilities.double().reshape(len(live), len(positions))
        evaluated += utilities.numel()
        for j, p in enumerate(positions):
            now = utilities[:, j]
            gain = now - previous[live]
            still = torch.from_numpy(alive[live])
            values.index_add_(0, order_t[live, p], torch.where(still, gain, torch.zeros_like(gain)))
            previous[live] = torch.where(still, now, previous[live])
            if truncation > 0:
                done = (now - full).abs() <= tolerance
                alive[live[done.cpu().numpy()]] = False
    return (values / m).float(), evaluated


class Contribution:
    """Scores clients round by round and keeps their totals over the run."""

    def __init__(self, methods: Sequence[str], num_nodes: int, seed: int,
                 evaluate: Callable[[torch.Tensor], torch.Tensor], permutations: int = 10,
                 truncation: float = 0.0, coalition: str = "partial", evaluator: Any = None) -> None:
        unknown = set(methods) - set(METHODS)
        if unknown:
            raise ValueError(f"unknown contribution methods {sorted(unknown)}; known: {', '.join(METHODS)}")
        self.methods = tuple(methods)
        self.seed, self.evaluate = seed, evaluate
        self.evaluator = evaluator          # the BatchedEvaluator behind ``evaluate``, if any
        if coalition not in ("partial", "mean"):
            raise ValueError(f"coalition must be partial or mean, got {coalition!r}")
        self.permutations, self.truncation = permutations, truncation
        self.partial = coalition == "partial"
        self.totals = {name: np.zeros(num_nodes) for name in self.methods}
        self.counts = np.zeros(num_nodes, dtype=np.int64)
        self.rounds, self.seconds, self.evaluations = 0, 0.0, 0

    def place(self, device: torch.device, autocast: torch.dtype | None = None) -> None:
        """Score on ``device``: the validation rows of the evaluator behind ``evaluate`` move."""
        if self.evaluator is not None:
            self.evaluator.place(device, autocast)

    def observe(self, round_: int, clients: np.ndarray, rows: torch.Tensor, weights: torch.Tensor,
                start: torch.Tensor) -> dict[str, torch.Tensor]:
        """Score one round's delivered ``clients`` from their ``rows`` and weights; returns the
        round's scores per method."""
        began = time.perf_counter()
        weights = (weights / weights.sum()).to(rows.dtype)
        scores: dict[str, torch.Tensor] = {}
        if "loo" in self.methods:
            scores["loo"] = leave_one_out(rows, weights, start, self.evaluate, self.partial)
            self.evaluations += len(rows) + 1
        if "cosine" in self.methods:
            scores["cosine"] = cosine_to_others(rows, weights, start)
        if "shapley" in self.methods:
            gen = rng.generator(self.seed, rng.STREAM_CONTRIB, round_)
            orders = np.stack([gen.permutation(len(rows)) for _ in range(self.permutations)])
            scores["shapley"], used = monte_carlo_shapley(rows, weights, start, self.evaluate,
                                                          orders, self.truncation, partial=self.partial)
            self.evaluations += used
        for name, value in scores.items():
            np.add.at(self.totals[name], clients, value.double().cpu().numpy())
        np.add.at(self.counts, clients, 1)
        self.rounds += 1
        self.seconds += time.perf_counter() - began
        return scores

    def means(self) -> dict[str, np.ndarray]:
        """Each client's mean score per round it was scored in (NaN if never)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return {name: np.where(self.counts > 0, total / np.maximum(self.counts, 1), np.nan)
                    for name, total in self.totals.items()}

    def table(self, flagged: np.ndarray | None = None) -> str:
        """``contributions.csv``: one row per client (id, rounds scored, flagged, scores)."""
        means = self.means()
        lines = ["client,rounds,flagged," + ",".join(self.methods)]
        for i in range(len(self.counts)):
            flag = int(flagged[i]) if flagged is not None else 0
            values = ",".join("" if np.isnan(means[n][i]) else f"{means[n][i]:.8g}" for n in self.methods)
            lines.append(f"{i},{int(self.counts[i])},{flag},{values}")
        return "\n".join(lines) + "\n"

    def summary(self, flagged: np.ndarray | None = None,
                groups: dict[str, np.ndarray] | None = None) -> dict:
        """What ``summary.json`` reports: cost, and with flagged clients (the adversary's) the
        AUC of each method ranking them below the others; with ``groups`` (attack name ->
        its clients) also each group's AUC against the unflagged clients."""
        out = {"methods": list(self.methods), "rounds_scored": self.rounds,
               "seconds_per_round": self.seconds / max(1, self.rounds),
               "evaluations_per_round": self.evaluations / max(1, self.rounds),
               "file": "contributions.csv"}
        if flagged is not None and flagged.any():
            scored = self.counts > 0
            means = self.means()
            out["auc_flagged_below_others"] = {
                name: auc(values[scored & ~flagged], values[scored & flagged])
                for name, values in means.items()}
            if groups:
                out["auc_by_attack"] = {
                    attack: {name: auc(values[scored & ~flagged], values[scored & mask])
                             for name, values in means.items()}
                    for attack, mask in groups.items()}
        return out

    def state_dict(self) -> dict:
        return {"totals": {k: torch.from_numpy(v.copy()) for k, v in self.totals.items()},
                "counts": torch.from_numpy(self.counts.copy()), "rounds": self.rounds,
                "seconds": self.seconds, "evaluations": self.evaluations}

    def load_state_dict(self, state: dict) -> None:
        self.totals = {k: v.numpy().copy() for k, v in state["totals"].items()}
        self.counts = state["counts"].numpy().copy()
        self.rounds, self.seconds = int(state["rounds"]), float(state["seconds"])
        self.evaluations = int(state["evaluations"])


def auc(higher: np.ndarray, lower: np.ndarray) -> float | None:
    """P(a score of ``higher`` > a score of ``lower``), ties counted half; None if either is
    empty (the Mann-Whitney statistic over all pairs)."""
    if len(higher) == 0 or len(lower) == 0:
        return None
    diff = higher[:, None] - lower[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)
