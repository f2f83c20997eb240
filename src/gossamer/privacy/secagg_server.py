"""The server's side of secure aggregation, one client message at a time, and whole runs.

:class:`SecAggServer` is the protocol's server as a state machine: ``receive(stage, client,
message)`` files one client message (checked: every byte comes from a possibly hostile
client), ``close()`` ends the stage with what arrived and returns the server's message to
each client of the next stage (the total after the last). Both executors drive it: the
simulator's :func:`run_protocol` calls the client functions of :mod:`gossamer.privacy.secagg`
in process, the runtime coordinator (``runtime/fl_server.py``) receives their bytes over gRPC.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from gossamer.privacy.secagg import (
    _ENTRY,
    _HEADER,
    _U32,
    CIPHER_BYTES,
    KIND_MASKED,
    PRIME,
    SHARE_BYTES,
    STAGES,
    Client,
    Randomness,
    advertise_keys,
    agree,
    decode,
    encode_input,
    fixed_point_scale,
    lagrange_at_zero,
    masked_input,
    prg,
    public,
    ring_bytes,
    ring_mask,
    share_keys,
    threshold_count,
    unmasking,
    unpack_ring,
)

__all__ = ["SecAggAbort", "SecAggServer", "SecAggResult", "SecureMean", "run_protocol",
           "secure_mean", "threshold_count"]


class SecAggAbort(RuntimeError):
    """Fewer than ``threshold`` clients answered a stage: the round learns nothing."""


class SecAggServer:
    """One round of the semi-honest protocol among ``members`` (ids), vectors of ``size`` ring
    elements of ``bits`` bits, ``threshold`` answers needed at every stage."""

    def __init__(self, members: list[int], *, threshold: int, bits: int, size: int) -> None:
        self.members, self.threshold, self.bits, self.size = set(members), threshold, bits, size
        self.stage = 0                                   # index into STAGES; 4: done
        self.got: list[dict[int, bytes]] = [{}, {}, {}, {}]
        self.masked: dict[int, np.ndarray] = {}
        self.u1: list[int] = []
        self.u2: list[int] = []
        self.u3: list[int] = []

    def expecting(self) -> set[int]:
        """Clients whose message of the current stage is awaited."""
        allowed = [self.members, set(self.u1), set(self.u2), set(self.u3), set()][self.stage]
        return allowed - set(self.got[self.stage]) if self.stage < 4 else set()

    def receive(self, stage: str, u: int, msg: bytes) -> None:
        """File client ``u``'s message of ``stage``; anything unexpected or malformed raises
        ValueError (the round goes on without it)."""
        if stage not in STAGES or STAGES.index(stage) != self.stage:
            raise ValueError(f"secure aggregation is at {STAGES[self.stage] if self.stage < 4 else 'its end'}, "
                             f"not {stage}")
        if u not in self.expecting():
            raise ValueError(f"client {u} has no {stage} message due (duplicate or not a member)")
        check = (self._advertise, self._shares, self._masked, self._unmasking)[self.stage]
        check(u, msg)
        self.got[self.stage][u] = msg

    def _advertise(self, u: int, msg: bytes) -> None:
        if len(msg) != 68 or _U32.unpack_from(msg)[0] != u:
            raise ValueError("advertise_keys: 68 bytes starting with the sender's id expected")

    def _shares(self, u: int, msg: bytes) -> None:
        count = len(self.u1) - 1
        if len(msg) != 4 + count * (4 + CIPHER_BYTES) or _U32.unpack_from(msg)[0] != count:
            raise ValueError(f"share_keys: one share for each of the other {count} clients expected")
        to = [_U32.unpack_from(msg, 4 + i * (4 + CIPHER_BYTES))[0] for i in range(count)]
        if sorted(to) != [v for v in self.u1 if v != u]:
            raise ValueError("share_keys: shares must go to every other client of U1 once")

    def _masked(self, u: int, msg: bytes) -> None:
        if len(msg) != _HEADER.size + ring_bytes(self.size, self.bits):
            raise ValueError("masked_input: wrong size")
        magic, _, kind, b, _, sender, _, _, count = _HEADER.unpack_from(msg)
        if (magic, kind, b, sender, count) != (b"GSMR", KIND_MASKED, self.bits, u, self.size):
            raise ValueError(f"masked_input: malformed masked vector from {u}")
        self.masked[u] = unpack_ring(msg[_HEADER.size:], self.size, self.bits)

    def _unmasking(self, u: int, msg: bytes) -> None:
        entry = _ENTRY.size + SHARE_BYTES
        count = _U32.unpack_from(msg)[0] if len(msg) >= 4 else -1
        if count < 0 or len(msg) != 4 + count * entry:
            raise ValueError("unmasking: malformed answer")
        seen = set()
        for i in range(count):
            v, kind = _ENTRY.unpack_from(msg, 4 + i * entry)
            if v not in self.u2 or kind > 1 or v in seen or kind != (0 if v in self.u3 else 1):
                raise ValueError("unmasking: a share of the wrong kind or for a non-member")
            seen.add(v)

    def close(self) -> dict[int, bytes] | np.ndarray:
        """End the current stage: the server's message to each client of the next one, or,
        after unmasking, the sum of the survivors' inputs mod ``2^bits``. Fewer than
        ``threshold`` answers raise :class:`SecAggAbort`."""
        got, name = self.got[self.stage], STAGES[self.stage]
        if name == "masked_input":
            self.u3 = sorted(got)
        if len(got) < self.threshold:
            self.stage = 4
            raise SecAggAbort(f"{len(got)} clients answered {name}, threshold {self.threshold}")
        self.stage += 1
        if name == "advertise_keys":
            self.u1 = sorted(got)
            key_list = _U32.pack(len(self.u1)) + b"".join(got[u] for u in self.u1)
            return dict.fromkeys(self.u1, key_list)
        if name == "share_keys":
            self.u2 = sorted(got)
            routed: dict[int, list[bytes]] = {v: [] for v in self.u2}
            for u in self.u2:                     # the server routes ciphertexts it cannot read
                msg = got[u]
                for i in range(_U32.unpack_from(msg)[0]):
                    off = 4 + i * (4 + CIPHER_BYTES)
                    (v,) = _U32.unpack_from(msg, off)
                    if v in routed:
                        routed[v].append(_U32.pack(u) + msg[off + 4: off + 4 + CIPHER_BYTES])
            return {v: _U32.pack(len(routed[v])) + b"".join(routed[v]) for v in self.u2}
        if name == "masked_input":
            survivors = _U32.pack(len(self.u3)) + struct.pack(f"<{len(self.u3)}I", *self.u3)
            return dict.fromkeys(self.u3, survivors)
        return self._unmask(got)

    def _unmask(self, answers: dict[int, bytes]) -> np.ndarray:
        """Rebuild ``b_u`` of survivors and ``s_sk`` of dropped clients from ``threshold``
        answers, strip the self masks and the dropped clients' pairwise masks."""
        t, size, bits, adv = self.threshold, self.size, self.bits, self.got[0]
        helpers = sorted(answers)[:t]
        coeffs = lagrange_at_zero([v + 1 for v in helpers])
        shares: dict[tuple[int, int], list[int]] = {}
        for v in helpers:
            msg = answers[v]
            for i in range(_U32.unpack_from(msg)[0]):
                off = 4 + i * (_ENTRY.size + SHARE_BYTES)
                u, kind = _ENTRY.unpack_from(msg, off)
                y = int.from_bytes(msg[off + _ENTRY.size: off + _ENTRY.size + SHARE_BYTES], "little")
                shares.setdefault((u, kind), []).append(y)

        def secret(u: int, kind: int) -> bytes:
            ys = shares.get((u, kind), [])
            if len(ys) != t:
                raise ValueError(f"missing shares for client {u}")
            value = sum(c * y for c, y in zip(coeffs, ys, strict=True)) % PRIME
            if value >> 256:
                raise ValueError(f"shares of client {u} do not rebuild a 32-byte secret")
            return value.to_bytes(32, "little")

        total = np.zeros(size, dtype=np.uint64)
        for u in self.u3:
            total = total + self.masked[u] - prg(secret(u, 0), size, bits)
        for u in sorted(set(self.u2) - set(self.u3)):
            key = X25519PrivateKey.from_private_bytes(secret(u, 1))
            if public(key) != adv[u][36:68]:
                raise ValueError(f"reconstructed key of client {u} does not match its public key")
            for v in self.u3:                  # y_v holds +PRG(s_vu) if u > v, -PRG(s_vu) if u < v
                p = prg(agree(key, adv[v][36:68], b"mask"), size, bits)
                total = total - p if u > v else total + p
        return total & ring_mask(bits)


# --- a whole run in process (the simulator) ---------------------------------------------------
@dataclass
class SecAggResult:
    """A run: ``total`` (the sum of the survivors' inputs mod 2^bits; None if aborted), the
    survivors U3, the abort reason, per-client bytes ``sent``/``received`` per stage ``[n]``
    (clients in sorted id order), and what the server received: ``transcript`` (stage, sender,
    raw message) and the parsed masked vectors ``masked``. ``parties`` holds the clients'
    secrets, for checks only: the server never sees them."""

    clients: list[int]
    total: np.ndarray | None
    survivors: list[int]
    aborted: str | None
    sent: dict[str, np.ndarray]
    received: dict[str, np.ndarray]
    transcript: list[tuple[str, int, bytes]]
    masked: dict[int, np.ndarray]
    parties: dict[int, Client]


def run_protocol(inputs: dict[int, np.ndarray | None], *, threshold: int, bits: int,
                 dropouts: dict[int, str] | None = None, seed: int | list[int] | None = None,
                 round: int = 0) -> SecAggResult:
    """Run the four rounds for clients ``inputs`` (id -> encoded uint64 ``[P]``); a client in
    ``dropouts`` sends nothing from that stage on (``masked_input``: after sharing keys, its
    masked vector never arrives; ``unmasking``: it delivered it, then went silent)."""
    ids, dropouts = sorted(inputs), dropouts or {}
    if any(s not in STAGES for s in dropouts.values()):
        raise ValueError(f"dropout stages are {STAGES}")
    size = next(len(x) for x in inputs.values() if x is not None)
    rand = Randomness(seed)
    pos = {u: i for i, u in enumerate(ids)}
    sent = {s: np.zeros(len(ids), dtype=np.int64) for s in STAGES}
    recv = {s: np.zeros(len(ids), dtype=np.int64) for s in STAGES}
    transcript: list[tuple[str, int, bytes]] = []
    clients = {u: Client.new(u, inputs[u], rand) for u in ids}
    server = SecAggServer(ids, threshold=threshold, bits=bits, size=size)
    client_steps = (advertise_keys,
                    lambda c, m: share_keys(c, m, threshold, rand),
                    lambda c, m: masked_input(c, m, bits, round),
                    lambda c, m: unmasking(c, m, threshold))
    to_clients: dict[int, bytes] = dict.fromkeys(ids, b"")
    for k, stage in enumerate(STAGES):
        for u in sorted(to_clients):
            if u in dropouts and STAGES.index(dropouts[u]) <= k:
                continue
            msg = client_steps[k](clients[u]) if k == 0 else client_steps[k](clients[u], to_clients[u])
            sent[stage][pos[u]] += len(msg)
            transcript.append((stage, u, msg))
            server.receive(stage, u, msg)
        try:
            out = server.close()
        except SecAggAbort as exc:
            return SecAggResult(ids, None, server.u3, str(exc), sent, recv, transcript,
                                server.masked, clients)
        if k == 3:
            return SecAggResult(ids, out, server.u3, None, sent, recv, transcript, server.masked, clients)
        for u, msg in out.items():
            recv[stage][pos[u]] += len(msg)
        to_clients = out
    raise AssertionError("unreachable")


# --- FedAvg's weighted mean through the protocol ------------------------------------------------
@dataclass
class SecureMean:
    """The survivors' weighted mean update (None if the round aborted), bytes per member
    (``sent``/``received``, summed over the rounds), coordinates clipped, the threshold, and
    ``error_bound``: the largest fixed-point error of any coordinate of ``mean``."""

    mean: np.ndarray | None
    sent: np.ndarray
    received: np.ndarray
    clipped: int
    threshold: int
    error_bound: float
    aborted: str | None


def member_shares(weights: np.ndarray) -> np.ndarray:
    """Each member's share ``a_i = w_i / sum(w)`` of the weighted mean (public)."""
    return np.asarray(weights, dtype=np.float64) / float(np.sum(weights))


def secure_mean(members: np.ndarray, updates: np.ndarray, have: np.ndarray, survivors: np.ndarray,
                weights: np.ndarray, *, threshold: int | float, bits: int, clip: float,
                seed: int | list[int] | None = None, round: int = 0) -> SecureMean:
    """``sum_i w_i x_i / sum_i w_i`` over ``survivors`` through :func:`run_protocol`.

    ``members`` ``[n]`` ran the key rounds (U1), ``updates`` ``[len(have), P]`` are the updates
    of the members ``have`` that trained, ``weights`` ``[n]`` are public (FedAvg's sample
    counts). Member ``i`` encodes ``a_i clip(x_i)`` with ``a_i = w_i / sum(w)``, so any subset's
    sum lies in ``[-clip, clip]``; the server divides the sum by the survivors' ``sum a_i``.
    Members not in ``survivors`` drop after sharing keys.
    """
    n, t = len(members), threshold_count(threshold, len(members))
    a = member_shares(weights)
    at = {int(u): i for i, u in enumerate(members)}
    inputs: dict[int, np.ndarray | None] = dict.fromkeys(at)
    clipped = 0
    for row, u in enumerate(have.tolist()):
        inputs[u], c = encode_input(updates[row], a[at[u]], n, clip=clip, bits=bits)
        clipped += c
    alive = set(survivors.tolist())
    drops = {u: "masked_input" for u in at if u not in alive}
    res = run_protocol(inputs, threshold=t, bits=bits, dropouts=drops, seed=seed, round=round)
    sent = sum(res.sent.values())
    received = sum(res.received.values())
    mean = None if res.total is None else decode_mean(res.total, a[[at[u] for u in res.survivors]],
                                                      n, clip=clip, bits=bits)
    scale = fixed_point_scale(bits, clip, n)
    share = float(sum(a[at[u]] for u in res.survivors)) or 1.0
    return SecureMean(mean, sent, received, clipped, t, 0.5 * len(res.survivors) / scale / share,
                      res.aborted)


def decode_mean(total: np.ndarray, survivor_shares: np.ndarray, members: int, *, clip: float,
                bits: int) -> np.ndarray:
    """The weighted mean from the survivors' ring sum: decode, divide by their ``sum a_i``."""
    share = float(sum(survivor_shares)) or 1.0
    return decode(total, fixed_point_scale(bits, clip, members), bits) / share
