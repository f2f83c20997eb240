"""Random walks (:mod:`gossamer.protocols.random_walk`) on the simulated clock, in lockstep.

A round is one hop of every token (all tokens at online nodes train in one batched call);
it lasts as long as the slowest hop (compute plus the transfer of the model and, for SRRW,
the visit counts). Faults: a token at an offline node is handed to an online neighbour drawn
from its kernel (``token_skips``) or waits; a hop to a node that is offline or cut off is
redrawn among the others, and the token stays when none is left; a lost transfer keeps the
token at its sender, which retries next round.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from gossamer import wire
from gossamer.protocols import dl_metrics
from gossamer.protocols import random_walk as protocol
from gossamer.sim.drivers.base import Driver
from gossamer.sim.drivers.sync_dl import next_change
from gossamer.sim.experiment import Experiment
from gossamer.training.trainer import TrainResult


class RandomWalkDriver(Driver):
    """Executes :mod:`gossamer.protocols.random_walk` for every token at once; one round = one
    hop per token."""

    columns = dl_metrics.WALK_COLUMNS

    def __init__(self, exp: Experiment) -> None:
        super().__init__(exp)
        algo, topo, n = exp.algorithm, exp.topology, exp.num_nodes
        protocol.check(algo, topo, exp.adversary, getattr(exp, "dynamic", None))
        self.tokens = algo.num_tokens
        self.mu = algo.target(topo.degrees())
        self.weights = protocol.visit_weights(algo, exp.trainer.sizes, self.mu)
        history = wire.encoded_size(n, torch.int32) if algo.self_repellent else 0
        self.hop_bytes = exp.message_bytes + history     # the model, plus SRRW's visit counts
        self.position = protocol.start_nodes(exp.cfg.seed, n, self.tokens)
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
        elif np.isfinite(nxt := next_change(self.exp)):   # every token waits: jump to the next change
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
            d = protocol.draw(algo, topo, exp.cfg.seed, tokens, pos, self.visits[tokens], self.mu, r)
            safe = np.maximum(d.cand.nodes, 0)
            allowed = online[safe]
            faulty = faults is not None and faults.enabled
            if faulty:
                allowed &= faults.connected(self.sim_time, pos[:, None], safe)
            nxt = protocol.choose(algo, d, allowed)
        nxt = np.where(nxt < 0, pos, nxt)
        moved = nxt != pos
        key = protocol.visit_keys(r, self.tokens, tokens)      # one message id per (round, token)
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
        idx = torch.from_numpy(tokens)
        rows, result = self._train_visits(self.params[idx], nodes, protocol.visit_keys(r, self.tokens, tokens), r)
        self.params[idx] = rows
        np.add.at(self.visits, (tokens, nodes), 1)
        trained = result.steps > 0
        self.node_steps += int(result.steps.sum())
        if trained.any():
            self.train_loss = float(result.loss[torch.from_numpy(trained)].mean())
        return result.samples

    def _train_visits(self, rows: torch.Tensor, nodes: np.ndarray, keys: np.ndarray, r: int
                      ) -> tuple[torch.Tensor, TrainResult]:
        """The tokens ``rows`` train at ``nodes`` with data-order ``keys``: their new rows and
        the trainer's result."""
        with self.timer("train_s"):
            return protocol.train_visits(self.exp.trainer, rows, nodes, keys, self.weights)

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
            evaluate = self.exp.evaluator.evaluate
            row.update(dl_metrics.accuracy_row(*self._evaluate_tokens(), median=False))
            if self.exp.cfg.eval.average_model:
                row.update(dl_metrics.average_model_row(evaluate, self.params.mean(0, keepdim=True)))
        row.update(dl_metrics.visit_row(self.visits, self.mu), online=int(self.last_online.sum()),
                   token_skips=self.skips, tokens_waiting=self.waiting, lost_messages=self.lost)
        return row

    def _evaluate_tokens(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every token's test accuracy and loss ``[T]``."""
        return self.exp.evaluator.evaluate(self.params)

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
        self.params = state["params"].to(self.device, copy=True)    # loaded on the host
        self.position = state["position"].numpy().copy()
        self.visits = state["visits"].numpy().copy()
        self.last_online = state["last_online"].numpy().copy()
        self.skips, self.waiting, self.lost = int(state["skips"]), int(state["waiting"]), int(state["lost"])

    def summary(self) -> dict[str, Any]:
        algo = self.exp.algorithm
        return {"walk": algo.walk, "num_tokens": self.tokens, "hop_bytes": self.hop_bytes,
                "visits_per_node": self.visits.sum(axis=0).tolist()}
