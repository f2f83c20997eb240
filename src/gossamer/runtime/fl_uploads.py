"""The synchronous FL coordinator's intake of uploads (hostile bytes: every check before a
row is filed): reading one upload of the configured kind through the codec, decoding encoded
bytes, the caller's and the round's checks, and the round protocol's verdict on time. A part
of :class:`~gossamer.runtime.fl_server.Coordinator`, in its own file."""

from __future__ import annotations

import time

import torch

from gossamer.runtime.codec import (
    KIND_DELTA,
    KIND_ENCODED,
    KIND_EVAL,
    KIND_MODEL,
    KIND_PARTIAL,
    WireError,
    read_counted_model,
)
from gossamer.runtime.guard import Refused
from gossamer.runtime.secagg_round import KIND_ADVERTISE
from gossamer.runtime.secagg_round import max_message_bytes as secagg_bytes


class UploadIntake:
    """Reads, checks and files the uploads of :class:`Coordinator` (it mixes this class in)."""

    def _read_upload(self, chunks) -> tuple[object, torch.Tensor, int]:
        """One upload of the configured kind, validated (codec), or WireError."""
        kind, encoded = self.upload_kind, self.upload_kind in (KIND_ENCODED, KIND_ADVERTISE)
        numel = None if encoded else self.numel if kind == KIND_DELTA else self.upload_numel
        reports = self.exp.personal is not None and not encoded   # evaluation reports: [hits]
        meta, tensor, size = read_counted_model(
            chunks, expected_numel=None if reports else numel, run_id=self.cfg.runtime.run_id,
            limits=self.limits, dtype=torch.uint8 if encoded else torch.float32)
        if reports:
            want = 1 if meta.kind == KIND_EVAL else numel
            if tensor.dim() != 1 or tensor.numel() != want:
                raise WireError(f"expected a flat [{want}] tensor, got shape {list(tensor.shape)}")
            if meta.kind == KIND_EVAL:
                return meta, tensor, size
        if encoded and tensor.dim() != 1:
            raise WireError(f"bytes travel as one flat uint8 row, not shape {list(tensor.shape)}")
        if kind == KIND_ADVERTISE:                            # secure aggregation: stages 5..8
            sa = self.pipeline.secagg
            if not KIND_ADVERTISE <= meta.kind <= KIND_ADVERTISE + 3:
                raise WireError(f"upload kind {meta.kind} where a secure-aggregation message is expected")
            if tensor.numel() > secagg_bytes(self.numel, sa.bits, self.exp.num_nodes):
                raise WireError(f"secure-aggregation message of {tensor.numel()} bytes is too large")
            return meta, tensor, size
        self._check_partial(meta)
        if meta.kind != kind and not (meta.kind == KIND_PARTIAL and kind == KIND_MODEL):
            raise WireError(f"upload kind {meta.kind} where {kind} is expected")
        if encoded and tensor.numel() > 8 * self.upload_numel + 4096:
            raise WireError(f"encoded upload of {tensor.numel()} bytes is larger than the model")
        return meta, tensor, size

    def _decode(self, node: int, round_: int, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The row the algorithm aggregates (DP: the update, until the round's DP step) and
        the decoded update of encoded bytes (``Pipeline.decode``), or WireError."""
        if self.upload_kind != KIND_ENCODED:
            return tensor.float().clone(), None
        try:
            return self.pipeline.decode(tensor.numpy().tobytes(), node, round_, self.state.params.reshape(-1),
                                        self.estimates.get(node, torch.zeros(self.numel)))
        except ValueError as exc:
            raise WireError(str(exc)) from None

    def _accept(self, node: int, bound: int | None, meta: object, tensor: torch.Tensor,
                size: int) -> None:
        """File a validated upload of the current round, or raise :class:`Refused`."""
        with self.lock:
            cur = self.current
            if meta.kind == KIND_PARTIAL:
                self._accept_partial(node, bound, meta, tensor, size)
                return
            if meta.kind == KIND_EVAL:
                self._accept_report(node, bound, meta, tensor, size)
                return
            if self._is_aggregator(node):
                raise Refused(f"aggregator {node - self.exp.num_nodes} sent a client's upload", bound)
            if node not in self.clients:
                raise Refused(f"node {node} has not joined", bound, strike=False)
            if int(meta.meta) != self.clients[node]:
                raise Refused(f"node {node} reports {int(meta.meta)} samples but joined with "
                              f"{self.clients[node]}", bound)
            if self.upload_kind == KIND_ADVERTISE:
                self._secagg_message(node, bound, meta, tensor, size)
                return
            if meta.round != cur.number or node not in cur.open():
                if node in cur.received and meta.round == cur.number:
                    raise Refused(f"duplicate update from {node} for round {meta.round}", bound, strike=False)
                raise Refused(f"update from {node} for round {meta.round} is not expected", bound,
                              strike=False)
            try:
                row, decoded = self._decode(node, cur.number, tensor)
            except WireError as exc:
                raise Refused(str(exc), bound) from None
            self._arrives(node, bound)
            if self.pipeline.compress is not None and self.pipeline.compress.feedback == "ef21":
                self.estimates[node] = decoded
            if self.tree is not None:                   # summed on arrival
                self._file(node, row, self.clients[node])
            else:
                cur.received[node] = (row, self.clients[node])
            self.bytes_up += size
            self.lock.notify_all()

    def _arrives(self, node: int, bound: int | None) -> None:
        """The round's protocol takes the upload of ``node`` now, or it is refused (the round
        closed at its wanted uploads, or its deadline passed): late, not hostile."""
        cur = self.current                        # (a round built without a protocol takes all)
        if cur.protocol is not None and not cur.protocol.arrive(node, time.monotonic() - cur.opened):
            raise Refused(f"update from {node} arrived after round {cur.number} closed", bound,
                          strike=False)
