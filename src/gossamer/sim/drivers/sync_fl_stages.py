"""What travels in a synchronous FL round inside :class:`~gossamer.sim.drivers.sync_fl.
SyncFLDriver`: the compressed broadcast, the upload stages (compression with its feedback,
FetchSGD's sketches, DP, secure aggregation; protocols/upload.py), bytes per tier of an
aggregator tree, and FedAMD's anchor rounds. A part of the driver, in its own file."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from gossamer import wire
from gossamer.algorithms.fl.fedavg import ServerState
from gossamer.algorithms.fl.payload import Payload
from gossamer.protocols.private import dp_secure_mean
from gossamer.protocols.upload import Uploads


class UploadStages:
    """The broadcast and upload stages of :class:`SyncFLDriver` (it mixes this class in)."""

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
                and not self.algorithm.local_entries
                and not exp.adversary.model_attack and pipe.compress is None and pipe.rqm is None
                and pipe.dp is None and self.secagg is None and exp.contribution is None
                and exp.hierarchy is None
                and not (self.dp is not None and self.dp.level == "sample"))

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
        """FedAMD: anchors upload full-shard gradients at the global model, miners train (a
        model attack crafts from the miners' models)."""
        exp, algo = self.exp, self.algorithm
        payload = algo.broadcast(self.state)
        start = payload.model
        miners = ~anchors
        with self.timer("train_s"):
            uploads, steps, loss = self._anchor_uploads(r, trained, anchors, payload)
            if exp.adversary.model_attack and miners.any():
                at = torch.from_numpy(miners)
                uploads[at] = exp.adversary.corrupt(uploads[at], start, exp.adversary.crafting[trained[miners]], r)
            self.node_steps += int(steps[miners].sum())
        keep = torch.from_numpy(delivered)
        with self.timer("communicate_s"):
            self.state = algo.aggregate(self.state, uploads[keep], exp.trainer.sizes[trained[delivered]],
                                        steps[delivered], exp.cfg.local.lr, clients=trained[delivered],
                                        anchors=anchors[delivered])
        self.train_loss = torch.cat([loss[torch.from_numpy(anchors)], loss[torch.from_numpy(miners)]]).mean()

    def _anchor_uploads(self, r: int, trained: np.ndarray, anchors: np.ndarray, payload: Payload
                        ) -> tuple[torch.Tensor, np.ndarray, torch.Tensor]:
        """FedAMD's uploads ``[K, P]`` of clients ``trained`` before any attack (anchors: their
        full-shard gradients; miners: their trained models), steps and losses (the sharded
        simulator computes each client's on its owner)."""
        exp, numel = self.exp, self.exp.spec.numel
        start = payload.model
        uploads = torch.empty(len(trained), numel, device=self.device)
        steps = np.zeros(len(trained), dtype=np.int64)
        loss = torch.zeros(len(trained), device=self.device)
        if anchors.any():
            at = torch.from_numpy(anchors)
            uploads[at], loss[at] = exp.trainer.full_gradient(start.expand(int(anchors.sum()), -1), trained[anchors])
        miners = ~anchors
        if miners.any():
            result = exp.trainer.train(start.expand(int(miners.sum()), -1), trained[miners], r,
                                       objective=self.algorithm.local_objective(payload, None))
            at = torch.from_numpy(miners)
            uploads[at], loss[at] = result.params, result.loss
            steps[miners] = result.steps
        return uploads, steps, loss
