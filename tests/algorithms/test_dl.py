import torch

from gossamer.algorithms import DPSGD, GossipLearning


def test_dpsgd_mixing_preserves_mean_and_contracts():
    w = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.0, 0.5], [0.0, 0.5, 0.5]])
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 2.0]])
    out = DPSGD(gossip_steps=3).mix(w.to_sparse(), x)
    assert torch.allclose(out.mean(0), x.mean(0))
    assert ((out - out.mean(0)) ** 2).sum() < ((x - x.mean(0)) ** 2).sum()
    assert torch.allclose(DPSGD().mix(w, x), w @ x)


def test_gossip_merge_rules():
    own, recv = torch.tensor([[0.0, 0.0]]), torch.tensor([[4.0, 8.0]])
    plain, _ = GossipLearning(merge="average").merge_models(own, torch.tensor([1.0]), recv, torch.tensor([3.0]))
    assert torch.allclose(plain, torch.tensor([[2.0, 4.0]]))
    aged, age = GossipLearning(merge="age_weighted").merge_models(own, torch.tensor([1.0]), recv,
                                                                   torch.tensor([3.0]))
    assert torch.allclose(aged, torch.tensor([[3.0, 6.0]])) and age.item() == 3.0
    fresh, _ = GossipLearning().merge_models(own, torch.tensor([0.0]), recv, torch.tensor([0.0]))
    assert torch.allclose(fresh, torch.tensor([[2.0, 4.0]]))


def test_sparse_mixing_in_column_blocks_equals_one_product(monkeypatch):
    """mix_into multiplies a sparse mixing matrix by blocks of columns: bit for bit the product."""
    import networkx as nx

    from gossamer.algorithms.dl import dpsgd
    from gossamer.topology import to_torch_sparse

    graph = nx.random_regular_graph(4, 30, seed=1)
    w = nx.to_scipy_sparse_array(graph, format="csr") * 0.2
    w.setdiag(0.2)
    mixing = to_torch_sparse(w)
    x = torch.randn(30, 1000)
    whole = torch.mm(mixing, x)
    monkeypatch.setattr(dpsgd, "MIX_CHUNK_BYTES", 30 * 4 * 70)            # 70 columns a block
    out = torch.empty_like(x)
    assert dpsgd.mix_into(mixing, x, out) is out
    assert torch.equal(out, whole)
    assert torch.equal(dpsgd.mix_into(mixing.to_dense(), x, torch.empty_like(x)), mixing.to_dense() @ x)
