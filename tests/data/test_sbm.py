"""The SBM graph dataset: sizes, community structure, determinism, the client split
(non-overlapping and overlapping) and each client's train/test nodes."""

import numpy as np
import pytest
import torch

from gossamer.data import load_dataset
from gossamer.data.graph import client_nodes, sbm_graph
from gossamer.models.graph import normalized_adjacency, pack_graph


def test_the_graph_has_its_communities_label_skew_and_homophily():
    adj, x, labels, community = sbm_graph(600, 6, 3, p_in=0.2, p_out=0.002, homophily=0.9,
                                          label_alpha=0.5, features=5, noise=1.0, groups=1, seed=0)
    assert adj.shape == (600, 600) and x.shape == (600, 5) and labels.shape == community.shape == (600,)
    assert (adj == adj.T).all() and not adj.diagonal().any()
    assert np.array_equal(community, np.repeat(np.arange(6), 100))           # contiguous blocks
    inside = adj[community[:, None] == community[None, :]].mean()
    across = adj[community[:, None] != community[None, :]].mean()
    assert inside > 20 * across
    same = labels[:, None] == labels[None, :]
    block = community[:, None] == community[None, :]
    assert adj[block & same].mean() > 5 * adj[block & ~same].mean()          # homophily 0.9
    # label skew: each community's most common label is well above a third of its nodes
    assert all(np.bincount(labels[community == c], minlength=3).max() > 45 for c in range(6))


def test_groups_move_the_class_means_so_one_label_means_different_features():
    _, x, labels, community = sbm_graph(400, 4, 2, 0.1, 0.0, 0.5, 1.0, 8, noise=0.0, groups=2, seed=1)
    first, second = community < 2, community >= 2
    a = x[first & (labels == 0)][0]
    b = x[second & (labels == 1)][0]
    assert np.allclose(a, b)            # group 1's label 1 has group 0's label 0 mean
    assert not np.allclose(a, x[second & (labels == 0)][0])


def test_the_client_split_non_overlapping_and_overlapping():
    parts = client_nodes(100, 4, overlap=False, seed=0)
    assert [len(p) for p in parts] == [25] * 4
    assert np.array_equal(np.concatenate(parts), np.arange(100))            # a partition, in order
    shared = client_nodes(100, 10, overlap=True, seed=0)                     # 2 parts of 50
    assert all(len(p) == 25 for p in shared)
    assert set(shared[0]) <= set(range(50)) and set(shared[9]) <= set(range(50, 100))
    assert set(shared[0]) & set(shared[1])                                  # clients share nodes
    ds = load_dataset("sbm", num_clients=10, nodes=400, overlap=True, seed=0)
    members = client_nodes(400, 10, True, 0)
    role = {}                                  # a shared node has one role for every client
    for c, nodes in enumerate(members):
        for j, v in enumerate(nodes):
            r = 1 if ds.y_train[c, j] >= 0 else 2 if ds.y_train[10 + c, j] >= 0 else 0
            assert role.setdefault(int(v), r) == r
    assert all(np.array_equal(a, b) for a, b in zip(shared, client_nodes(100, 10, True, 0), strict=True))


def test_each_client_is_one_packed_subgraph_with_its_own_train_and_test_nodes():
    ds = load_dataset("sbm", num_clients=4, nodes=90, communities=4, classes=3, features=4,
                      train_fraction=0.2, test_fraction=0.4, seed=3)
    k, width = 4, 23                                        # array_split of 90: 23, 23, 22, 22
    assert ds.input_shape == (width, width + 4) and ds.x_train.shape == (2 * k, width, width + 4)
    assert ds.y_train.shape == (2 * k, width) and ds.num_classes == 3
    assert [p.tolist() for p in ds.natural_partition] == [[0], [1], [2], [3]]
    assert [t.tolist() for t in ds.local_tests] == [[4], [5], [6], [7]]
    adj, x, labels, _ = sbm_graph(90, 4, 3, 0.1, 0.002, 0.8, 1.0, 4, 2.0, 1, seed=3)
    nodes = client_nodes(90, 4, False, 3)[2]
    expected = pack_graph(normalized_adjacency(adj[np.ix_(nodes, nodes)]), x[nodes], width)
    assert torch.equal(ds.x_train[2], torch.from_numpy(expected))
    assert torch.equal(ds.x_train[2], ds.x_train[6]) and torch.equal(ds.x_test[2], ds.x_train[6])
    train, test = ds.y_train[2], ds.y_train[6]
    order = np.random.default_rng([3, 19, 4]).permutation(90)                # one split of the graph
    role = np.zeros(90, dtype=int)
    role[order[:18]], role[order[18:54]] = 1, 2
    assert np.array_equal((train[:22] >= 0).numpy(), role[nodes] == 1)
    assert np.array_equal((test[:22] >= 0).numpy(), role[nodes] == 2)
    assert not ((train >= 0) & (test >= 0)).any()                            # disjoint nodes
    assert (train[22:] == -1).all() and (test[22:] == -1).all()              # padding unlabelled
    labelled = (train >= 0).numpy()
    assert np.array_equal(train.numpy()[labelled], labels[nodes][labelled[:22]])
    again = load_dataset("sbm", num_clients=4, nodes=90, communities=4, classes=3, features=4, seed=3)
    assert torch.equal(again.x_train, ds.x_train) and torch.equal(again.y_train, ds.y_train)
    other = load_dataset("sbm", num_clients=4, nodes=90, communities=4, classes=3, features=4, seed=4)
    assert not torch.equal(other.x_train, ds.x_train)


def test_the_normalized_adjacency_is_gcns():
    adj = np.array([[0, 1, 0], [1, 0, 1], [0, 1, 0]], dtype=bool)
    d = np.array([2.0, 3.0, 2.0])                               # degrees with the self loop
    expected = (adj + np.eye(3)) / np.sqrt(d[:, None] * d[None, :])
    assert np.allclose(normalized_adjacency(adj), expected)


@pytest.mark.parametrize("params, message", [
    ({"num_clients": 0}, "num_clients must be an integer >= 1"),
    ({"p_in": 1.5}, "p_in must be a number in [0, 1]"),
    ({"train_fraction": 0.7, "test_fraction": 0.5}, "sum of at most 1"),
    ({"groups": 20}, "groups (20) must be at most communities (10)"),
    ({"nodes": 30}, "too few"),
    ({"overlap": "yes"}, "overlap must be true or false"),
    ({"nodes": 40, "num_clients": 10, "train_fraction": 0.01}, "has no training or no test node"),
    ({"max_train": 3}, "max_train and max_test do not apply to dataset sbm"),
])
def test_bad_parameters_are_refused_in_one_line(params, message):
    with pytest.raises(ValueError) as info:
        load_dataset("sbm", **params)
    assert message in str(info.value) and "\n" not in str(info.value)
