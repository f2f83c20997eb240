"""Random-walk (token) learning on the simulated clock: tokens hop in lockstep rounds.

A round is one hop of every token: a token at an online node trains there (all such tokens
in one batched trainer call), then moves to the neighbour its walk draws among the online
neighbours it can reach. The round lasts as long as the slowest token's hop: compute at the
node plus sending the model (and, for SRRW, the token's visit counts) over the link. With
one token, or equal hops, this is the exact clock; several tokens with unequal hops are
held to a common round boundary, like nodes in synchronous D-PSGD.

Faults: a token whose node is offline at the start of a round does not train; it is handed
to an online neighbour drawn from its kernel restricted to those (as if the node passed it
on when leaving: one transfer, counted in ``token_skips``), and waits in place when none is
online. A token whose next hop is offline or cut off by a partition goes to another online
neighbour drawn the same way, and stays (training again next round) when none is left. A
lost transfer keeps the token at the sender, which still holds it and retries next round.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from gossamer import rng, wire
from gossamer.algorithms.dl.random_walk import total_variation
from gossamer.config import ConfigError
from gossamer.sim.drivers.base import Driver
from gossamer.sim.experiment import Experiment
from gossamer.training.trainer import BatchedTrainer, TrainResult


def start_nodes(seed: int, num_nodes: int, tokens: int) -> np.ndarray:
    """Where the tokens start ``[T]``: distinct random nodes when there are enough of them."""
    g = rng.generator(seed, rng.STREAM_RANDOM_WALK, 0)
    start = g.permutation(num_nodes)[:tokens] if tokens <= num_nodes else g.integers(0, num_nodes, tokens)
    return np.asarray(start, dtype=np.int64)


def train_visits(trainer: BatchedTrainer, rows: torch.Tensor, nodes: np.ndarray, keys: np.ndarray,
                 weights: np.ndarray | None) -> tuple[torch.Tensor, TrainResult]:
    """Train the tokens ``rows`` ``[B, P]`` visiting ``nodes`` with data-order ``keys``; with
    ``weights`` ``[N]`` (reweighting) each visit's displacement is scaled by its node's weight.
    The simulator and a runtime peer (a batch of one) both call this."""
    before = rows.clone() if weights is not None else None
    result = trainer.train(rows, nodes, keys, inplace=True)
    if before is not None:                     # importance weight on the visit's displacement
        w = torch.from_numpy(weights[nodes]).to(rows.dtype).unsqueeze(1)
        rows = torch.lerp(before, rows, w)
    return rows, result


class RandomWalkDriver(Driver):
    """Runs :class:`~gossamer.algorithms.dl.random_walk.RandomWalk`; one round = one hop per token."""

    columns = Driver.columns + ["acc_min", "acc_max", "avg_model_accuracy", "avg_model_loss",
                                "visits", "visit_tv", "visit_tv_token", "online", "token_skips",
                                "tokens_waiting", "lost_messages"]

    def __init__(self, exp: Experiment) -> None:
        super().__init__(exp)
        algo, topo, n = exp.algorithm, exp.topology, exp.num_nodes
        if exp.adversary is not None and exp.adversary.model_attack:
            raise ConfigError("adversary.attack", "random-walk learning does not support model "
                              "attacks yet (data attacks such as label_flip work)")
        if getattr(exp, "dynamic", None) is not None:
            raise ConfigError("topology", "random-walk learning needs a static graph (a graph "
                              "per round is not supported yet)")
        try:
            algo.check_degrees(topo.degrees())
        except ValueError as exc:
            raise ConfigError("topology", str(exc)) from None
        self.tokens = algo.num_tokens
        self.mu = algo.target(topo.degrees())
        self.weights = algo.step_weights(exp.trainer.sizes, self.mu)
        self.reweighted = not np.allclose(self.weights[exp.trainer.sizes > 0], 1.0)
        history = wire.encoded_size(n, torch.int32) if algo.self_repellent else 0
        self.hop_bytes = exp.message_bytes + history     # the model, plus SRRW's visit counts
        self.position = start_nodes(exp.cfg.seed, n, self.tokens)
        init = exp.init_params
        self.params = (init.expand(self.tokens, -1) if init.dim() == 1
                       else init[torch.from_numpy(self.position)]).clone()
        self.visits = np.zeros((self.tokens, n), dtype=np.int64)
        self.last_online = np.ones(n, dtype=bool)
        self.skips = self.waiting = self.lost = 0

    # --- one round ------------------------------------------------------------------------------
    def run_round(self) -> None:
        r = self.round + 1
        online = self.exp.online(self.sim_time)
        self.last_online = online
        hop_s = self.hop(np.arange(self.tokens), online, r)
        acted = np.isfinite(hop_s)
        self.waiting = int((~acted).sum())
        if acted.any():
            self.sim_time += float(hop_s[acted].max())
        else:                                  # every token waits: jump to the next change
            exp = self.exp
            nxt = exp.availability.next_change() if exp.availability.model != "always" else np.inf
            if exp.faults is not None and exp.faults.enabled:
                nxt = min(nxt, exp.faults.next_change())
            if np.isfinite(nxt):
                self.sim_time = float(max(self.sim_time, nxt))
        self.round = r

    def hop(self, tokens: np.ndarray, online: np.ndarray, r: int) -> np.ndarray:
        """Round ``r`` for ``tokens``: train where the node is up, then move. Returns each
        token's hop duration in simulated seconds (``inf`` for a token that waited). Tokens
        never interact, so running them together or one by one gives the same state."""
        exp, algo = self.exp, self.exp.algorithm
        pos = self.position[tokens]
        here = online[pos]
        samples = np.zeros(len(tokens))
        if here.any():
            samples[here] = self._train(tokens[here], pos[here], r)
        topo, faults = exp.topology, exp.faults
        with self.timer("communicate_s"):
            cand = algo.candidates(topo.indptr, topo.indices, pos)
            probs = algo.kernel(cand, self.visits[tokens], self.mu)
            safe = np.maximum(cand.nodes, 0)
            allowed = (cand.nodes >= 0) & online[safe]
            faulty = faults is not None and faults.enabled
            if faulty:
                allowed &= faults.connected(self.sim_time, pos[:, None], safe)
            u = rng.uniform(exp.cfg.seed, rng.STREAM_RANDOM_WALK, tokens, r)
            nxt = algo.choose(cand, probs, allowed, u)
        nxt = np.where(nxt < 0, pos, nxt)
        moved = nxt != pos
        key = (r - 1) * self.tokens + tokens                  # one message id per (round, token)
        lost = faults.lost(key, pos, nxt) & moved if faulty else np.zeros(len(tokens), dtype=bool)
        delivered = moved & ~lost
        self.bytes_up += int(moved.sum()) * self.hop_bytes
        self.bytes_down += int(delivered.sum()) * self.hop_bytes
        self.lost += int(lost.sum())
        self.skips += int((delivered & ~here).sum())
        self.position[tokens] = np.where(delivered, nxt, pos)
        return self._durations(pos, nxt, samples, moved, here, key, r)

    def _train(self, tokens: np.ndarray, nodes: np.ndarray, r: int) -> np.ndarray:
        """One batched trainer call for the tokens at ``nodes``; returns samples processed."""
        exp = self.exp
        idx = torch.from_numpy(tokens)
        with self.timer("train_s"):
            rows, result = train_visits(exp.trainer, self.params[idx], nodes,
                                        (r - 1) * self.tokens + tokens,
                                        self.weights if self.reweighted else None)
        self.params[idx] = rows
        np.add.at(self.visits, (tokens, nodes), 1)
        trained = result.steps > 0
        self.node_steps += int(result.steps.sum())
        if trained.any():
            self.train_loss = float(result.loss[torch.from_numpy(trained)].mean())
        return result.samples

    def _durations(self, pos: np.ndarray, nxt: np.ndarray, samples: np.ndarray, moved: np.ndarray,
                   here: np.ndarray, key: np.ndarray, r: int) -> np.ndarray:
        """Compute at the node plus the transfer to the next node, per token."""
        exp, faults = self.exp, self.exp.faults
        s, nbytes = exp.system, self.hop_bytes
        compute = s.compute_s(pos, samples)
        transfer = s.latency_s[pos] + nbytes / s.bandwidth_up_Bps[pos] + nbytes / s.bandwidth_down_Bps[nxt]
        if faults is not None and faults.enabled:
            compute = compute * faults.slowdown(r, pos)
            transfer = transfer + faults.extra_delay(key, pos, nxt)
        hop_s = compute + np.where(moved, transfer, 0.0)
        return np.where(here | moved, hop_s, np.inf)

    # --- metrics ----------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, Any]:
        row = self.base_row()
        with self.timer("eval_s"):
            acc, loss = self.exp.evaluator.evaluate(self.params)
            row.update(test_accuracy=float(acc.mean()), test_loss=float(loss.mean()),
                       acc_min=float(acc.min()), acc_max=float(acc.max()))
            if self.exp.cfg.eval.average_model:
                avg_acc, avg_loss = self.exp.evaluator.evaluate(self.params.mean(0, keepdim=True))
                row.update(avg_model_accuracy=float(avg_acc[0]), avg_model_loss=float(avg_loss[0]))
        per_token = self.visits.sum(axis=1)
        total = int(per_token.sum())
        row.update(visits=total, online=int(self.last_online.sum()), token_skips=self.skips,
                   tokens_waiting=self.waiting, lost_messages=self.lost)
        if total:
            row["visit_tv"] = float(total_variation(self.visits.sum(axis=0) / total, self.mu))
            seen = per_token > 0
            freq = self.visits[seen] / per_token[seen, None]
            row["visit_tv_token"] = float(total_variation(freq, self.mu).mean())
        return row

    def global_params(self) -> torch.Tensor:
        return self.params.mean(0)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(params=self.params.clone(), position=torch.from_numpy(self.position.copy()),
                     visits=torch.from_numpy(self.visits.copy()),
                     last_online=torch.from_numpy(self.last_online.copy()),
                     skips=self.skips, waiting=self.waiting, lost=self.lost)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.params = state["params"].clone()
        self.position = state["position"].numpy().copy()
        self.visits = state["visits"].numpy().copy()
        self.last_online = state["last_online"].numpy().copy()
        self.skips, self.waiting, self.lost = int(state["skips"]), int(state["waiting"]), int(state["lost"])

    def summary(self) -> dict[str, Any]:
        algo = self.exp.algorithm
        return {"walk": algo.walk, "num_tokens": self.tokens, "hop_bytes": self.hop_bytes,
                "visits_per_node": self.visits.sum(axis=0).tolist()}
