"""Privacy accounting with opacus' accountants (RDP: Mironov 2017, arXiv:1702.07476; or PRV).

Both account the Poisson-subsampled Gaussian mechanism. Gossamer samples clients (client
level) and batches (sample level) with a fixed size instead; like opacus' own DP-SGD, the
sampling rate ``q`` is accounted as if it were Poisson's.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch


def epsilon(history: Sequence[tuple[float, float, int]], delta: float, accountant: str = "rdp") -> float:
    """Epsilon at ``delta`` after ``history``: ``(noise_multiplier, sample_rate, steps)`` entries
    composed, computed by opacus (``rdp``: ``RDPAccountant``'s arithmetic, each rate's
    per-step RDP curve computed once per process; ``prv``: ``PRVAccountant``).
    No steps: 0; a step without noise: infinity."""
    history = [(float(z), float(q), int(s)) for z, q, s in history if s > 0]
    if not history:
        return 0.0
    if any(z <= 0 for z, _, _ in history):
        return math.inf
    if accountant == "rdp":
        from opacus.accountants import RDPAccountant
        from opacus.accountants.analysis import rdp as analysis

        # RDPAccountant.get_epsilon: the sum over the history of each entry's per-step curve
        # times its steps, then the conversion; the curve (99 fractional orders, ~0.17 s a
        # rate) depends on the rate and noise only, so a run's rows reuse it: the same bits
        rdp = sum([_rdp_per_step(q, z) * s for z, q, s in history])
        eps, _ = analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
        return float(eps)
    from opacus.accountants import PRVAccountant

    acc = PRVAccountant()
    acc.history = history
    return float(acc.get_epsilon(delta))


def _largest_rdp_epsilon(histories: list[list[tuple[float, float, int]]], delta: float) -> float:
    """``max(epsilon(h) for h in histories)`` (RDP), the same bits, computing few full curves.

    Epsilon at the integer orders alone (12 .. 63 and 2 .. 10, cheap: ~4 ms a rate) bounds a
    history's epsilon from above, since the full one is a minimum over a superset of orders.
    Histories are taken in decreasing order of that bound; once the bound is at most the
    largest exact epsilon so far, no later history can exceed it. With a Dirichlet split
    every node's rate differs, and most are never computed in full (~0.17 s each)."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as analysis

    orders = [a for a in RDPAccountant.DEFAULT_ALPHAS if float(a).is_integer()]
    bounds = []
    for h in histories:
        live = [(float(z), float(q), int(n)) for z, q, n in h if n > 0]
        if not live or any(z <= 0 for z, _, _ in live):
            bounds.append(math.inf if live else 0.0)
            continue
        rdp = sum([analysis.compute_rdp(q=q, noise_multiplier=z, steps=n, orders=orders) for z, q, n in live])
        bounds.append(float(analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)[0]))
    best = 0.0
    for k in sorted(range(len(histories)), key=lambda k: -bounds[k]):
        if bounds[k] <= best:
            break
        best = max(best, epsilon(histories[k], delta, "rdp"))
    return best


@functools.lru_cache(maxsize=1 << 16)
def _rdp_per_step(q: float, z: float) -> np.ndarray:
    """One step's RDP of the subsampled Gaussian at opacus' default orders (read-only)."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as analysis

    curve = analysis.compute_rdp(q=q, noise_multiplier=z, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS)
    curve.flags.writeable = False
    return curve


class BufferLedger:
    """Client-level DP of a buffered asynchronous rule (DP-FedBuff): each server update is one
    Gaussian mechanism, noise of std ``z C`` on the sum of its buffer's clipped updates, and a
    client with ``m`` updates in one buffer moves that sum by at most ``m C``. Which clients
    are in a buffer follows the run's schedule, not a random sample, so no amplification by
    sampling is claimed: a client's RDP at order ``a`` is ``a m^2 / (2 z^2)`` summed over the
    updates it took part in (its *exposure*, the sum of ``m^2``), and :meth:`epsilon` is the
    most exposed client's. Only clients that took part are stored (a registered population's
    10^8 cost nothing)."""

    def __init__(self, noise_multiplier: float, delta: float, accountant: str) -> None:
        self.noise_multiplier, self.delta, self.accountant = noise_multiplier, delta, accountant
        self.exposure: dict[int, int] = {}
        self.most = 0
        self._cached: float | None = 0.0

    def update(self, clients: np.ndarray) -> None:
        """One server update whose buffer held an update of each of ``clients`` (repeats: a
        client with several updates in the buffer)."""
        ids, counts = np.unique(np.asarray(clients, dtype=np.int64), return_counts=True)
        for c, m in zip(ids.tolist(), counts.tolist(), strict=True):
            self.exposure[c] = self.exposure.get(c, 0) + m * m
            self.most = max(self.most, self.exposure[c])
        self._cached = None

    def epsilon(self) -> float:
        """The most exposed client's epsilon: ``most`` unsubsampled (q = 1) Gaussian steps of
        noise multiplier ``z`` (their RDP adds up to ``a most / (2 z^2)``)."""
        if self._cached is None:
            self._cached = epsilon([(self.noise_multiplier, 1.0, self.most)], self.delta, self.accountant)
        return self._cached

    def state_dict(self) -> dict[str, torch.Tensor]:
        ids = np.fromiter(self.exposure, dtype=np.int64, count=len(self.exposure))
        return {"ids": torch.from_numpy(ids),
                "exposure": torch.tensor([self.exposure[c] for c in ids.tolist()], dtype=torch.int64, device="cpu")}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.exposure = dict(zip(state["ids"].tolist(), state["exposure"].tolist(), strict=True))
        self.most = max(self.exposure.values(), default=0)
        self._cached = None


def sample_ledger(cfg, sizes: np.ndarray) -> DPLedger | None:
    """The ledger of sample-level DP-SGD steps of ``cfg`` (``privacy.dp.level: sample``) over
    nodes with ``sizes`` samples, else None."""
    dp = cfg.privacy.dp
    if dp is None or dp.level != "sample":
        return None
    return DPLedger("sample", dp.noise_multiplier, dp.delta, dp.accountant, sizes, cfg.local.batch_size)


class DPLedger:
    """What a run has spent: per-round client sampling rates (client level) or each node's
    DP-SGD steps (sample level); :meth:`epsilon` is the bound for the most exposed
    client or sample.

    Sample level: node ``i`` samples batches of ``batch_size`` from its ``sizes[i]`` samples,
    ``q_i = min(1, batch_size / sizes[i])``; its epsilon composes its own steps only (its data
    take part in nothing else), and the run reports the maximum over nodes.
    """

    def __init__(self, level: str, noise_multiplier: float, delta: float, accountant: str,
                 sizes: np.ndarray, batch_size: int) -> None:
        self.level, self.noise_multiplier, self.delta = level, noise_multiplier, delta
        self.accountant = accountant
        sizes = np.asarray(sizes, dtype=np.int64)
        self.rates = np.minimum(1.0, batch_size / np.maximum(sizes, 1))
        self.steps = np.zeros(len(sizes), dtype=np.int64)          # sample level, per node
        self.rounds: list[tuple[float, int]] = []                  # client level: (q, rounds)
        self._cached: float | None = 0.0

    def client_round(self, selected: int, candidates: int) -> None:
        """One DP-FedAvg round that sampled ``selected`` of ``candidates`` clients."""
        q = min(1.0, selected / max(candidates, 1))
        if self.rounds and self.rounds[-1][0] == q:
            self.rounds[-1] = (q, self.rounds[-1][1] + 1)
        else:
            self.rounds.append((q, 1))
        self._cached = None

    def sample_steps(self, nodes: np.ndarray, steps: np.ndarray) -> None:
        """``nodes`` took ``steps`` DP-SGD steps each."""
        np.add.at(self.steps, np.asarray(nodes, dtype=np.int64), np.asarray(steps, dtype=np.int64))
        self._cached = None

    def with_steps(self, steps: np.ndarray) -> DPLedger:
        """This ledger with every node's sample-level ``steps`` replaced (a copy): the whole
        run's, from parts recorded elsewhere (ranks, peer processes)."""
        import copy

        other = copy.copy(self)
        other.steps, other._cached = np.asarray(steps, dtype=np.int64).copy(), None
        return other

    def history(self) -> list[list[tuple[float, float, int]]]:
        """The accountant histories to bound: one for client level, one per distinct sampling
        rate (its most-trained node) for sample level."""
        z = self.noise_multiplier
        if self.level == "client":
            return [[(z, q, n) for q, n in self.rounds]]
        out = []
        for q in np.unique(self.rates[self.steps > 0]):
            out.append([(z, float(q), int(self.steps[self.rates == q].max()))])
        return out

    def epsilon(self) -> float:
        if self._cached is None:
            histories = self.history()
            if self.accountant == "rdp" and len(histories) > 1:
                self._cached = _largest_rdp_epsilon(histories, self.delta)
            else:
                self._cached = max((epsilon(h, self.delta, self.accountant) for h in histories),
                                   default=0.0)
        return self._cached

    def state_dict(self) -> dict[str, torch.Tensor]:
        rounds = torch.tensor(self.rounds, dtype=torch.float64, device="cpu").reshape(-1, 2)
        return {"steps": torch.from_numpy(self.steps.copy()), "rounds": rounds}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.steps = state["steps"].numpy().astype(np.int64).copy()
        self.rounds = [(float(q), int(n)) for q, n in state["rounds"].tolist()]
        self._cached = None
