"""Registered populations that cost nothing until they act (docs/scale.md).

A lazy population of N clients stores nothing of length N: per-client sample counts, data,
device and link profiles are pure functions of (seed, client id) drawn when a client is
selected (:mod:`.clients`, :mod:`.profiles`); per-client values that change (task counts,
bytes, participation) are :class:`~.columns.SparseColumn` s holding only clients that have
acted; per-client state rows (SCAFFOLD's control variates, error feedback) live in a
:class:`~.store.ClientStore` with a memory budget that spills to disk.
"""

from gossamer.population.columns import Everyone, SparseColumn
from gossamer.population.store import ClientStore

__all__ = ["ClientStore", "Everyone", "SparseColumn"]
