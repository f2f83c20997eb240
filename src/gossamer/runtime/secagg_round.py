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

from gossamer.privacy.secagg import STAGES, ring_bytes, threshold_count
from gossamer.privacy.secagg_server import SecAggServer, decode_mean, member_shares

KIND_ADVERTISE = 5                     # ModelMeta.kind of the stage-k message: 5 + k


def max_message_bytes(numel: int, bits: int, clients: int) -> int:
    """The largest secure-aggregation message a client may send (the masked vector, or its
    shares for every other client), with room for headers."""
    return max(ring_bytes(numel, bits) + 64, 4 + clients * 160)


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
