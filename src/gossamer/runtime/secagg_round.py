"""Secure aggregation on real processes: one round's message rounds on the coordinator.

The protocol's server is :class:`gossamer.privacy.secagg_server.SecAggServer`, the same state
machine the simulator drives; this module carries its messages over the coordinator's two
calls. A selected client trains, then uploads its AdvertiseKeys message (``ModelMeta.kind``
5); at each later stage it asks for work (``GetTask``) and is answered ``SECAGG`` with the
server's message of that stage (the key list with the member count and its weight, then the
shares other clients encrypted for it, then the survivors), and uploads its reply (kinds 6,
7, 8). Each stage waits for the clients that answered the previous one for at most
``runtime.round_timeout_s``; a client that dies after sharing its keys (``kill -9``) is
recovered from the others' Shamir shares, as the protocol intends. The coordinator learns
the survivors' weighted mean update, never an individual one.
"""

from __future__ import annotations

import numpy as np
import torch

from gossamer.privacy.secagg import _ENTRY as ENTRY
from gossamer.privacy.secagg import _HEADER as HEADER
from gossamer.privacy.secagg import (
    CIPHER_BYTES,
    SHARE_BYTES,
    STAGES,
    ring_bytes,
    threshold_count,
)
from gossamer.privacy.secagg_server import SecAggAbort, SecAggServer, decode_mean, member_shares
from gossamer.protocols.private import dp_secure_mean
from gossamer.runtime.common import log
from gossamer.runtime.guard import Refused

KIND_ADVERTISE = 5                     # ModelMeta.kind of the stage-k message: 5 + k


def max_message_bytes(numel: int, bits: int, clients: int) -> int:
    """The largest secure-aggregation message a client among ``clients`` may send: its keys,
    its shares for every other client, its masked vector, or its unmasking answer (the exact
    sizes of :mod:`gossamer.privacy.secagg`'s messages; the stage checks each exactly)."""
    return max(68, 4 + (clients - 1) * (4 + CIPHER_BYTES), HEADER.size + ring_bytes(numel, bits),
               4 + clients * (ENTRY.size + SHARE_BYTES))


class SecAggRound:
    """One round among the ``selected`` clients; callers hold the coordinator's lock."""

    def __init__(self, sa, selected: set[int], numel: int, round: int) -> None:
        self.sa, self.round, self.numel = sa, round, numel
        self.server = SecAggServer(sorted(selected), threshold=2, bits=sa.bits, size=numel)
        self.outbox: dict[int, bytes] = {}                 # the server's message to each client
        self.shares: dict[int, float] = {}                 # each member's weight a_u
        self.members = 0
        self.silent: set[int] = set()                      # did not answer a stage in time

    @property
    def stage(self) -> int:
        return self.server.stage

    def receive(self, node: int, kind: int, data: bytes) -> None:
        """File ``node``'s message (ValueError when it is not the one due from it)."""
        k = kind - KIND_ADVERTISE
        if not 0 <= k < len(STAGES):
            raise ValueError(f"message kind {kind} is not a secure-aggregation stage")
        self.server.receive(STAGES[k], node, data)

    def awaited(self) -> set[int]:
        return self.server.expecting()

    def message_for(self, node: int) -> tuple[int, bytes] | None:
        """``(stage, bytes)`` the server has for ``node`` now, if its reply is awaited."""
        if self.stage in (1, 2, 3) and node in self.outbox and node in self.awaited():
            return self.stage, self.outbox[node]
        return None

    def close(self, weights) -> np.ndarray | None:
        """End the current stage (SecAggAbort below the threshold); after the last one, the
        survivors' weighted mean update ``[P]``. ``weights(ids)``: the algorithm's public
        weights of those clients (FedAvg: sample counts)."""
        self.silent |= self.awaited()
        closing = self.stage
        out = self.server.close()
        if closing == 0:                                 # U1 known: threshold and weights
            u1 = self.server.u1
            self.members = len(u1)
            self.server.threshold = threshold_count(self.sa.threshold, len(u1))
            self.shares = dict(zip(u1, member_shares(weights(u1)).tolist(), strict=True))
        if isinstance(out, dict):
            self.outbox = out
            return None
        survivors = np.array([self.shares[u] for u in self.server.u3])
        return decode_mean(out, survivors, self.members, clip=self.sa.clip, bits=self.sa.bits)

    def survivors(self) -> list[int]:
        return list(self.server.u3)


class SecureAggregation:
    """The synchronous coordinator's secure-aggregation handling (a mixin of
    :class:`gossamer.runtime.fl_server.Coordinator`; the lock is held by callers)."""

    def _secagg_message(self, node: int, bound: int | None, meta: object, tensor: torch.Tensor,
                        size: int) -> None:
        """File a secure-aggregation message of the current round (lock held)."""
        cur = self.current
        if cur.secagg is None or meta.round != cur.number or node in cur.failed:
            raise Refused(f"secure-aggregation message from {node} for round {meta.round} is not "
                          "expected", bound, strike=False)
        if int(meta.kind) - KIND_ADVERTISE != cur.secagg.stage:       # late, or early: not hostile
            raise Refused(f"secure-aggregation message of stage {int(meta.kind) - KIND_ADVERTISE} "
                          f"from {node} while the round is at stage {cur.secagg.stage}", bound,
                          strike=False)
        if meta.kind == KIND_ADVERTISE and node in cur.secagg.awaited():
            self._arrives(node, bound)                 # the round's protocol takes it, or not
        try:
            cur.secagg.receive(node, int(meta.kind), tensor.numpy().tobytes())
        except ValueError as exc:
            raise Refused(str(exc), bound) from None
        if meta.kind == KIND_ADVERTISE:                # it trained: the round stops waiting for it
            cur.received[node] = (None, self.clients[node])
        self.bytes_up += size
        self.lock.notify_all()

    def _secure_stages(self, cur) -> dict[int, tuple[torch.Tensor, int]]:
        """Secure aggregation's stages after every selected client advertised keys or timed
        out (lock held): each survivor's row is ``start + mean``, as in the simulator; an
        aborted round has no upload."""
        sa_round, rt, dp = cur.secagg, self.cfg.runtime, self.pipeline.dp

        def weights(ids):                            # with DP every member weighs the same
            sizes = np.array([self.clients.get(u, 0) for u in ids])
            return np.ones(len(ids)) if dp is not None else self.algorithm.weights(sizes, torch.float64).numpy()

        try:
            mean = sa_round.close(weights)
            while mean is None:
                self.lock.notify_all()
                self.lock.wait_for(lambda: not (sa_round.awaited() - cur.failed),
                                   timeout=rt.round_timeout_s)
                mean = sa_round.close(weights)
        except (SecAggAbort, ValueError) as exc:      # too few answers, or shares that do not
            log.warning("round %d: secure aggregation aborted: %s", cur.number, exc)   # rebuild
            self.secagg_aborted += 1
            self.stale |= sa_round.silent
            return {}
        self.stale |= sa_round.silent
        survivors = sa_round.survivors()
        step = torch.from_numpy(mean).to(torch.float32) if dp is None else dp_secure_mean(
            dp, mean, len(survivors), cur.number, cur.protocol.expected)
        row = self.state.params.reshape(-1) + step
        return {u: (row, self.clients[u]) for u in survivors}
