"""A stochastic-block-model graph split into client subgraphs, for node classification.

Each client's data is its whole subgraph as one sample (``models/graph.py`` packs it as the
normalized adjacency and the node features, zero-padded to the largest client), trained
full-batch as FED-PUB's clients do (Jinheon Baek, Wonyong Jeong, Jiongdao Jin, et al.,
"Personalized Subgraph Federated Learning", ICML 2023, arXiv:2206.10206). Its labels are one
per node, ``-1`` where a node is not a target: client ``c``'s training row ``c`` labels its
training nodes, its test row ``K + c`` the same subgraph's held-out nodes (the dataset's
``local_tests``: each client's own test split). The shared test set is every client's test row.
"""

from __future__ import annotations

import numpy as np
import torch

from gossamer.data.datasets import DATASETS, Dataset
from gossamer.models.graph import normalized_adjacency, pack_graph


def sbm_graph(nodes: int, communities: int, classes: int, p_in: float, p_out: float,
              homophily: float, label_alpha: float, features: int, noise: float, groups: int,
              seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The whole graph: adjacency ``[n, n]`` (bool, symmetric, no self loops), features
    ``[n, F]``, labels ``[n]`` and communities ``[n]``.

    Node ``v`` is in community ``v * communities // nodes`` (contiguous blocks). Each community
    draws its class proportions from Dirichlet(``label_alpha``) and its nodes' labels from them
    (communities are label-skewed). Two nodes of one community are linked with probability
    ``p_in`` when they share a label and ``p_in * (1 - homophily)`` otherwise; nodes of
    different communities with ``p_out``. Features are the label's mean plus ``noise`` N(0, 1);
    the means are N(0, 1) vectors, and in the ``g``-th of ``groups`` contiguous groups of
    communities label ``k`` takes the mean of label ``(k + g) % classes`` (the same features
    mean different labels in different groups: a task no single model fits for every client).
    """
    rng = np.random.default_rng([seed, 19, 0])
    community = np.arange(nodes) * communities // nodes
    mix = rng.dirichlet(np.full(classes, label_alpha), communities)
    labels = (rng.random(nodes)[:, None] > np.cumsum(mix[community], axis=1)).sum(1)
    labels = np.minimum(labels, classes - 1)
    same_c = community[:, None] == community[None, :]
    same_y = labels[:, None] == labels[None, :]
    prob = np.where(same_c, np.where(same_y, p_in, p_in * (1 - homophily)), p_out)
    upper = np.triu(rng.random((nodes, nodes)) < prob, k=1)
    adj = upper | upper.T
    means = rng.standard_normal((classes, features))
    group = community * groups // communities
    x = means[(labels + group) % classes] + noise * rng.standard_normal((nodes, features))
    return adj, x.astype(np.float32), labels.astype(np.int64), community


def client_nodes(nodes: int, num_clients: int, overlap: bool, seed: int) -> list[np.ndarray]:
    """Each client's nodes (sorted). Non-overlapping: ``num_clients`` contiguous blocks of the
    community-ordered nodes (each client takes one or a few communities, as a METIS split
    would). Overlapping (FED-PUB's setting): ``max(1, round(num_clients / 5))`` contiguous
    parts, and each client a random half of its part's nodes, so clients of a part share nodes."""
    if not overlap:
        return [np.asarray(p, dtype=np.int64) for p in np.array_split(np.arange(nodes), num_clients)]
    parts = np.array_split(np.arange(nodes), max(1, round(num_clients / 5)))
    rng = np.random.default_rng([seed, 19, 3])
    out = []
    for c in range(num_clients):
        part = parts[c * len(parts) // num_clients]
        out.append(np.sort(rng.choice(part, len(part) // 2, replace=False)).astype(np.int64))
    return out


@DATASETS.register("sbm")
def sbm(num_clients: int = 10, nodes: int = 2000, communities: int = 10, classes: int = 5,
        p_in: float = 0.1, p_out: float = 0.002, homophily: float = 0.8, label_alpha: float = 1.0,
        features: int = 16, noise: float = 2.0, groups: int = 1, overlap: bool = False,
        train_fraction: float = 0.2, test_fraction: float = 0.4, seed: int = 0) -> Dataset:
    """The SBM node-classification task (:func:`sbm_graph`) over ``num_clients`` client
    subgraphs (:func:`client_nodes`; each the subgraph its nodes induce). The graph's nodes are
    split once, as FED-PUB's generators do: a random ``round(train_fraction * nodes)`` are
    training nodes, ``round(test_fraction * nodes)`` others test nodes, the rest unlabelled
    (FED-PUB's validation nodes: 20% / 40% / 40%; no validation is used here). A client labels
    its training nodes and is judged on its test nodes, so with overlapping clients a node is a
    test node for every client that holds it."""
    _validate(num_clients, nodes, communities, classes, p_in, p_out, homophily, label_alpha,
              features, noise, groups, overlap, train_fraction, test_fraction)
    adj, x, labels, _ = sbm_graph(nodes, communities, classes, p_in, p_out, homophily,
                                  label_alpha, features, noise, groups, seed)
    members = client_nodes(nodes, num_clients, overlap, seed)
    width = max(len(m) for m in members)
    k = num_clients
    role = np.zeros(nodes, dtype=np.int64)                   # 0 unlabelled, 1 train, 2 test
    order = np.random.default_rng([seed, 19, 4]).permutation(nodes)
    n_train = round(train_fraction * nodes)
    role[order[:n_train]] = 1
    role[order[n_train:n_train + round(test_fraction * nodes)]] = 2
    packed = np.zeros((2 * k, width, width + features), dtype=np.float32)
    targets = np.full((2 * k, width), -1, dtype=np.int64)
    for c, nodes_c in enumerate(members):
        n = len(nodes_c)
        if not (role[nodes_c] == 1).any() or not (role[nodes_c] == 2).any():
            raise ValueError(f"sbm: client {c} has no training or no test node; raise nodes, "
                             "train_fraction or test_fraction")
        packed[c] = packed[k + c] = pack_graph(normalized_adjacency(adj[np.ix_(nodes_c, nodes_c)]),
                                               x[nodes_c], width)
        targets[c, :n] = np.where(role[nodes_c] == 1, labels[nodes_c], -1)
        targets[k + c, :n] = np.where(role[nodes_c] == 2, labels[nodes_c], -1)
    xs, ys = torch.from_numpy(packed), torch.from_numpy(targets)
    return Dataset(x_train=xs, y_train=ys, x_test=xs[k:], y_test=ys[k:], num_classes=classes,
                   input_shape=(width, width + features), name="sbm",
                   natural_partition=[np.array([c]) for c in range(k)],
                   local_tests=[np.array([k + c]) for c in range(k)])


def _validate(num_clients, nodes, communities, classes, p_in, p_out, homophily, label_alpha,
              features, noise, groups, overlap, train_fraction, test_fraction) -> None:
    for name, value, lo in (("num_clients", num_clients, 1), ("nodes", nodes, 2),
                            ("communities", communities, 1), ("classes", classes, 2),
                            ("features", features, 1), ("groups", groups, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise ValueError(f"sbm: {name} must be an integer >= {lo}, got {value!r}")
    inf = float("inf")
    for name, value, lo, hi in (("p_in", p_in, 0, 1), ("p_out", p_out, 0, 1),
                                ("homophily", homophily, 0, 1), ("noise", noise, 0, inf),
                                ("train_fraction", train_fraction, 0, 1),
                                ("test_fraction", test_fraction, 0, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
            raise ValueError(f"sbm: {name} must be a number in [{lo}, {hi}], got {value!r}")
    if isinstance(label_alpha, bool) or not isinstance(label_alpha, (int, float)) or not label_alpha > 0:
        raise ValueError(f"sbm: label_alpha must be a number > 0, got {label_alpha!r}")
    if not (0 < train_fraction and 0 < test_fraction and train_fraction + test_fraction <= 1):
        raise ValueError(f"sbm: train_fraction and test_fraction must be > 0 with a sum of at most 1, "
                         f"got {train_fraction!r} and {test_fraction!r}")
    if not isinstance(overlap, bool):
        raise ValueError(f"sbm: overlap must be true or false, got {overlap!r}")
    if groups > communities:
        raise ValueError(f"sbm: groups ({groups}) must be at most communities ({communities})")
    if nodes < 4 * num_clients:
        raise ValueError(f"sbm: {nodes} nodes is too few for {num_clients} clients (at least 4 each)")
