"""Datasets and partitioners: what each node trains on."""

# clicks, graph, leaf, offline, synthetic, tables, text and vision are imported for their registrations.
from gossamer.data import clicks, graph, leaf, offline, synthetic, tables, text, vision  # noqa: F401
from gossamer.data.datasets import DATASETS, Dataset, cache_dir, load_dataset
from gossamer.data.partition import PARTITIONERS, partition, relay_nodes

__all__ = [
    "DATASETS",
    "PARTITIONERS",
    "Dataset",
    "cache_dir",
    "load_dataset",
    "partition",
    "relay_nodes",
]
