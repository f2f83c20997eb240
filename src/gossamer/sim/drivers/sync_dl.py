"""Synchronous DL rounds (:mod:`gossamer.protocols.sync_dl`) on the simulated clock, batched.

Every online node trains in one batched call; the round's mixing is one sparse product
``X <- W X`` with the protocol's folded matrix; with a robust merge or Byzantine senders each
node merges the stack of models it holds (:mod:`gossamer.sim.gathered`). A round lasts as
long as the slowest online node's compute plus sending its model to its reachable neighbours.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from gossamer.protocols import dl_metrics
from gossamer.protocols import sync_dl as protocol
from gossamer.sim.drivers.base import Driver, _to_numpy, _to_tensor
from gossamer.sim.experiment import Experiment
from gossamer.sim.gathered import Corrupt, MergeStats, gathered_merge
from gossamer.topology import mixing_matrix, to_torch_sparse, window_links, window_spectral_gap
from gossamer.topology.mixing import EXACT_GAP_MAX_NODES
from gossamer.training.evaluator import local_losses

if TYPE_CHECKING:
    from gossamer.algorithms.local import LocalObjective
    from gossamer.training.trainer import TrainResult


class SyncDLDriver(Driver):
    """Executes :mod:`gossamer.protocols.sync_dl` over the whole population at once."""

    row_base = 0      # the node id of the first row of ``params`` (a rank holding only its own: its first)

    columns = dl_metrics.SYNC_DL_COLUMNS

    def __init__(self, exp: Experiment) -> None:
        super().__init__(exp)
        n = exp.num_nodes
        self.params = self._initial_params()
        self._spare: torch.Tensor | None = None      # mixing output buffer, reused every round
        self.has_data = exp.trainer.sizes > 0
        self.static = protocol.static_graph(exp.topology, exp.mixing_scipy)
        self.graph = self.static                                        # dynamic: set every round
        self.mixing = exp.mixing                                        # its torch form
        self.node_bytes = np.zeros(n, dtype=np.int64)   # bytes each node sent plus received
        self.last_online = np.ones(n, dtype=bool)
        self.isolated = self.lost = self.skipped = 0
        cfg = exp.cfg.eval
        if cfg.nodes is not None and cfg.nodes < n:
            from gossamer import rng
            pick = rng.generator(exp.cfg.seed, rng.STREAM_EVAL, 1).permutation(n)[: cfg.nodes]
            self.eval_nodes = np.sort(pick)
        else:
            self.eval_nodes = np.arange(n)
        adv = exp.adversary
        self.honest = np.ones(n, dtype=bool)
        if adv is not None and adv.enabled:              # metrics describe honest nodes only
            self.honest = ~adv.byzantine
            self.eval_nodes = self.eval_nodes[self.honest[self.eval_nodes]]
        self.aggregator = exp.algorithm.aggregator
        self.gathered = protocol.gathered(exp.algorithm, adv)
        self.message_bytes = exp.message_bytes          # per gossip message (subclasses: more vectors)
        self.round_gossip_steps = exp.algorithm.gossip_steps   # set every round
        protocol.check_final_merge(exp.algorithm, exp.cfg, self.gathered)

    def _initial_params(self) -> torch.Tensor:
        """Every node's starting model ``[N, P]`` (a sharded driver: its own rows only)."""
        init = self.exp.init_params
        return init.expand(self.exp.num_nodes, -1).clone() if init.dim() == 1 else init.clone()

    # --- who hears whom this round -------------------------------------------------------------
    def _use_round_graph(self, r: int) -> None:
        """A dynamic topology's links and mixing matrix for round ``r`` (a static one's are fixed)."""
        if self.exp.dynamic is not None:
            self.graph = protocol.round_graph(self.static, self.exp.dynamic, self.exp.cfg.topology.mixing, r)
            self.mixing = to_torch_sparse(self.graph.mixing, device=self.device)

    def _links(self, online: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
        """Masks over the directed links: sent (both ends up, not cut by a partition), delivered."""
        src, dst = self.graph.src, self.graph.dst
        sent = online[src] & online[dst]
        faults = self.exp.faults
        if not faults.enabled:
            return sent, sent
        sent &= faults.connected(self.sim_time, src, dst)
        return sent, sent & ~faults.lost(r, src, dst)

    def _restart(self, nodes: np.ndarray) -> None:
        """Nodes that rejoin with a fresh model start again from the initial parameters: those
        whose rows ``params`` holds (a rank of the sharded simulator holds its own, from node
        ``row_base`` on)."""
        nodes = np.asarray(nodes, dtype=np.int64)
        nodes = nodes[(nodes >= self.row_base) & (nodes < self.row_base + len(self.params))]
        if len(nodes):
            init, idx = self.exp.init_params, torch.from_numpy(nodes)
            self.params[idx - self.row_base] = init if init.dim() == 1 else init[idx]

    def _measured_nodes(self) -> np.ndarray:
        """The nodes an evaluation measures: the evaluated ones, less those that are gone
        (faults; all of them if none is left)."""
        nodes = self.eval_nodes
        if self.exp.faults.enabled:
            up = nodes[self.last_online[nodes]]
            nodes = up if len(up) else nodes
        return nodes

    # --- one round ------------------------------------------------------------------------------
    def run_round(self) -> None:
        exp, r = self.exp, self.round + 1
        faults = exp.faults
        online = exp.online(self.sim_time)
        if faults.enabled and faults.rejoin_fresh:
            self._restart(faults.rejoined())
        self.last_online = online
        self.round_gossip_steps = exp.algorithm.gossip_steps_at(r, exp.cfg.stop.rounds)
        samples = self._train_round(online, r)
        self._use_round_graph(r)
        sent, delivered = self._links(online, r)
        mixing = protocol.round_mixing(self.graph, online, delivered)
        with self.timer("communicate_s"):
            if self.gathered:
                self._merge_gathered(mixing, online, r)
            else:
                self._mix(mixing)
        self._account(online, samples, sent, delivered, r)
        if protocol.final_merge_due(exp.algorithm, r, exp.cfg.stop.rounds):
            with self.timer("communicate_s"):
                self._final_merge(online)
        self.round = r

    def _train_round(self, online: np.ndarray, r: int) -> np.ndarray:
        """Every online node with data trains, in one batched call; the samples each node
        processed ``[N]`` (its compute time's input)."""
        train_ids = np.flatnonzero(online & self.has_data)
        samples = np.zeros(self.exp.num_nodes)
        result = self._train_rows(train_ids, r)
        if result is not None:
            samples[train_ids] = result.samples
            self.node_steps += int(result.steps.sum())
            self.train_loss = result.loss.mean()
        return samples

    def _train_rows(self, train_ids: np.ndarray, r: int, first: int = 0) -> TrainResult | None:
        """Train nodes ``train_ids`` (sorted) in place, in one batched call: ``self.params``
        holds the rows of nodes ``first``, ``first + 1``, ... (a sharded driver: its own)."""
        trainer = self.exp.trainer
        with self.timer("train_s"):
            objective = self._local_objective(train_ids)     # also when none trains (its state)
            if not len(train_ids):
                return None
            extra = {} if objective is None else {"objective": objective}
            if len(train_ids) == self.params.shape[0]:      # every row trains: in place
                return trainer.train(self.params, train_ids, r, inplace=True, **extra)
            idx = torch.from_numpy(train_ids - first)
            rows = self.params[idx]
            result = trainer.train(rows, train_ids, r, inplace=True, **extra)
            self.params[idx] = rows
            return result

    def _local_objective(self, train_ids: np.ndarray) -> LocalObjective | None:
        """What the algorithm adds to the local steps of ``train_ids`` (called just before
        they train; rows in ``train_ids`` order). Plain D-PSGD adds nothing."""
        return None

    def _final_merge(self, online: np.ndarray) -> None:
        """The single global merge after the last round: every online node gets the exact mean.

        Costed as a ring all-reduce among the ``k`` online nodes: each sends and receives
        ``2 (k - 1)`` chunks of ``ceil(P / k)`` parameters, one chunk per transfer step, and a
        step lasts as long as the slowest node's latency plus chunk upload (or download)."""
        from gossamer import wire

        members = np.flatnonzero(online)
        k = len(members)
        if k < 2:
            return
        self._average(members)
        system = self.exp.system
        chunk = wire.encoded_size(-(-self.exp.spec.numel // k))
        transfers = 2 * (k - 1)
        self.bytes_up += transfers * k * chunk
        self.bytes_down += transfers * k * chunk
        self.node_bytes[members] += 2 * transfers * chunk
        step_s = np.maximum(system.latency_s[members] + chunk / system.bandwidth_up_Bps[members],
                            chunk / system.bandwidth_down_Bps[members])
        self.sim_time += transfers * float(step_s.max())

    def _average(self, members: np.ndarray) -> None:
        """``members`` (sorted node ids) take their exact mean."""
        from gossamer.algorithms.dl.dpsgd import global_average

        k = len(members)
        global_average(self.params, None if k == self.exp.num_nodes else torch.from_numpy(members))

    def _mix(self, mixing) -> None:
        if self._spare is None:
            self._spare = torch.empty_like(self.params)
        w = self.mixing if mixing is None else to_torch_sparse(mixing, device=self.device)
        mixed = self.exp.algorithm.mix(w, self.params, out=self._spare, steps=self.round_gossip_steps)
        if mixed is not self.params:                # the buffers swapped roles
            self._spare, self.params = self.params, mixed

    def _merge_gathered(self, mixing, online: np.ndarray, r: int) -> None:
        """Robust merge and/or Byzantine messages: each honest online node merges what it holds."""
        exp, adv = self.exp, self.exp.adversary
        w = self.graph.mixing if mixing is None else mixing
        receivers = np.flatnonzero(online & self.honest)
        stats = MergeStats()
        attack = adv is not None and adv.model_attack
        params = dict(exp.algorithm.aggregator_params)
        for step in range(self.round_gossip_steps):
            merged = gathered_merge(
                w, self.params, receivers, aggregator=self.aggregator, params=params,
                byzantine=adv.byzantine if attack else None, corrupt=self._crafter(r, step) if attack else None,
                losses=local_losses(exp.trainer), stats=stats)
            self.params[torch.from_numpy(receivers)] = merged
        self.skipped += stats.skipped

    def _crafter(self, r: int, step: int) -> Corrupt:
        """What Byzantine neighbours send in merge step ``step`` of round ``r``: models crafted
        against each receiver's, a random attack's draws keyed by the step and the receiver (an
        attack registered without ``draws``: by the first receiver of the call)."""
        adv, n = self.exp.adversary, self.exp.num_nodes
        return lambda held, own, byz, who: adv.corrupt(held, own, byz, r, key=step * n + int(who[0]),
                                                       keys=step * n + who)

    def _account(self, online: np.ndarray, samples: np.ndarray, sent: np.ndarray,
                 delivered: np.ndarray, r: int) -> None:
        """Bytes, lost messages, isolated nodes and the round's simulated duration."""
        exp, faults, n = self.exp, self.exp.faults, self.exp.num_nodes
        steps, nbytes = self.round_gossip_steps, self.message_bytes
        out_deg = np.bincount(self.graph.src[sent], minlength=n)
        in_deg = np.bincount(self.graph.dst[delivered], minlength=n)
        self.bytes_up += int(sent.sum()) * steps * nbytes
        self.bytes_down += int(delivered.sum()) * steps * nbytes
        self.node_bytes += (out_deg + in_deg) * (steps * nbytes)
        self.lost += int((sent & ~delivered).sum()) * steps
        self.isolated = int((online & (in_deg == 0)).sum()) if n > 1 else 0
        nodes = np.arange(n)
        compute_s = exp.system.compute_s(nodes, samples)
        spike = np.zeros(n)
        if faults.enabled:
            compute_s = compute_s * faults.slowdown(r, nodes)
            extra = faults.extra_delay(r, self.graph.src[sent], self.graph.dst[sent])
            np.maximum.at(spike, self.graph.dst[sent], extra)
        send_s = steps * (out_deg * nbytes / exp.system.bandwidth_up_Bps + exp.system.latency_s)
        recv_s = steps * in_deg * nbytes / exp.system.bandwidth_down_Bps
        node_s = compute_s + np.maximum(send_s, recv_s) + spike
        if online.any():
            self.sim_time += float(node_s[online].max())
        elif np.isfinite(nxt := next_change(exp)):      # nobody up: jump to the next change
            self.sim_time = float(max(self.sim_time, nxt))

    # --- metrics ----------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, Any]:
        row = self.base_row()
        nodes = self._measured_nodes()
        with self.timer("eval_s"):
            evaluate = self.exp.evaluator.evaluate
            acc, loss = evaluate(self.params[nodes])
            population = self.params if self.honest.all() else self.params[torch.from_numpy(self.honest)]
            row.update(dl_metrics.accuracy_row(acc, loss), online=int(self.last_online.sum()),
                       isolated=self.isolated, lost_messages=self.lost, merges_skipped=self.skipped,
                       **dl_metrics.node_bytes_row(self.node_bytes))
            self.node_accuracy = (np.asarray(nodes), acc.cpu().numpy())         # -> nodes.csv
            row.update(dl_metrics.consensus_row(evaluate, population, self.exp.cfg.eval.average_model))
        return row

    def global_params(self) -> torch.Tensor:
        return self.params[torch.from_numpy(self.honest)].mean(0)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(params=self.params, last_online=torch.from_numpy(self.last_online.copy()),
                     isolated=self.isolated, lost=self.lost, skipped=self.skipped,
                     node_bytes=torch.from_numpy(self.node_bytes.copy()))
        if self.exp.dynamic is not None:
            state["topology"] = _to_tensor(self.exp.dynamic.state_dict())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.params = state["params"].to(self.device, copy=True)   # loaded on the host
        if "last_online" in state:
            self.last_online = state["last_online"].numpy().copy()
            self.isolated, self.lost = int(state["isolated"]), int(state["lost"])
            self.skipped = int(state["skipped"])
        if "node_bytes" in state:
            self.node_bytes = state["node_bytes"].numpy().copy()
        if self.exp.dynamic is not None and "topology" in state:
            self.exp.dynamic.load_state_dict(_to_numpy(state["topology"]))

    def summary(self) -> dict[str, Any]:
        out = {"mean_bytes_per_node": float(self.node_bytes.mean()),
               "max_bytes_per_node": int(self.node_bytes.max())}
        dynamic = self.exp.dynamic
        if dynamic is None:
            if self.exp.num_nodes > EXACT_GAP_MAX_NODES:      # power iterations: an upper bound
                out["spectral_gap_estimated"] = True
            return {"spectral_gap": self.exp.spectral_gap, "num_edges": int(len(self.exp.topology.edges)), **out}
        rule = self.exp.cfg.topology.mixing
        # No single W: the per-round gap of the product over the first window (None above 2,000 nodes).
        gap = window_spectral_gap(dynamic, lambda graph: mixing_matrix(rule, graph))
        return {"spectral_gap": gap, "spectral_gap_rounds": dynamic.window, "num_edges": None,
                "links_per_round_first_window": float(np.mean(
                    [links.num_links for links in window_links(dynamic)])), **out}


def next_change(exp: Experiment) -> float:
    """When node availability or the fault schedule next changes (``inf``: never)."""
    nxt = exp.availability.next_change() if exp.availability.model != "always" else np.inf
    faults = exp.faults
    return min(nxt, faults.next_change()) if faults is not None and faults.enabled else nxt
