"""Secure aggregation: the server learns the sum of the clients' vectors and nothing else.

Bonawitz, Ivanov, Kreuter, et al., "Practical Secure Aggregation for Privacy-Preserving Machine
Learning", CCS 2017 (earlier version: arXiv:1611.04482). The semi-honest variant (no signatures,
no consistency-check round), simulated with real cryptography and real message bytes:

- fixed point: a float ``v`` with ``|sum of the values| <= bound`` becomes ``rint(v * scale)``
  in the ring ``Z_{2^bits}`` (two's complement); :func:`fixed_point_scale` leaves room for the
  rounding of ``n`` clients, so the sum never wraps;
- Shamir ``t``-of-``n`` secret sharing over the prime field ``p = 2^521 - 1`` (x = client id + 1);
- X25519 key agreement, SHA-256 of the shared secret as the seed; AES-256-CTR as the PRG;
  AES-256-GCM encrypts the shares one client sends another through the server;
- the rounds AdvertiseKeys -> ShareKeys -> MaskedInputCollection -> Unmasking, each a client
  function from the server's last message (bytes) to the client's next message (bytes).

The server's side is :class:`gossamer.privacy.secagg_server.SecAggServer`, a state machine
fed one client message at a time (the simulator's :func:`~gossamer.privacy.secagg_server.run_protocol`
and the runtime coordinator both drive it); :func:`~gossamer.privacy.secagg_server.secure_mean`
is the weighted FedAvg mean through it (docs/privacy.md).
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

PRIME = (1 << 521) - 1                     # a Mersenne prime: shares of 32-byte secrets
SHARE_BYTES = 66
KEY_BYTES = 32
STAGES = ("advertise_keys", "share_keys", "masked_input", "unmasking")
KIND_MASKED = 3                            # wire header kind of a masked vector
_U32, _ENTRY = struct.Struct("<I"), struct.Struct("<IB")
_HEADER = struct.Struct("<4sBBBBIIIQ")     # the 28-byte header of gossamer.wire
_NONCE, _TAG = 12, 16
CIPHER_BYTES = _NONCE + 8 + 2 * SHARE_BYTES + _TAG     # nonce | enc(u, v, s share, b share) | tag


# --- fixed point in Z_{2^bits} ---------------------------------------------------------------
def ring_mask(bits: int) -> np.uint64:
    return np.uint64((1 << bits) - 1)


def fixed_point_scale(bits: int, bound: float, n: int) -> float:
    """Scale such that ``n`` rounded values whose exact sum lies in ``[-bound, bound]`` sum to
    less than ``2^(bits-1)`` in magnitude (each rounding adds at most 1/2)."""
    room = (1 << (bits - 1)) - 1 - (n + 1) // 2
    if not 2 <= bits <= 62 or room < 1 or bound <= 0:
        raise ValueError(f"a {bits}-bit ring cannot hold the sum of {n} clients")
    return room / bound


def encode(values: np.ndarray, scale: float, bits: int) -> np.ndarray:
    """Floats -> ring elements (uint64 < 2^bits): ``rint(v * scale) mod 2^bits``."""
    q = np.rint(np.asarray(values, dtype=np.float64) * scale).astype(np.int64)
    return q.astype(np.uint64) & ring_mask(bits)


def decode(elements: np.ndarray, scale: float, bits: int) -> np.ndarray:
    """Ring elements -> floats, reading the top half of the ring as negative."""
    signed = (np.asarray(elements, dtype=np.uint64) & ring_mask(bits)).astype(np.int64)
    signed = np.where(signed >= (1 << (bits - 1)), signed - (1 << bits), signed)
    return signed / scale


def ring_bytes(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


def pack_ring(v: np.ndarray, bits: int) -> bytes:
    """``bits``-bit elements, little-endian, bit-packed (least significant bit first)."""
    if bits in (8, 16, 32, 64):
        return np.asarray(v).astype(f"<u{bits // 8}").tobytes()
    shifts = np.arange(bits, dtype=np.uint64)
    flat = ((np.asarray(v, dtype=np.uint64)[:, None] >> shifts) & np.uint64(1)).astype(np.uint8)
    return np.packbits(flat.reshape(-1), bitorder="little").tobytes()


def unpack_ring(buf: bytes, count: int, bits: int) -> np.ndarray:
    if len(buf) != ring_bytes(count, bits):
        raise ValueError(f"masked vector of {len(buf)} bytes, expected {ring_bytes(count, bits)}")
    if bits in (8, 16, 32, 64):
        return np.frombuffer(buf, dtype=f"<u{bits // 8}").astype(np.uint64)
    flat = np.unpackbits(np.frombuffer(buf, dtype=np.uint8), bitorder="little")[: count * bits]
    return flat.reshape(count, bits).astype(np.uint64) @ (np.uint64(1) << np.arange(bits, dtype=np.uint64))


# --- randomness, Shamir, key agreement, PRG ---------------------------------------------------
class Randomness:
    """Secret randomness: ``os.urandom``, or reproducible bytes from ``seed`` (simulation)."""

    def __init__(self, seed: int | list[int] | None = None) -> None:
        self._gen = None if seed is None else np.random.default_rng(seed)

    def bytes(self, n: int) -> bytes:
        return os.urandom(n) if self._gen is None else self._gen.bytes(n)


def _field_element(rand: Randomness) -> int:
    while True:                                          # rejection: uniform in [0, p)
        v = int.from_bytes(rand.bytes(SHARE_BYTES), "little") & PRIME
        if v < PRIME:
            return v


def shamir_split(secret: int, threshold: int, xs: list[int], rand: Randomness) -> list[int]:
    """Shares ``f(x)`` for ``x`` in ``xs`` of a random degree-``threshold - 1`` polynomial with
    ``f(0) = secret`` over ``GF(p)``: any ``threshold`` shares give the secret, fewer nothing."""
    if not 1 <= threshold <= len(xs) or len(set(xs)) != len(xs) or any(x % PRIME == 0 for x in xs):
        raise ValueError("need 1 <= threshold <= len(xs) distinct nonzero points")
    if not 0 <= secret < PRIME:
        raise ValueError("secret outside the field")
    coeffs = [secret] + [_field_element(rand) for _ in range(threshold - 1)]
    shares = []
    for x in xs:
        y = 0
        for c in reversed(coeffs):
            y = (y * x + c) % PRIME
        shares.append(y)
    return shares


def lagrange_at_zero(xs: list[int]) -> list[int]:
    """Coefficients ``l_i`` with ``f(0) = sum_i l_i f(x_i)`` for polynomials of degree < len(xs)."""
    out = []
    for i, xi in enumerate(xs):
        num = den = 1
        for j, xj in enumerate(xs):
            if j != i:
                num, den = num * xj % PRIME, den * (xj - xi) % PRIME
        out.append(num * pow(den, -1, PRIME) % PRIME)
    return out


def shamir_reconstruct(xs: list[int], ys: list[int]) -> int:
    return sum(c * y for c, y in zip(lagrange_at_zero(xs), ys, strict=True)) % PRIME


def new_key(rand: Randomness) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(rand.bytes(KEY_BYTES))


def public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def agree(key: X25519PrivateKey, peer_public: bytes, purpose: bytes) -> bytes:
    """X25519 shared secret of two parties, hashed with its purpose into a 32-byte seed."""
    shared = key.exchange(X25519PublicKey.from_public_bytes(peer_public))
    return hashlib.sha256(b"gossamer-secagg/" + purpose + shared).digest()


def prg(seed: bytes, size: int, bits: int) -> np.ndarray:
    """``size`` uniform ring elements from a 32-byte seed (AES-256-CTR keystream)."""
    width = 4 if bits <= 32 else 8
    stream = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor().update(bytes(width * size))
    return np.frombuffer(stream, dtype=f"<u{width}").astype(np.uint64) & ring_mask(bits)


# --- the protocol's rounds: clients ------------------------------------------------------------
@dataclass
class Client:
    """One client's secrets and what it learned: ``c`` encrypts shares, ``s`` seeds pairwise
    masks, ``b`` seeds the self mask (double masking)."""

    id: int
    x: np.ndarray | None                               # encoded input, uint64 [P]
    c_key: X25519PrivateKey
    s_key: X25519PrivateKey
    b_seed: bytes
    keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)   # v -> (c_pk, s_pk)
    held: dict[int, tuple[int, int]] = field(default_factory=dict)      # u -> (s share, b share)
    u2: list[int] = field(default_factory=list)

    @classmethod
    def new(cls, cid: int, x: np.ndarray | None, rand: Randomness) -> Client:
        return cls(cid, x, new_key(rand), new_key(rand), rand.bytes(KEY_BYTES))


def advertise_keys(client: Client) -> bytes:
    """Round 0: ``id | c_pk | s_pk`` (68 bytes)."""
    return _U32.pack(client.id) + public(client.c_key) + public(client.s_key)


def share_keys(client: Client, key_list: bytes, threshold: int, rand: Randomness) -> bytes:
    """Round 1: Shamir-share ``s_sk`` and ``b`` among all of U1 (itself included) and send each
    other client its two shares, AES-GCM encrypted under their ``c`` agreement."""
    (count,) = _U32.unpack_from(key_list)
    for i in range(count):
        off = 4 + i * 68
        (v,) = _U32.unpack_from(key_list, off)
        client.keys[v] = (key_list[off + 4: off + 36], key_list[off + 36: off + 68])
    u1 = sorted(client.keys)
    if len(u1) < threshold or client.id not in client.keys:
        raise ValueError("key list below the threshold or without this client")
    xs = [v + 1 for v in u1]
    s_sh = shamir_split(int.from_bytes(client.s_key.private_bytes_raw(), "little"), threshold, xs, rand)
    b_sh = shamir_split(int.from_bytes(client.b_seed, "little"), threshold, xs, rand)
    out = [_U32.pack(len(u1) - 1)]
    for v, s, b in zip(u1, s_sh, b_sh, strict=True):
        if v == client.id:
            client.held[v] = (s, b)
            continue
        plain = struct.pack("<II", client.id, v) + s.to_bytes(SHARE_BYTES, "little") \
            + b.to_bytes(SHARE_BYTES, "little")
        nonce = rand.bytes(_NONCE)
        key = agree(client.c_key, client.keys[v][0], b"share-encryption")
        out.append(_U32.pack(v) + nonce + AESGCM(key).encrypt(nonce, plain, None))
    return b"".join(out)


def pairwise_mask(client: Client, size: int, bits: int) -> np.ndarray:
    """``sum_{v>u} PRG(s_uv) - sum_{v<u} PRG(s_uv)`` over the others in U2 (mod 2^bits)."""
    total = np.zeros(size, dtype=np.uint64)
    for v in client.u2:
        if v != client.id:
            p = prg(agree(client.s_key, client.keys[v][1], b"mask"), size, bits)
            total = total + p if v > client.id else total - p      # uint64 wraps: mod 2^64
    return total & ring_mask(bits)


def masked_input(client: Client, forwarded: bytes, bits: int, round: int = 0) -> bytes:
    """Round 2: decrypt the shares received, then send ``y_u = x_u + PRG(b_u) + pairwise``."""
    (count,) = _U32.unpack_from(forwarded)
    client.u2 = [client.id]
    for i in range(count):
        off = 4 + i * (4 + CIPHER_BYTES)
        (u,) = _U32.unpack_from(forwarded, off)
        nonce, body = forwarded[off + 4: off + 16], forwarded[off + 16: off + 4 + CIPHER_BYTES]
        plain = AESGCM(agree(client.c_key, client.keys[u][0], b"share-encryption")).decrypt(nonce, body, None)
        if struct.unpack_from("<II", plain) != (u, client.id):
            raise ValueError(f"share from {u} addressed to someone else")
        client.held[u] = (int.from_bytes(plain[8: 8 + SHARE_BYTES], "little"),
                          int.from_bytes(plain[8 + SHARE_BYTES:], "little"))
        client.u2.append(u)
    client.u2.sort()
    size = len(client.x)
    y = (client.x + prg(client.b_seed, size, bits) + pairwise_mask(client, size, bits)) & ring_mask(bits)
    header = _HEADER.pack(b"GSMR", 1, KIND_MASKED, bits, 0, client.id, round, 0, size)
    return header + pack_ring(y, bits)


def unmasking(client: Client, survivors: bytes, threshold: int) -> bytes:
    """Round 3: for each ``u`` in U2, the share of ``b_u`` if ``u`` survived (kind 0), else of
    its ``s_sk`` (kind 1); never both, so no ``x_u`` is ever unmasked."""
    (count,) = _U32.unpack_from(survivors)
    u3 = set(struct.unpack_from(f"<{count}I", survivors, 4))
    if len(u3) < threshold:
        raise ValueError("fewer survivors than the threshold")
    out = [_U32.pack(len(client.u2))]
    for u in client.u2:
        kind = 0 if u in u3 else 1
        out.append(_ENTRY.pack(u, kind) + client.held[u][1 - kind].to_bytes(SHARE_BYTES, "little"))
    return b"".join(out)


def threshold_count(threshold: int | float, n: int) -> int:
    """A count as given, or ``max(2, ceil(fraction * n))``."""
    return threshold if isinstance(threshold, int) else max(2, math.ceil(threshold * n - 1e-9))


def encode_input(update: np.ndarray, share: float, members: int, *, clip: float, bits: int
                 ) -> tuple[np.ndarray, int]:
    """A member's ring input for the weighted mean: ``encode(share * clip(update))`` with the
    fixed-point scale of ``members`` clients; returns it and the coordinates clipped."""
    clipped = np.clip(update, -clip, clip)
    scale = fixed_point_scale(bits, clip, members)
    return encode(share * clipped, scale, bits), int((clipped != update).sum())


def check_config(cfg, algorithm, num_nodes: int) -> None:
    """Refuse, in one line naming the field, what secure aggregation cannot run with."""
    from gossamer.config import ConfigError

    sa, field_ = cfg.privacy.secure_aggregation, "privacy.secure_aggregation"
    if algorithm.pattern != "sync_fl":
        raise ConfigError(field_, f"secure aggregation runs with synchronous FL; "
                          f"{cfg.algorithm.name} is {algorithm.pattern}")
    if algorithm.split_roles or algorithm.upload_vectors != 1:
        raise ConfigError(field_, f"{cfg.algorithm.name} uploads more than one model update; "
                          "secure aggregation sums model updates only")
    if algorithm.aggregator != "mean":
        raise ConfigError(field_, "a robust aggregator needs the individual updates, which "
                          "secure aggregation hides (use aggregator: mean)")
    if algorithm.momentum_beta is not None:           # every sync_fl algorithm is a FedAvg
        raise ConfigError(field_, "momentum_beta needs each client's update and step count; "
                          "secure aggregation reveals only the sum")
    if cfg.compression.uplink is not None:
        raise ConfigError(field_, "compressed uploads are not ring elements: secure aggregation "
                          "does not combine with compression.uplink")
    try:
        fixed_point_scale(sa.bits, sa.clip, num_nodes)
    except ValueError as exc:
        raise ConfigError(f"{field_}.bits", str(exc)) from None
