"""Synchronous FL rounds: select, broadcast, train in one batched call, upload, aggregate.

A round lasts as long as its slowest selected client (download + compute + upload),
plus the server link's time to fan the payload out and the uploads in when its bandwidth
is set. With a deadline, late clients are dropped and the round ends at the deadline;
with over-selection, the round ends when the wanted number of uploads has arrived.
Dropped clients abort (they neither upload nor change their persistent state).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from gossamer import wire
from gossamer.algorithms.fl.fedavg import ServerState
from gossamer.algorithms.fl.payload import Payload
from gossamer.algorithms.local import LocalObjective
from gossamer.population.store import ClientStore
from gossamer.protocols.accounting import FLAccounting
from gossamer.protocols.hierarchy import downward_s, tree_mean, upward
from gossamer.protocols.private import build_ledger
from gossamer.protocols.sync_fl import SyncRound
from gossamer.protocols.upload import Uploads, build_pipeline
from gossamer.sim.drivers.base import Driver
from gossamer.sim.drivers.sync_fl_personal import PersonalRounds
from gossamer.sim.drivers.sync_fl_records import SyncFLRecords
from gossamer.sim.drivers.sync_fl_stages import UploadStages
from gossamer.sim.experiment import Experiment
from gossamer.training.trainer import TrainResult


class SyncFLDriver(UploadStages, PersonalRounds, SyncFLRecords, Driver):
    columns = Driver.columns + ["participants", "lost_messages", "dropped"]

    def __init__(self, exp: Experiment) -> None:
        super().__init__(exp)
        self.algorithm = algo = exp.algorithm
        self.state: ServerState = algo.init_state(exp.init_params.reshape(-1), exp.num_nodes)
        # a registered population: every client has data (its sample counts are computed on demand)
        self.has_data = np.ones(exp.num_nodes, dtype=bool) if exp.population is not None else exp.trainer.sizes > 0
        self.participants = 0
        self.lost = 0
        self.scores_here = True           # contribution scores (only the writing rank of a sharded run)
        self.dropped = 0
        numel = exp.spec.numel
        self.down_bytes = wire.encoded_size(algo.download_vectors * numel)
        self.pipeline = pipe = build_pipeline(exp.cfg, algo, numel, exp.uplink)
        self.up_bytes: int | None = pipe.upload_bytes(1)
        # the stages' state rows for the whole population (EF memory, DGC momentum)
        self.stage_state = pipe.compress.init(exp.num_nodes, numel, self.device) if pipe.compress else {}
        self.sent_up: np.ndarray = np.zeros(0, dtype=np.int64)   # this round's upload sizes
        self.downlink = exp.downlink
        self.estimate: torch.Tensor | None = None        # each client's copy of the global model
        if self.downlink is not None:
            init = exp.init_params.reshape(-1)
            self.estimate = init.expand(exp.num_nodes, -1).clone()
        self.accounting = FLAccounting(exp.num_nodes, sparse=exp.population is not None)
        tiers = exp.hierarchy.depth + 1 if exp.hierarchy is not None else 0
        self.tiers_up = np.zeros(tiers, dtype=np.int64)     # bytes per tier (0: the server's link)
        self.tiers_down = np.zeros(tiers, dtype=np.int64)
        self.tiers_down_round = np.zeros(tiers, dtype=np.int64)
        self.partial_bytes = wire.encoded_size(numel + 1)  # an aggregator's weighted sum and weight
        self.cut_off = 0                                   # selected clients under a failed leaf
        self.rehomed = 0                                   # ... that reached another leaf instead
        self.instances = 0                                 # extra leaf instances, summed over rounds
        self.round_tree = exp.hierarchy                    # the tree as this round has it
        self.dp = exp.cfg.privacy.dp                    # differential privacy (docs/privacy.md)
        self.dp_ledger = build_ledger(exp.cfg, numel, exp.trainer.sizes, exp.num_nodes)
        self.columns = self.columns + pipe.extra_columns
        self.selection = (0, 0)                         # this round's (selected, candidates)
        self.secagg, self.secagg_aborted, self.secagg_clipped = exp.cfg.privacy.secure_aggregation, 0, 0
        first_cohort = self._candidates()
        exp.trainer.reserve(first_cohort[:algo.expected_clients(len(first_cohort))], exp.init_params.dtype)
        self._init_personal()
        # per-client state rows (SCAFFOLD's c_i, DiLoCo's inner AdamW state) of the clients that
        # have trained; a registered population keeps them within population.state_budget_mb
        self.client_state: ClientStore | None = None
        if algo.client_state_vectors:
            pop = exp.cfg.population
            budget = pop.state_budget_mb * 2**20 if pop.lazy else float("inf")
            with torch.device("cpu"):          # a host store (population/store.py)
                row = algo.init_client_state(numel)
            self.client_state = ClientStore(row, budget, pop.spill_dir)

    def _candidates(self) -> np.ndarray:
        online = self.exp.online(self.sim_time)
        if self.exp.faults.enabled:
            online &= self.exp.faults.server_reachable(self.sim_time)
        return np.flatnonzero(online & self.has_data)

    def _idle_round(self, r: int) -> None:
        """Nobody to train: wait for the next node to come online (or fault to end)."""
        nxt = self.exp.availability.next_switch.min() if self.exp.availability.model != "always" else np.inf
        if self.exp.faults.enabled:
            nxt = min(nxt, self.exp.faults.next_change())
        if np.isfinite(nxt):
            self.accounting.server_idle(max(0.0, float(nxt) - self.sim_time))
            self.sim_time = float(max(self.sim_time, nxt))
        self.state = ServerState(self.state.params, r, self.state.extra)
        self.round = r

    def run_round(self) -> None:
        exp, algo, faults = self.exp, self.algorithm, self.exp.faults
        r = self.round + 1
        candidates = self._candidates()
        rnd = SyncRound(algo, exp.cfg.seed, r, candidates)       # protocols/sync_fl.py
        ids = rnd.selected
        self.participants = len(ids)
        self.selection = (len(ids), len(candidates))
        if len(ids) == 0:
            self._idle_round(r)
            return
        if not algo.communicates:                                   # local training only
            self._local_round(r, ids)
            return
        received_model = self.state.params                          # what the clients start from
        server, system = exp.num_nodes, exp.system                 # the server's id in fault keys
        down_bytes, decoded = self.down_bytes, None
        if self.downlink is not None:                               # compressed broadcast
            down_bytes, decoded = self._broadcast(ids, r)
        down_s = system.download_s(ids, down_bytes)
        tree = exp.hierarchy
        if tree is not None and exp.cfg.hierarchy.rehome:    # as real clients and aggregators do
            self.round_tree = tree.rehomed(r)
            self.rehomed += int((self.round_tree.leaf_of[ids] != tree.leaf_of[ids]).sum())
            tree = self.round_tree
        # an aggregator down (not re-homed): the clients below it get nothing this round
        cut = tree.down_at(r)[tree.leaf_of[ids]] if tree is not None and tree.failures else None
        if tree is not None and exp.cfg.hierarchy.clients_per_instance is not None:   # LIFL's scaling
            served = ids if cut is None else ids[~cut]
            self.round_tree = tree.scaled(served, exp.cfg.hierarchy.clients_per_instance)
            self.instances += len(self.round_tree.parents[-1]) - len(tree.parents[-1])
            tree = self.round_tree
        if tree is not None:                        # down the tree of aggregators first
            down_s = down_s + downward_s(tree, ids, down_bytes)
        received = np.ones(len(ids), dtype=bool)
        if faults.enabled:                                          # 2r: downlink, 2r+1: uplink
            to = np.full(len(ids), server)
            received = ~faults.lost(2 * r, to, ids)
            down_s = down_s + faults.extra_delay(2 * r, to, ids)
        if decoded is not None:     # acknowledged deliveries move both copies of the estimate
            self.estimate[torch.from_numpy(ids[received])] += decoded[torch.from_numpy(received)]
        reach = ids
        if cut is not None:
            received &= ~cut
            self.cut_off += int(cut.sum())
            reach = ids[~cut]
        sent_down = int(np.sum(np.broadcast_to(down_bytes, len(reach))))
        self.accounting.download(reach, down_bytes)
        if tree is not None:     # the clients' downloads, then each active aggregator's copy
            sent_down = self._tier_bytes(self.tiers_down, reach, sent_down, down_bytes)
        self.bytes_down += sent_down
        # every client that got the payload: arrival times from the schedule, before training
        got = ids[received]
        self.round_clients = got                                    # secure aggregation's U1
        samples = exp.trainer.samples(got, r)
        anchors = None
        if algo.split_roles:                                # FedAMD: roles per client
            anchors = algo.anchors(exp.cfg.seed, r, got)
            samples = algo.task_samples(samples, exp.trainer.sizes[got], anchors)
        if algo.personalized and algo.personal_training:     # the personal steps compute too
            samples = samples + self._personal_samples(got, samples)
        compute_s = system.compute_s(got, samples)
        self.up_bytes = self.pipeline.upload_bytes(r)              # DGC: this round's density
        if self.up_bytes is not None:
            self.up_bytes += self.extra_up
        # a value-dependent upload size (compression) is priced after training, below
        up_s = system.upload_s(got, self.up_bytes) if self.up_bytes is not None else np.zeros(len(got))
        delivered = np.ones(len(got), dtype=bool)
        if faults.enabled:
            compute_s = compute_s * faults.slowdown(r, got)
            to = np.full(len(got), server)
            delivered = ~faults.lost(2 * r + 1, got, to)
            up_s = up_s + faults.extra_delay(2 * r + 1, got, to)
        arrival = down_s[received] + compute_s + up_s
        if faults.enabled:                  # a client that crashes before its upload is sent
            delivered &= ~faults.down_by(got, self.sim_time + arrival)
        keep, round_s = rnd.replay(arrival, delivered)
        self.dropped += int((~keep).sum())
        self.lost += int((~received).sum() + (keep & ~delivered).sum())
        trained = got[keep]
        acc = self.accounting
        self.sent_up = np.full(len(trained), self.up_bytes or 0, dtype=np.int64)
        if len(trained):
            own = self.personal is not None and algo.personal_training
            if own and algo.personal_first:      # FedRep: the head before the body
                self._personal_step(r, trained, received_model)
            if anchors is None:
                self._train_and_aggregate(r, trained, delivered[keep])
            else:
                self._anchor_round(r, trained, delivered[keep], anchors[keep])
            if own and not algo.personal_first:
                self._personal_step(r, trained, received_model)
            if self.up_bytes is None:          # sizes known now: the uploads' real times
                arrival[keep] += system.upload_s(trained, self.sent_up)
                round_s = float(arrival[keep].max())
            sent_up = int(self.sent_up.sum())
            if tree is not None:               # the server waits for the top partial sums
                # a leaf waits for each of its clients' uploads as the flat server does (a lost
                # one until it would have arrived); lost uploads take no time on its link
                sizes = np.where(delivered[keep], self.sent_up, 0)
                round_s, messages = upward(tree, trained, arrival[keep], sizes, self.partial_bytes)
                self.tiers_up[-1] += sent_up
                self.tiers_up[:-1] += messages * self.partial_bytes
                sent_up += int(messages.sum()) * self.partial_bytes
            self.bytes_up += sent_up
            acc.upload(trained, self.sent_up)
            arrived = trained[delivered[keep]]
            acc.completed(arrived)
            acc.accepted(np.zeros(len(arrived), dtype=np.int64))   # synchronous: never stale
            # a participant waits from its upload until the round closes (for the slowest)
            acc.client_idle_s[arrived] += round_s - arrival[keep][delivered[keep]]
        else:
            self.state = ServerState(self.state.params, r, self.state.extra)
        if not received.any():
            round_s = float(down_s.max())
        server_down, server_up = sent_down, int(self.sent_up.sum())
        if tree is not None:                    # the server's own link: the top tier only
            server_down = int(self.tiers_down_round[0])
            server_up = int(messages[0]) * self.partial_bytes if len(trained) else 0
        self.sim_time += round_s + system.server_fanout_s(server_down) + system.server_fanout_s(server_up)
        self.round = r

    def _train_and_aggregate(self, r: int, trained: np.ndarray, delivered: np.ndarray) -> None:
        exp, algo = self.exp, self.algorithm
        lr = exp.cfg.local.lr
        payload = algo.broadcast(self.state)
        start = payload.model
        if self._uploads_are_models(delivered):    # FedAvg's dense round: the mean, never the rows
            with self.timer("train_s"):
                weights = algo.mean_weights(exp.trainer.sizes[trained], start.dtype, start.device)
                result = exp.trainer.train(start.expand(len(trained), -1), trained, r,
                                           objective=algo.local_objective(payload, None),
                                           mean_weights=weights)
            with self.timer("communicate_s"):
                self.state = algo.aggregate_mean(self.state, result.mean)
            self.train_loss = result.loss.mean()
            self.node_steps += int(result.steps.sum())
            return
        uploads, result, starts = self._train_clients(r, trained, payload, start)
        uploads = self._attack(r, trained, start, uploads)
        up = Uploads.of(r, trained, start, uploads)
        with self.timer("communicate_s"):
            up, delivered = self._through_pipeline(up, delivered, result.steps)
            rows = up.rows() if delivered.all() else up.rows()[torch.from_numpy(delivered)]
        scorer, sizes = exp.contribution, exp.trainer.sizes[trained[delivered]]
        models = rows[:, : exp.spec.numel]                  # the uploads as the server holds them
        if (scorer is not None or exp.hierarchy is not None) and len(rows):
            weights = algo.mean_weights(sizes, rows.dtype, rows.device)
        if scorer is not None and self.scores_here and len(rows) and r % exp.cfg.contribution.every == 0:
            scorer.observe(r, trained[delivered], models, weights, start)
        with self.timer("communicate_s"):
            if exp.hierarchy is not None and len(rows):    # summed up the aggregator tree
                mean = tree_mean(self.round_tree, trained[delivered], models, weights)
                self.state = algo.aggregate_mean(self.state, mean)
            else:
                self.state = algo.aggregate(self.state, rows, sizes, result.steps[delivered], lr)
            if algo.server_personalizes and len(rows):   # FedCAC, FED-PUB: each client's next model
                keep = torch.from_numpy(delivered)
                layers = list(zip(exp.spec.offsets, map(math.prod, exp.spec.shapes), strict=True))
                extra = {}
                if algo.uses_embeddings:    # computed by each client on its trained model
                    own = result.params[keep]
                    extra = {"embeddings": self._embeddings(own), "masks": self.mask_entries,
                             "trained": own}
                self.personal[torch.from_numpy(trained[delivered])] = algo.personalize(
                    starts[keep], models, self.state.params, layers, r, **extra)
        self.train_loss = result.loss.mean()
        self.node_steps += int(result.steps.sum())

    def _train_clients(self, r: int, trained: np.ndarray, payload: Payload, start: torch.Tensor
                       ) -> tuple[torch.Tensor, TrainResult, torch.Tensor]:
        """The round's clients ``trained`` train from ``payload`` and form their uploads (the
        general path: client state, personal starts): (uploads ``[K, U]``, the
        trainer's result, the rows they started from)."""
        exp, algo = self.exp, self.algorithm
        lr = exp.cfg.local.lr
        cstate = None        # the store holds rows on the host; the cohort's travel each round
        if self.client_state is not None:
            cstate = self.client_state.get(trained).to(self.device)
        with self.timer("train_s"):
            objective = algo.local_objective(payload, cstate)
            starts = start.expand(len(trained), -1)
            if self.estimate is not None:          # clients start from their copy of the model
                starts = self.estimate[torch.from_numpy(trained)]
            if algo.local_entries:                 # FedBN: with their own BatchNorm entries
                starts = algo.local_start(starts, self.personal[torch.from_numpy(trained)], self.head)
            if self.personal is not None and (algo.personal_first or algo.server_personalizes):
                starts = algo.train_start(self.personal[torch.from_numpy(trained)])  # FedRep, FedCAC: own rows
                objective = algo.start_objective(objective, starts, exp.spec.names)
                frozen = algo.global_frozen(self.head_names, exp.spec.names)
                if frozen:                                           # FedRep: its new head
                    objective = replace(objective or LocalObjective(), frozen=frozen)
            result = exp.trainer.train(starts, trained, r, objective=objective)
            if algo.local_entries:                 # ... which they keep, trained
                self.personal[torch.from_numpy(trained)] = result.params
            uploads, new_state = algo.client_update(result.params, payload, cstate, result.steps, lr)
            if self.estimate is not None:          # the server applies each update to its model
                uploads = uploads.clone()
                uploads[:, : exp.spec.numel] += start - starts
            if new_state is not None and self.client_state is not None:
                self.client_state.set(trained, new_state.cpu())
        return uploads, result, starts

    def _attack(self, r: int, trained: np.ndarray, start: torch.Tensor, uploads: torch.Tensor) -> torch.Tensor:
        """The crafting attackers' uploads replaced (a model attack crafts from every upload)."""
        exp = self.exp
        if not exp.adversary.model_attack:
            return uploads
        numel = exp.spec.numel
        with self.timer("train_s"):
            uploads = uploads.clone()
            uploads[:, :numel] = exp.adversary.corrupt(uploads[:, :numel], start,
                                                       exp.adversary.crafting[trained], r)
        return uploads

    def evaluate(self) -> dict[str, Any]:
        with self.timer("eval_s"):
            acc, loss = self._test_scores(self.state.params.reshape(1, -1))
        row = self.base_row()
        row.update(test_accuracy=float(acc[0]), test_loss=float(loss[0]),
                   participants=self.participants, lost_messages=self.lost,
                   dropped=self.dropped)
        if self.dp_ledger is not None:
            row["epsilon"] = self.dp_ledger.epsilon()
        if self.secagg is not None:
            row["secagg_aborted"] = self.secagg_aborted
        if self.exp.personal is not None:
            with self.timer("eval_s"):
                row.update(self._personal_row())
        return row

    def _test_scores(self, models: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Test accuracy and loss of ``models`` (the sharded simulator splits the batches)."""
        return self.exp.evaluator.evaluate(models)

    def global_params(self) -> torch.Tensor:
        return self.state.params
