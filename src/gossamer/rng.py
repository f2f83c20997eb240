"""Counter-based randomness: every random draw is a pure function of (seed, stream, keys).

Stateless streams make runs reproducible, resumable without saving generator state, and
identical between the simulator (all nodes at once) and the runtime (one node per process):
node ``i`` draws the same numbers whichever executor asks.
"""

from __future__ import annotations

import numpy as np

# Stream ids: one per purpose, so that adding draws for one purpose never shifts another.
STREAM_DATA_ORDER = 1
STREAM_SELECT = 2
STREAM_SYSTEM = 3
STREAM_AVAILABILITY = 4
STREAM_GOSSIP = 5
STREAM_INIT = 6
STREAM_EVAL = 7
STREAM_FAULTS = 8
STREAM_ATTACK = 9
STREAM_SAMPLE = 10      # decentralized sampling (MoDeST)
STREAM_ASYNC_FL = 11    # asynchronous FL dispatch choices
STREAM_ANARCHIC = 12    # anarchic FL: clients' own think times and local step counts
STREAM_RANDOM_WALK = 20  # random-walk learning: token start nodes and hops
STREAM_GOSSIP_COMPUTE = 21  # asynchronous gossip: the computation clock of dual-clock nodes
STREAM_COMPRESS = 22    # compressors: random-k indices, stochastic rounding, PowerSGD init
STREAM_DP = 23          # differential privacy: Gaussian noise of DP-FedAvg and DP-SGD
STREAM_ZO = 24          # zeroth-order FL: shared perturbation directions and code rounding
STREAM_CONTRIB = 25     # contribution scores: the Monte Carlo Shapley orders
STREAM_POPULATION = 26  # registered populations: each client's sample count and data
STREAM_CLICKS = 27      # G-Rank: the click model's world, queries, clicks, swaps and gossip
STREAM_PRETRAIN = 40    # the public pre-training set (partition.public_fraction) and its order

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer (Steele et al. 2014), applied elementwise to uint64."""
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def hash_u64(seed: int, stream: int, *keys: np.ndarray | int) -> np.ndarray:
    """Mix ``seed``, ``stream`` and broadcastable integer ``keys`` into uint64 hashes."""
    one = _one_cell(keys)
    if one is not None:                   # one hash: Python ints cost far less than numpy's calls
        shape, ints = one
        h = _splitmix64_int((int(seed) ^ (int(stream) << 48)) & _MASK)
        for key in ints:
            h = _splitmix64_int(h ^ key)
        return np.full(shape, h, dtype=np.uint64)
    with np.errstate(over="ignore"):
        h = _splitmix64(np.asarray([seed], dtype=np.uint64) ^ (np.uint64(stream) << np.uint64(48)))
        for key in keys:
            h = _splitmix64(h ^ np.asarray(key).astype(np.uint64))
    return h


def uniform(seed: int, stream: int, *keys: np.ndarray | int) -> np.ndarray:
    """Uniform floats in [0, 1) (53 random bits), one per broadcast key combination."""
    h = hash_u64(seed, stream, *keys)
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def generator(seed: int, stream: int, *keys: int) -> np.random.Generator:
    """A numpy Generator for one (seed, stream, keys) cell, e.g. client selection in a round."""
    return np.random.default_rng([int(seed), int(stream), *(int(k) for k in keys)])


_MASK = (1 << 64) - 1


def _splitmix64_int(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def _one_cell(keys: tuple) -> tuple[tuple[int, ...], list[int]] | None:
    """When integer ``keys`` broadcast to one cell: its shape and the keys as uint64 values
    (wrapped as numpy's ``astype(np.uint64)`` wraps them); None otherwise."""
    shape: tuple[int, ...] = (1,)
    ints = []
    for key in keys:
        if isinstance(key, (int, np.integer)):
            ints.append(int(key) & _MASK)
        elif isinstance(key, np.ndarray) and key.size == 1 and key.dtype.kind in "iub":
            ints.append(int(key.reshape(-1)[0]) & _MASK)
            if key.ndim > len(shape):
                shape = (1,) * key.ndim
        else:
            return None
    return shape, ints


def uniform_scalar(seed: int, stream: int, *keys: int) -> float:
    """Scalar twin of :func:`uniform` in pure Python (same value, far less overhead per call)."""
    h = _splitmix64_int((seed ^ (stream << 48)) & _MASK)
    for key in keys:
        h = _splitmix64_int(h ^ (key & _MASK))
    return (h >> 11) * (1.0 / (1 << 53))
