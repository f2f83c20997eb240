"""Partitioners: split training rows among nodes (IID, label skew, shards, quantity skew, natural).

A partitioner is `fn(labels, num_nodes, seed, **params) -> list of int64 index arrays`, one per
node, each row used at most once. `partition` adds relay-only nodes (nodes without data).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from gossamer.data.datasets import check_params
from gossamer.registry import Registry

Partitioner = Callable[..., list[np.ndarray]]
PARTITIONERS: Registry[Partitioner] = Registry("partitioner")


def partition(
    name: str,
    labels: np.ndarray,
    num_nodes: int,
    seed: int,
    relay_fraction: float = 0.0,
    data_nodes: int | None = None,
    **params: object,
) -> list[np.ndarray]:
    """Split rows `0..len(labels)-1` among `num_nodes` nodes with the partitioner `name`.

    floor(relay_fraction * num_nodes) nodes (or num_nodes - data_nodes) are relay-only and get
    empty arrays; they are `sorted(default_rng([seed, 1]).choice(num_nodes, r, replace=False))`,
    a stream apart from the partitioner's, so relays never change which rows the data nodes get.
    The data nodes receive the partitioner's arrays in increasing node id.
    """
    try:
        partitioner = PARTITIONERS.get(name)
    except KeyError as err:
        raise ValueError(err.args[0]) from None
    check_params(f"partitioner {name!r}", partitioner, params, skip=("labels", "num_nodes", "seed"))
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"partition labels must be a 1-D integer array, got {labels.dtype} {labels.shape}"
        )
    if not _is_int(num_nodes) or num_nodes < 1:
        raise ValueError(f"num_nodes must be a positive integer, got {num_nodes!r}")
    if not _is_int(seed) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    num_nodes, seed = int(num_nodes), int(seed)
    relays = relay_nodes(num_nodes, seed, relay_fraction, data_nodes)
    holders = np.setdiff1d(np.arange(num_nodes), relays)
    if name != "natural" and len(holders) > len(labels):
        raise ValueError(f"{len(holders)} data-holding nodes but only {len(labels)} samples")
    parts = partitioner(labels, len(holders), seed, **params)
    result = [np.empty(0, dtype=np.int64) for _ in range(num_nodes)]
    for node, part in zip(holders, parts, strict=True):
        result[node] = np.asarray(part, dtype=np.int64)
    return result


def split_local_test(shards: list[np.ndarray], fraction: float, seed: int
                     ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each node's rows split into its training rows and its own test rows (personalized FL
    evaluates every client on data like its own): ``round(fraction * n)`` of a node's ``n``
    rows, at least 1 and at most ``n - 1`` when it has 2 or more (a node with fewer keeps its
    row for training), drawn by the permutation ``default_rng([seed, 7, node])``; both keep the
    partitioner's order."""
    if not 0 < fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {fraction!r}")
    train, test = [], []
    for node, rows in enumerate(shards):
        n = len(rows)
        k = min(n - 1, max(1, int(round(fraction * n)))) if n >= 2 else 0
        pick = np.zeros(n, dtype=bool)
        pick[np.random.default_rng([seed, 7, node]).permutation(n)[:k]] = True
        train.append(rows[~pick])
        test.append(rows[pick])
    return train, test


def relay_nodes(
    num_nodes: int, seed: int, relay_fraction: float = 0.0, data_nodes: int | None = None
) -> np.ndarray:
    """Sorted ids of the relay-only nodes (see `partition`); at least one node keeps data."""
    if data_nodes is not None and relay_fraction:
        raise ValueError("give relay_fraction or data_nodes, not both")
    if data_nodes is None:
        if not 0.0 <= relay_fraction < 1.0:
            raise ValueError(f"relay_fraction must be in [0, 1), got {relay_fraction!r}")
        data_nodes = num_nodes - int(np.floor(relay_fraction * num_nodes))
    if not 1 <= data_nodes <= num_nodes:
        raise ValueError(f"data_nodes must be in 1..{num_nodes}, got {data_nodes!r}")
    num_relays = num_nodes - data_nodes
    if num_relays == 0:
        return np.empty(0, dtype=np.int64)
    rng = np.random.default_rng([seed, 1])
    return np.sort(rng.choice(num_nodes, num_relays, replace=False)).astype(np.int64)


@PARTITIONERS.register("iid")
def iid(labels: np.ndarray, num_nodes: int, seed: int) -> list[np.ndarray]:
    """RandomState(seed).permutation(S) cut into num_nodes contiguous chunks, order kept (DESIGN.md)."""
    order = np.random.RandomState(seed).permutation(len(labels)).astype(np.int64)
    return list(np.array_split(order, num_nodes))


@PARTITIONERS.register("dirichlet")
def dirichlet(
    labels: np.ndarray,
    num_nodes: int,
    seed: int,
    alpha: float = 0.5,
    min_size: int = 1,
    max_tries: int = 1000,
) -> list[np.ndarray]:
    """Label skew of Hsu et al. 2019 (arXiv:1909.06335): each class is split over nodes by Dir(alpha).

    Per-class draws over nodes, as in the widely used FedMA / NIID-Bench code. Draws repeat
    until every node holds >= min_size rows; each node's rows are then shuffled.
    """
    _check_positive("alpha", alpha)
    rng = np.random.RandomState(seed)
    classes = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    class_sizes = np.array([len(c) for c in classes])
    for _ in range(max_tries):
        proportions = rng.dirichlet(np.full(num_nodes, float(alpha)), size=len(classes))
        cuts = (np.cumsum(proportions, axis=1) * class_sizes[:, None]).astype(np.int64)
        cuts[:, -1] = class_sizes
        counts = np.diff(cuts, axis=1, prepend=0)
        if counts.sum(axis=0).min() >= min_size:
            break
    else:
        raise ValueError(
            f"dirichlet: no draw in {max_tries} tries gave all {num_nodes} nodes >= {min_size} samples; "
            "raise alpha, or lower min_size (0 allows empty nodes) or the number of nodes"
        )
    pieces = [
        np.split(rng.permutation(rows), cut[:-1]) for rows, cut in zip(classes, cuts, strict=True)
    ]
    return [rng.permutation(np.concatenate([p[node] for p in pieces])) for node in range(num_nodes)]


@PARTITIONERS.register("shards")
def shards(
    labels: np.ndarray, num_nodes: int, seed: int, shards_per_node: int = 2
) -> list[np.ndarray]:
    """Pathological non-IID split of McMahan et al. 2017 (arXiv:1602.05629).

    Rows sorted by label are cut into num_nodes * shards_per_node equal shards, dealt at random.
    A shard spans two labels when class sizes are not multiples of the shard size.
    """
    if shards_per_node < 1 or num_nodes * shards_per_node > len(labels):
        raise ValueError(
            f"shards: need 1 <= shards_per_node and num_nodes * shards_per_node <= {len(labels)} samples, got {shards_per_node!r}"
        )
    rng = np.random.RandomState(seed)
    pieces = np.array_split(np.argsort(labels, kind="stable"), num_nodes * shards_per_node)
    dealt = rng.permutation(len(pieces)).reshape(num_nodes, shards_per_node)
    return [np.concatenate([pieces[s] for s in row]).astype(np.int64) for row in dealt]


@PARTITIONERS.register("quantity_skew")
def quantity_skew(
    labels: np.ndarray, num_nodes: int, seed: int, alpha: float = 0.5, min_size: int = 1
) -> list[np.ndarray]:
    """IID rows, unequal sizes: quantity skew of Li et al. 2022 (arXiv:2102.02079).

    Each node first gets min_size rows; the other S - num_nodes * min_size rows are shared by
    proportions ~ Dir(alpha) over nodes (small alpha: very unequal; large alpha: near equal).
    """
    _check_positive("alpha", alpha)
    spare = len(labels) - num_nodes * min_size
    if min_size < 0 or spare < 0:
        raise ValueError(
            f"quantity_skew: min_size={min_size!r} x {num_nodes} nodes needs 0 <= total <= {len(labels)} samples"
        )
    rng = np.random.RandomState(seed)
    shares = np.cumsum(rng.dirichlet(np.full(num_nodes, float(alpha))))
    cuts = (shares * spare).astype(np.int64) + min_size * np.arange(1, num_nodes + 1)
    cuts[-1] = len(labels)
    return np.split(rng.permutation(len(labels)).astype(np.int64), cuts[:-1])


@PARTITIONERS.register("natural")
def natural_split(
    labels: np.ndarray, num_nodes: int, seed: int, natural: list[np.ndarray] | None = None
) -> list[np.ndarray]:
    """The dataset's own split (e.g. users of Synthetic or LEAF); one user per data-holding node."""
    if natural is None:
        raise ValueError("natural: this dataset has no natural partition (pass natural=...)")
    if len(natural) != num_nodes:
        raise ValueError(
            f"natural: the dataset has {len(natural)} users but {num_nodes} data-holding nodes; "
            f"set partition.num_nodes to {len(natural)} (plus any relay-only nodes), one per user"
        )
    parts = [np.asarray(p, dtype=np.int64).reshape(-1) for p in natural]
    rows = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
    if rows.size and (
        rows.min() < 0 or rows.max() >= len(labels) or len(np.unique(rows)) != rows.size
    ):
        raise ValueError(f"natural: indices must be distinct and in 0..{len(labels) - 1}")
    return parts


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_positive(field: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise ValueError(f"{field} must be a number, got {value!r}")
    if not value > 0:
        raise ValueError(f"{field} must be > 0, got {value!r}")
    if not np.isfinite(value):
        raise ValueError(f"{field} must be finite, got {value!r}")
