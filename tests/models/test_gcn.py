"""The dense GCN against a plain computation, its masks, FED-PUB's embedding and proxy graph,
the masked MLP, and the per-node loss of graph samples."""

import numpy as np
import torch

from gossamer.models import ParamSpec, build_model, make_stacked_forward
from gossamer.models.graph import graph_sample_loss, proxy_graph
from gossamer.training.trainer import sample_losses


def _sample(m=6, f=3, n=4, seed=0):
    """A packed graph of ``n`` real nodes padded to ``m``: ``[m, m + f]``."""
    g = torch.Generator().manual_seed(seed)
    adj = (torch.rand(n, n, generator=g) < 0.5).float().triu(1)
    adj = adj + adj.T + torch.eye(n)
    d = adj.sum(1).rsqrt()
    out = torch.zeros(m, m + f)
    out[:n, :n] = adj * d[:, None] * d[None, :]
    out[:n, m:] = torch.randn(n, f, generator=g)
    return out


def _plain(model, x, m):
    """The GCN written out with the module's own tensors, one graph at a time."""
    a, h = x[:, :m], x[:, m:]

    def w(layer):
        mask = getattr(layer, "mask", None)
        if mask is None:
            return layer.weight
        return layer.weight * torch.where(mask.abs() < 1e-3, torch.zeros(()), mask)

    h1 = torch.relu(a @ h @ w(model.conv1).T + model.conv1.bias)
    h2 = a @ h1 @ w(model.conv2).T + model.conv2.bias
    return torch.relu(h2) @ w(model.clsif).T + model.clsif.bias, h2


def test_the_gcn_is_the_plain_dense_computation_on_every_path():
    model = build_model("gcn", (6, 9), 4, seed=0, hidden=5)
    spec = ParamSpec.from_module(model)
    assert spec.names == ("conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias",
                          "clsif.weight", "clsif.bias")
    xs = torch.stack([_sample(seed=s) for s in range(3)])                 # [3, 6, 9]
    forwards = [make_stacked_forward(model, spec, xs[0], backend) for backend in ("stacked", "vmap")]
    with torch.no_grad():
        expected = torch.stack([_plain(model, x, 6)[0] for x in xs])
        assert torch.allclose(model(xs), expected, atol=1e-6)
        rows = torch.stack([spec.flatten(model), spec.flatten(model) * 0.5])  # two models
        for forward in forwards:
            out = forward(spec.views(rows), xs.unsqueeze(0).expand(2, -1, -1, -1))
            assert out.shape == (2, 3, 6, 4)
            assert torch.allclose(out[0], expected, atol=1e-5)
        spec.load_into(model, rows[1])
        assert torch.allclose(out[1], torch.stack([_plain(model, x, 6)[0] for x in xs]), atol=1e-5)


def test_masks_multiply_the_weights_and_small_entries_are_pruned():
    model = build_model("gcn", (6, 9), 3, seed=1, hidden=4, masked=True)
    spec = ParamSpec.from_module(model)
    assert [n for n in spec.names if n.endswith("mask")] == ["conv1.mask", "conv2.mask", "clsif.mask"]
    assert all(torch.equal(getattr(model, k).mask, torch.ones_like(getattr(model, k).weight))
               for k in ("conv1", "conv2", "clsif"))
    x = _sample()[None]
    with torch.no_grad():
        model.conv1.mask.copy_(torch.rand(model.conv1.mask.shape) * 2)
        model.conv2.mask[0, 0] = 5e-4                                       # pruned
        model.clsif.mask[1] = 0.0
        out = model(x)[0]
        assert torch.allclose(out, _plain(model, x[0], 6)[0], atol=1e-6)
        embedding = model.stacked_embedding({k: v[None] for k, v in model.named_parameters()}, x[None])
        assert torch.allclose(embedding[0], _plain(model, x[0], 6)[1].mean(0), atol=1e-6)
        assert torch.allclose(out[:, 1], model.clsif.bias[1].expand(6))   # a zero mask row


def test_the_proxy_graph_is_five_disconnected_random_graphs_with_normal_features():
    g = proxy_graph(7, seed=0)
    assert g.shape == (1, 500, 507)
    adj = g[0, :, :500]
    block = torch.arange(500) // 100
    assert (adj[block[:, None] != block[None, :]] == 0).all()
    links = (adj > 0).float().sum() - 500                                  # minus self loops
    assert abs(links / (5 * 100 * 99) - 0.1) < 0.01                        # p_in = 0.1
    assert abs(float(g[0, :, 500:].std()) - 1) < 0.05
    assert torch.equal(g, proxy_graph(7, seed=0)) and not torch.equal(g, proxy_graph(7, seed=1))


def test_the_masked_mlp_is_the_mlp_when_masks_are_one():
    plain = build_model("mlp", (2, 3), 4, seed=0, hidden=[5])
    masked = build_model("masked_mlp", (2, 3), 4, seed=0, hidden=[5])
    assert [n for n, _ in masked.named_parameters()] == [
        "layers.0.weight", "layers.0.bias", "layers.0.mask", "layers.1.weight", "layers.1.bias", "layers.1.mask"]
    with torch.no_grad():
        for i, j in ((0, 0), (1, 2)):
            masked.layers[i].weight.copy_(plain.net[j].weight)
            masked.layers[i].bias.copy_(plain.net[j].bias)
        x = torch.randn(7, 2, 3)
        assert torch.allclose(masked(x), plain(x), atol=1e-6)
        hidden = x.flatten(1) @ plain.net[0].weight.T + plain.net[0].bias
        params = {k: v[None] for k, v in masked.named_parameters()}
        assert torch.allclose(masked.stacked_embedding(params, x[None])[0], hidden.mean(0), atol=1e-6)
        assert masked.proxy_input(0).shape == (100, 2, 3)


def test_a_graph_samples_loss_is_the_mean_over_its_labelled_nodes():
    logits = torch.tensor([[[[2.0, 0.0], [0.0, 1.0], [5.0, 5.0]]]])         # [1, 1, 3 nodes, 2]
    labels = torch.tensor([[[0, -1, 1]]])
    ce = [np.log(1 + np.exp(-2.0)), np.log(2.0)]                           # nodes 0 and 2
    assert torch.allclose(graph_sample_loss(logits, labels), torch.tensor([[sum(ce) / 2]]).float())
    assert torch.equal(sample_losses(logits, labels), graph_sample_loss(logits, labels))
    flat = torch.tensor([[[2.0, 0.0], [0.0, 1.0]]])
    assert torch.allclose(sample_losses(flat, torch.tensor([[0, 1]])),
                          torch.tensor([[np.log(1 + np.exp(-2.0)), np.log(1 + np.exp(-1.0))]]).float())


def test_parameter_counts_of_the_docs():
    def count(name, shape, classes, **params):
        return ParamSpec.from_module(build_model(name, shape, classes, 0, **params)).numel

    assert count("gcn", (150, 166), 5) == 19_333
    assert count("gcn", (150, 166), 5, masked=True) == 38_405
    assert count("masked_mlp", (1, 28, 28), 10) == 101_706
