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
from gossamer.algorithms.fl.fedpub import functional_embeddings, mask_parameters
from gossamer.algorithms.fl.personalized import head_parameters
from gossamer.algorithms.local import LocalObjective
from gossamer.population.store import ClientStore
from gossamer.protocols.accounting import FLAccounting
from gossamer.protocols.hierarchy import downward_s, tree_mean, upward
from gossamer.protocols.sync_fl import SyncRound
from gossamer.protocols.upload import Uploads, build_ledger, build_pipeline, dp_secure_mean
from gossamer.sim.drivers.base import Driver, _to_tensor
from gossamer.sim.experiment import Experiment
from gossamer.training.evaluator import clients_table, personal_summary


class SyncFLDriver(Driver):
    columns = Driver.columns + ["participants", "lost_messages", "dropped"]

    def __init__(self, exp: Experiment) -> None:
        super().__init__(exp)
        self.algorithm = algo = exp.algorithm
        self.state: ServerState = algo.init_state(exp.init_params.reshape(-1), exp.num_nodes)
        # a registered population: every client has data (its sample counts are computed on demand)
        self.has_data = np.ones(exp.num_nodes, dtype=bool) if exp.population is not None else exp.trainer.sizes > 0
        self.participants = 0
        self.lost = 0
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
        # personalized FL: every client's own model (Ditto's v, local-only's model)
        self.personal: torch.Tensor | None = None
        if algo.personalized:
            self.personal = algo.personal_init(exp.init_params.reshape(-1)).expand(exp.num_nodes, -1).clone()
            self.head_names, self.head = head_parameters(exp.spec, getattr(algo, "head_layers", 1))
            self.head = self.head.to(self.device)
        self.extra_up = 0                                  # FED-PUB: each upload's embedding bytes
        if algo.personalized and algo.uses_embeddings:   # FED-PUB: its proxy input and mask entries
            with torch.device("cpu"):          # drawn on the host: the same input on every device
                self.proxy = exp.model.proxy_input(exp.cfg.seed).to(self.device)
            self.mask_entries = mask_parameters(exp.spec)[1].to(self.device)
            self.extra_up = 4 * int(self._embeddings(exp.init_params.reshape(1, -1)).shape[1])
        self.personal_accuracy: np.ndarray | None = None   # each client's, at the last evaluation
        if exp.personal is not None:
            self.columns = self.columns + ["personal_accuracy", "personal_median", "personal_worst10"]
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

    def _personal_samples(self, clients: np.ndarray, samples: np.ndarray) -> np.ndarray:
        """Samples the personal step computes on: the local schedule's, or its epochs'."""
        epochs = self.algorithm.personal_epochs
        return samples if epochs is None else epochs * self.exp.trainer.sizes[clients]

    def _personal_step(self, r: int, clients: np.ndarray, received: torch.Tensor) -> None:
        """The clients' personal models take their local steps on the algorithm's personal
        objective (Ditto: towards the model they received; FedRep: the head alone)."""
        exp, algo = self.exp, self.algorithm
        idx = torch.from_numpy(clients)
        steps = None
        if algo.personal_epochs is not None:
            per_epoch = -(-exp.trainer.sizes[clients] // exp.cfg.local.batch_size)
            steps = algo.personal_epochs * per_epoch
        with self.timer("train_s"):
            start = algo.personal_start(received, self.personal[idx], self.head)
            objective = algo.personal_objective(received, self.head_names, exp.spec.names)
            result = exp.trainer.train(start.contiguous(), clients, r + (1 << 42), steps=steps,
                                       objective=objective)
            self.personal[idx] = result.params
        self.node_steps += int(result.steps.sum())

    def _local_round(self, r: int, ids: np.ndarray) -> None:
        """Local-only training: the selected clients train their own models; nothing is sent,
        and the round lasts as long as the slowest of them computes."""
        exp = self.exp
        samples = self._personal_samples(ids, exp.trainer.samples(ids, r))
        compute_s = exp.system.compute_s(ids, samples)
        if exp.faults.enabled:
            compute_s = compute_s * exp.faults.slowdown(r, ids)
        self._personal_step(r, ids, self.state.params)
        self.accounting.completed(ids)
        self.sim_time += float(compute_s.max())
        self.state = ServerState(self.state.params, r, self.state.extra)
        self.round = r

    def _personal_row(self) -> dict[str, float]:
        """Every client's model (personal, else the global one; fine-tuned first with
        ``eval.personal_finetune_steps``) on its own test rows: mean, median, worst 10%."""
        exp = self.exp
        nodes = exp.personal.nodes
        if self.personal is not None:
            models = self.algorithm.personal_model(self.state.params, self.personal[torch.from_numpy(nodes)],
                                                   self.head)
        else:
            models = self.state.params.reshape(1, -1).expand(len(nodes), -1)
        steps = exp.cfg.eval.personal_finetune_steps
        if steps:
            models = exp.trainer.train(models.contiguous(), nodes, self.round + (1 << 43),
                                       steps=np.full(len(nodes), steps)).params
        accuracy = exp.personal.evaluate(models, nodes).cpu().numpy()
        self.personal_accuracy = np.full(exp.num_nodes, np.nan)
        self.personal_accuracy[nodes] = accuracy
        return personal_summary(accuracy)

    def _tier_bytes(self, tiers: np.ndarray, ids: np.ndarray, client_bytes: int, nbytes: int) -> int:
        """Add a broadcast's bytes per tier (the clients' downloads on the last tier, one copy per
        active aggregator on the others); returns the total."""
        tree = self.round_tree
        node, per_tier = tree.leaf_of[ids], np.zeros(tree.depth + 1, dtype=np.int64)
        per_tier[-1] = client_bytes
        for level in range(tree.depth - 1, -1, -1):     # an aggregator re-homed to the server
            parent = tree.parents[level][np.unique(node)]   # gets its copy on the server's link
            per_tier[level] += int((parent >= 0).sum()) * nbytes
            per_tier[0] += int((parent < 0).sum()) * nbytes
            node = parent[parent >= 0]
        tiers += per_tier
        self.tiers_down_round = per_tier
        return int(per_tier.sum())

    def _uploads_are_models(self, delivered: np.ndarray) -> bool:
        """Whether the server sees exactly the trained models of every client: no upload
        stage, attack, loss or compressed broadcast between training and the mean."""
        pipe, exp = self.pipeline, self.exp
        return (self.algorithm.mean_of_models and bool(delivered.all()) and self.estimate is None
                and not self.algorithm.personal_first and not self.algorithm.server_personalizes
                and not exp.adversary.model_attack and pipe.compress is None and pipe.rqm is None
                and pipe.dp is None and self.secagg is None and exp.contribution is None
                and exp.hierarchy is None
                and not (self.dp is not None and self.dp.level == "sample"))

    def _train_and_aggregate(self, r: int, trained: np.ndarray, delivered: np.ndarray) -> None:
        exp, algo = self.exp, self.algorithm
        lr = exp.cfg.local.lr
        payload = algo.broadcast(self.state)
        start = payload[: exp.spec.numel]
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
        cstate = None        # the store holds rows on the host; the cohort's travel each round
        if self.client_state is not None:
            cstate = self.client_state.get(trained).to(self.device)
        with self.timer("train_s"):
            objective = algo.local_objective(payload, cstate)
            starts = start.expand(len(trained), -1)
            if self.estimate is not None:          # clients start from their copy of the model
                starts = self.estimate[torch.from_numpy(trained)]
            if self.personal is not None and (algo.personal_first or algo.server_personalizes):
                starts = algo.train_start(self.personal[torch.from_numpy(trained)])  # FedRep, FedCAC: own rows
                objective = algo.start_objective(objective, starts, exp.spec.names)
                frozen = algo.global_frozen(self.head_names, exp.spec.names)
                if frozen:                                           # FedRep: its new head
                    objective = replace(objective or LocalObjective(), frozen=frozen)
            result = exp.trainer.train(starts, trained, r, objective=objective)
            uploads, new_state = algo.client_update(result.params, payload, cstate, result.steps, lr)
            if self.estimate is not None:          # the server applies each update to its model
                uploads = uploads.clone()
                uploads[:, : exp.spec.numel] += start - starts
            if new_state is not None and self.client_state is not None:
                self.client_state.set(trained, new_state.cpu())
            if exp.adversary.model_attack:
                numel = exp.spec.numel
                uploads = uploads.clone()
                uploads[:, :numel] = exp.adversary.corrupt(uploads[:, :numel], start,
                                                           exp.adversary.crafting[trained], r)
        up = Uploads.of(r, trained, start, uploads)
        with self.timer("communicate_s"):
            up, delivered = self._through_pipeline(up, delivered, result.steps)
            rows = up.rows() if delivered.all() else up.rows()[torch.from_numpy(delivered)]
        scorer, sizes = exp.contribution, exp.trainer.sizes[trained[delivered]]
        models = rows[:, : exp.spec.numel]                  # the uploads as the server holds them
        if (scorer is not None or exp.hierarchy is not None) and len(rows):
            weights = algo.mean_weights(sizes, rows.dtype, rows.device)
        if scorer is not None and len(rows) and r % exp.cfg.contribution.every == 0:
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

    def _embeddings(self, models: torch.Tensor) -> torch.Tensor:
        """FED-PUB's functional embeddings ``[K, H]`` of models ``[K, P]`` on the proxy input."""
        return functional_embeddings(self.exp.model, self.exp.spec, self.proxy, models)

    def _broadcast(self, ids: np.ndarray, r: int) -> tuple[np.ndarray, torch.Tensor]:
        """Compressed broadcast: each selected client gets ``C(x - estimate_i)``; returns the
        per-client download sizes and the decoded differences (applied on delivery)."""
        numel = self.exp.spec.numel
        diff = self.state.params.reshape(1, -1) - self.estimate[torch.from_numpy(ids)]
        keys = ids.astype(np.int64) * (1 << 32) + (1 << 31) + r    # apart from the uploads' keys
        enc = self.downlink.compress(diff, seed=self.exp.cfg.seed, keys=keys)
        sizes = wire.HEADER_BYTES + enc.nbytes + 4 * numel * (self.algorithm.download_vectors - 1)
        return sizes, self.downlink.decompress(enc)

    def _through_pipeline(self, up: Uploads, delivered: np.ndarray, steps: np.ndarray
                          ) -> tuple[Uploads, np.ndarray]:
        """The upload stages (protocols/upload.py), client side then server side, on the whole
        batch; sets ``sent_up``. Returns the uploads as the server sees them and which count."""
        pipe, idx = self.pipeline, torch.from_numpy(up.clients)
        if pipe.compress is not None:
            state = {k: v[idx] for k, v in self.stage_state.items()}
            up, decoded, state = pipe.compress.apply(up, state)
            for k, v in state.items():
                self.stage_state[k][idx] = v
            self.sent_up = wire.HEADER_BYTES + pipe.extra_bytes + up.encoded.nbytes + self.extra_up
            up = self._fetchsgd(up, delivered) if decoded is None else up.with_delta(decoded)
        if self.dp is not None and self.dp.level == "sample":
            self.dp_ledger.sample_steps(up.clients, steps)
        elif pipe.rqm is not None:             # every trained client sends its update quantized
            up, decoded = pipe.encode_rqm(up, self.exp.cfg.seed)
            up = up.with_delta(decoded)
            self.dp_ledger.released(up.clients)
        elif pipe.dp is not None:              # DP-FedAvg over the delivered updates
            selected, candidates = self.selection
            expected = self.algorithm.expected_clients(candidates)
            self.dp_ledger.client_round(selected, candidates)
            if self.secagg is not None:        # clients clip and add noise; the server sees a sum
                noisy = pipe.dp.client(up.delta(), up.clients, up.round, expected, masked=True)
                return self._secure_mean(up, delivered, noisy, expected)
            keep = torch.from_numpy(delivered)
            if keep.any():
                d = pipe.dp.client(up.delta()[keep], up.clients[delivered], up.round, expected)
                model = up.model.clone()
                model[keep] = up.start + pipe.dp.server(d, up.round, expected).expand(len(d), -1)
                up = replace(up, model=model)
        if self.secagg is not None:
            up, delivered = self._secure_mean(up, delivered)
        return up, delivered

    def _fetchsgd(self, up: Uploads, delivered: np.ndarray) -> Uploads:
        """FetchSGD's server (``Compress.fetch``): the delivered sketches' weighted mean moves
        the momentum and error sketches in ``ServerState.extra`` (so they checkpoint), and every
        row becomes ``start + update`` (the algorithm's mean of equal rows returns it)."""
        keep = torch.from_numpy(delivered)
        if not keep.any():
            return up
        weights = self.algorithm.mean_weights(self.exp.trainer.sizes[up.clients[delivered]],
                                              device=self.device)
        update, extra = self.pipeline.compress.fetch(self.state.extra, up.encoded.parts["table"][keep],
                                                     weights, self.exp.spec.numel)
        self.state = ServerState(self.state.params, self.state.round, extra)
        return up.with_delta(update.expand(len(up.clients), -1))

    def _secure_mean(self, up: Uploads, delivered: np.ndarray, deltas: torch.Tensor | None = None,
                     dp_expected: int = 0) -> tuple[Uploads, np.ndarray]:
        """Secure aggregation: the clients that got the payload run the protocol, clients whose
        upload was lost or late drop after sharing keys, and the server learns only the weighted
        mean of the delivered updates; every delivered row becomes that mean (the algorithm's
        average of equal rows returns it). Aborted: no row is delivered. Counts the bytes."""
        from gossamer.privacy.secagg_server import secure_mean

        exp, sa, members, trained = self.exp, self.secagg, self.round_clients, up.clients
        weights = np.ones(len(members)) if dp_expected else \
            self.algorithm.weights(exp.trainer.sizes[members], torch.float64, torch.device("cpu")).numpy()
        deltas = up.delta() if deltas is None else deltas
        out = secure_mean(members, deltas.double().cpu().numpy(), trained, trained[delivered], weights,
                          threshold=sa.threshold, bits=sa.bits, clip=sa.clip,
                          seed=[exp.cfg.seed, up.round], round=up.round)
        at = np.searchsorted(members, trained)
        self.sent_up = out.sent[at] + np.where(delivered, 0, self.up_bytes)   # lost in flight
        late = np.setdiff1d(np.arange(len(members)), at)          # only ran the key rounds
        self.accounting.upload(members[late], out.sent[late])
        self.accounting.download(members, out.received)
        self.bytes_up += int(out.sent[late].sum())
        self.bytes_down += int(out.received.sum())
        self.secagg_clipped += out.clipped
        if out.mean is None:
            self.secagg_aborted += 1
            return up, np.zeros_like(delivered)
        model = up.model.clone()
        step = torch.from_numpy(out.mean).to(model.device, model.dtype) if not dp_expected else dp_secure_mean(
            self.pipeline.dp, out.mean, int(delivered.sum()), up.round, dp_expected).to(model.device)
        model[torch.from_numpy(delivered)] = up.start + step
        return replace(up, model=model), delivered

    def _anchor_round(self, r: int, trained: np.ndarray, delivered: np.ndarray, anchors: np.ndarray) -> None:
        """FedAMD: anchors upload full-shard gradients at the global model, miners train."""
        exp, algo = self.exp, self.algorithm
        payload = algo.broadcast(self.state)
        start = payload[: exp.spec.numel]
        uploads = torch.empty(len(trained), exp.spec.numel, device=self.device)
        steps = np.zeros(len(trained), dtype=np.int64)
        losses = []
        with self.timer("train_s"):
            if anchors.any():
                grads, loss = exp.trainer.full_gradient(start.expand(int(anchors.sum()), -1), trained[anchors])
                uploads[torch.from_numpy(anchors)] = grads
                losses.append(loss)
            miners = ~anchors
            if miners.any():
                result = exp.trainer.train(start.expand(int(miners.sum()), -1), trained[miners], r,
                                           objective=algo.local_objective(payload, None))
                models = result.params
                if exp.adversary.model_attack:
                    models = exp.adversary.corrupt(models, start, exp.adversary.crafting[trained[miners]], r)
                uploads[torch.from_numpy(miners)] = models
                steps[miners] = result.steps
                losses.append(result.loss)
                self.node_steps += int(result.steps.sum())
        keep = torch.from_numpy(delivered)
        with self.timer("communicate_s"):
            self.state = algo.aggregate(self.state, uploads[keep], exp.trainer.sizes[trained[delivered]],
                                        steps[delivered], exp.cfg.local.lr, clients=trained[delivered],
                                        anchors=anchors[delivered])
        self.train_loss = torch.cat(losses).mean()

    def evaluate(self) -> dict[str, Any]:
        with self.timer("eval_s"):
            acc, loss = self.exp.evaluator.evaluate(self.state.params.reshape(1, -1))
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

    def summary(self) -> dict[str, Any]:
        out = self.accounting.summary()
        if self.client_state is not None:             # the per-client state store (population/store.py)
            store = self.client_state
            out["client_state"] = {"clients": len(store), "memory_bytes": store.memory_bytes,
                                   "disk_bytes": store.disk_bytes}
        if self.dp_ledger is not None:
            out.update(dp_epsilon=self.dp_ledger.epsilon(), dp_delta=self.dp.delta)
        if self.secagg is not None:
            out.update(secagg_aborted_rounds=self.secagg_aborted, secagg_clipped=self.secagg_clipped)
        if self.exp.contribution is not None:
            adv = self.exp.adversary
            out["contribution"] = self.exp.contribution.summary(adv.flagged, adv.kinds)
        if self.exp.hierarchy is not None:
            out["hierarchy"] = {"levels": [len(p) for p in self.exp.hierarchy.parents],
                                "bytes_up_by_tier": [int(b) for b in self.tiers_up],
                                "bytes_down_by_tier": [int(b) for b in self.tiers_down],
                                "clients_cut_off": self.cut_off,
                                **({"clients_rehomed": self.rehomed} if self.exp.cfg.hierarchy.rehome else {}),
                                **({"extra_instances": self.instances}
                                   if self.exp.cfg.hierarchy.clients_per_instance is not None else {})}
        return out

    def extra_files(self) -> dict[str, str]:
        files = {}
        if self.exp.contribution is not None:
            files["contributions.csv"] = self.exp.contribution.table(self.exp.adversary.flagged)
        if self.personal_accuracy is not None:          # each client's own test accuracy
            files["clients.csv"] = clients_table(self.exp.personal.targets, self.personal_accuracy)
        return files

    def global_params(self) -> torch.Tensor:
        return self.state.params

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(params=self.state.params, server_round=self.state.round,
                     server_extra=dict(self.state.extra), participants=self.participants,
                     lost=self.lost, dropped=self.dropped,
                     client_state=None if self.client_state is None else self.client_state.state_dict(),
                     compression_memory=_clone(self.stage_state.get("memory")),
                     compression_momentum=_clone(self.stage_state.get("momentum")),
                     client_estimates=None if self.estimate is None else self.estimate.clone(),
                     accounting=_to_tensor(self.accounting.state_dict()))
        if self.dp_ledger is not None:
            state["dp_ledger"] = self.dp_ledger.state_dict()
        if self.secagg is not None:
            state.update(secagg_aborted=self.secagg_aborted, secagg_clipped=self.secagg_clipped)
        if self.exp.contribution is not None:
            state["contribution"] = self.exp.contribution.state_dict()
        if self.exp.hierarchy is not None:
            state.update(tiers_up=torch.from_numpy(self.tiers_up.copy()),
                         tiers_down=torch.from_numpy(self.tiers_down.copy()), cut_off=self.cut_off,
                         rehomed=self.rehomed, instances=self.instances)
        if self.personal is not None:
            state["personal"] = self.personal.clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        dev = self.device          # checkpoints load on the host (metrics/runstore.py)
        self.state = ServerState(state["params"].to(dev), int(state["server_round"]),
                                 {k: v.to(dev) if isinstance(v, torch.Tensor) else v
                                  for k, v in state["server_extra"].items()})
        self.participants = int(state["participants"])
        self.lost = int(state.get("lost", 0))
        self.dropped = int(state.get("dropped", 0))
        if state.get("accounting") is not None:
            self.accounting.load_state_dict(state["accounting"])
        if state.get("client_state") is not None and self.client_state is not None:
            saved = state["client_state"]
            if isinstance(saved, torch.Tensor):     # a checkpoint of every client's row [N, P]
                saved = {"ids": torch.arange(len(saved)), "rows": saved}
            self.client_state.load_state_dict(saved)
        for key in ("memory", "momentum"):
            if state.get(f"compression_{key}") is not None:
                self.stage_state[key] = state[f"compression_{key}"].to(dev, copy=True)
        if state.get("client_estimates") is not None:
            self.estimate = state["client_estimates"].to(dev, copy=True)
        if self.dp_ledger is not None and state.get("dp_ledger") is not None:
            self.dp_ledger.load_state_dict(state["dp_ledger"])
        self.secagg_aborted = int(state.get("secagg_aborted", 0))
        self.secagg_clipped = int(state.get("secagg_clipped", 0))
        if self.exp.contribution is not None and state.get("contribution") is not None:
            self.exp.contribution.load_state_dict(state["contribution"])
        if self.personal is not None and state.get("personal") is not None:
            self.personal = state["personal"].to(dev, copy=True)
        if self.exp.hierarchy is not None and state.get("tiers_up") is not None:
            self.tiers_up, self.tiers_down = state["tiers_up"].numpy().copy(), state["tiers_down"].numpy().copy()
            self.cut_off = int(state.get("cut_off", 0))
            self.rehomed = int(state.get("rehomed", 0))
            self.instances = int(state.get("instances", 0))


def _clone(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.clone()
