"""The epsilon a run will spend, planned before it starts, and the noise that plans a target.

:func:`planned` is what ``gossamer validate`` prints (``estimate.privacy_lines``);
:func:`calibrate` gives a config with ``privacy.dp.target_epsilon`` the smallest noise
multiplier whose plan spends at most that epsilon (what opacus' ``make_private_with_epsilon``
does for DP-SGD, here for every plan that bounds the run from above). The experiment builder
calls it, so every executor (the simulator, ranks, every real process) runs the same noise.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

from gossamer.config import ConfigError


@dataclass(frozen=True)
class Plan:
    """``epsilon`` at ``delta`` after ``stop.rounds``; ``bound``: ``exact`` (the run's last row,
    under the condition ``words`` names), ``upper`` or ``lower`` (the run spends at most, at least)."""

    epsilon: float
    bound: str
    words: str


def planned(cfg, algorithm, z: float, sizes: np.ndarray | None, schedule=None,
            population: int | None = None) -> Plan | None:
    """The plan of Gaussian DP with noise multiplier ``z``: ``sizes`` are the shards' sample
    counts and ``schedule`` the local schedule (a materialized population), or ``population``
    the registered client count. None where only the run knows (sample-level DP outside
    synchronous patterns, or with a registered population).

    Client level, synchronous (DP-FedAvg): ``stop.rounds`` rounds at the sampling rate of a
    round whose candidates are every client with data: the run's own when every client is
    available every round (fewer candidates raise the rate). DP-FedBuff: a lower bound, since
    its exposure follows the schedule: ``stop.rounds`` buffers of K updates put some client in
    at least ``ceil(rounds K / N)`` of them. Sample level (DP-SGD): every node with data trains
    its schedule's steps every round, through the same ledger a run keeps: the run's own in
    synchronous DL when every node is available, an upper bound in synchronous FL, where a
    client trains only when selected."""
    from gossamer.privacy.accounting import DPLedger, epsilon

    dp, rounds = cfg.privacy.dp, cfg.stop.rounds
    if dp.level == "sample":
        if population is not None or algorithm.pattern not in ("sync_fl", "sync_dl", "gradient_tracking", "choco"):
            return None
        from gossamer.training.trainer import local_steps

        sizes = np.asarray(sizes)
        ledger = DPLedger("sample", z, dp.delta, dp.accountant, sizes, cfg.local.batch_size)   # the run's own
        ledger.sample_steps(np.arange(len(sizes)), local_steps(schedule, sizes) * rounds)
        if algorithm.pattern == "sync_fl":
            return Plan(ledger.epsilon(), "upper", "sample level; a client that trains every round")
        return Plan(ledger.epsilon(), "exact", "sample level; every node trains every round")
    holders = population if population is not None else int((np.asarray(sizes) > 0).sum())
    if algorithm.pattern == "async_fl":
        least = math.ceil(rounds * algorithm.due(0) / max(holders, 1))
        return Plan(epsilon([(z, 1.0, least)], dp.delta, dp.accountant), "lower",
                    f"DP-FedBuff: some client is in at least {least} of the buffers; no sampling "
                    "amplification; the run reports the most exposed client's")
    if population is not None:          # a registered population: nothing of length N
        selected = algorithm.expected_clients(holders)
    else:                               # a round's selection (the driver's and the coordinator's)
        from gossamer.protocols.sync_fl import SyncRound

        selected = len(SyncRound(algorithm, cfg.seed, 1, np.arange(holders)).selected)
    q = min(1.0, selected / max(holders, 1))
    return Plan(epsilon([(z, q, rounds)], dp.delta, dp.accountant), "exact",
                f"client level, {selected} of {holders} clients a round; fewer available clients raise it")


def calibrate(cfg, algorithm, sizes: np.ndarray | None, schedule=None, population: int | None = None):
    """``cfg`` with ``privacy.dp.noise_multiplier`` set to the smallest noise (to 0.1%) whose
    plan spends at most ``privacy.dp.target_epsilon``; ``cfg`` itself without a target. Refused
    in one line where the plan does not bound the run from above: DP-FedBuff (its exposure
    follows the schedule), sample-level DP outside synchronous patterns. The plan assumes every
    client is available every round: an availability model or faults that leave fewer
    candidates raise the rate, so synchronous client-level DP refuses them with a target."""
    dp = cfg.privacy.dp
    if dp is None or dp.target_epsilon is None:
        return cfg
    field = "privacy.dp.target_epsilon"
    if dp.level == "client" and algorithm.pattern == "sync_fl" and (
            cfg.system.availability.model != "always" or cfg.faults.configured):
        raise ConfigError(field, "the noise is planned for every client available every round; an "
                          "availability model or faults leave fewer candidates, which raises epsilon "
                          "above the target: give noise_multiplier instead")

    def plan(z: float) -> Plan:
        p = planned(cfg, algorithm, z, sizes, schedule, population)
        if p is None or p.bound == "lower":
            what = ("DP-FedBuff's epsilon follows the schedule" if p is not None else
                    "sample-level DP-SGD's epsilon in a registered population follows the run's cohorts"
                    if population is not None else
                    f"sample-level DP-SGD's epsilon in {algorithm.pattern} follows the run's schedule")
            raise ConfigError(field, f"{what}, so no noise can be planned for a target: give "
                              "noise_multiplier instead (gossamer validate prints what it plans)")
        return p

    with warnings.catch_warnings():    # (opacus on the search's small noises: "optimal order is
        warnings.simplefilter("ignore")    # the smallest alpha", a bound looser than needed there)
        return _with_noise(cfg, _search(plan, dp.target_epsilon, field))


def _search(plan, target: float, field: str) -> float:
    """The smallest noise (to 0.1%) whose ``plan`` spends at most ``target``."""
    spent = plan(1.0).epsilon
    if spent == 0.0:                   # nothing is spent (no rounds, or no data)
        return 1.0
    lo, hi = 1.0, 1.0
    while spent > target:              # epsilon falls as the noise grows
        lo, hi = hi, hi * 2
        if hi > 1e6:
            raise ConfigError(field, f"{target:g} needs a noise multiplier above 1e6")
        spent = plan(hi).epsilon
    if lo == hi:
        while lo > 1e-3 and plan(lo).epsilon <= target:
            hi, lo = lo, lo / 2
    while hi / lo > 1.001:             # plan(lo) spends more than the target, plan(hi) at most it
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if plan(mid).epsilon <= target else (mid, hi)
    return hi


def _with_noise(cfg, z: float):
    dp = cfg.privacy.dp.model_copy(update={"noise_multiplier": z})
    return cfg.model_copy(update={"privacy": cfg.privacy.model_copy(update={"dp": dp})})


def calibrated(cfg) -> dict[str, float]:
    """summary.json's record of the noise a target planned (``dp_noise_multiplier``), if any."""
    dp = cfg.privacy.dp
    return {} if dp is None or dp.target_epsilon is None else {"dp_noise_multiplier": dp.noise_multiplier}
