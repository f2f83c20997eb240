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
