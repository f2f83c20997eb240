"""CHOCO-SGD's gossip step alone: exact average consensus under compression, the identity case,
randomness keys and parameter checks."""

import numpy as np
import pytest
import torch

from gossamer.algorithms import ALGORITHMS
from gossamer.algorithms.dl.choco import Choco
from gossamer.compression import build_compressor
from gossamer.topology import make_topology, mixing_matrix, to_torch_sparse


def _ring(n):
    return to_torch_sparse(mixing_matrix("metropolis_hastings", make_topology("ring", n, 0)))


def _gossip(algo, comp, x, steps, public=None):
    public = algo.init_public(x) if public is None else public
    n, w = x.shape[0], _ring(x.shape[0])
    dists = []
    for t in range(steps):
        algo.gossip_step(w, x, public, comp, seed=0, keys=algo.keys(n, 1, t))
        dists.append(float((x - x.mean(0)).square().sum()) / n)
    return dists


@pytest.mark.parametrize("name,params,gamma", [
    ("topk", {"density": 0.1}, 0.1), ("quantize", {"bits": 4}, 0.5), ("sign", {}, 0.05)])
def test_compressed_gossip_reaches_the_exact_average(name, params, gamma):
    """CHOCO-Gossip (the paper's Theorem 2): linear convergence to the average, which every
    step preserves, although each message carries a fraction of the vector."""
    x = torch.randn(8, 200, generator=torch.Generator().manual_seed(0))
    mean = x.mean(0).clone()
    algo = Choco(compressor=name, compressor_params=params, gamma=gamma, public_init="zero")
    dists = _gossip(algo, build_compressor(name, params), x, 3000)
    assert dists[-1] < 1e-8 * dists[0] and dists[100] < dists[0]
    assert torch.allclose(x.mean(0), mean, atol=1e-5)


def test_plain_compressed_averaging_stalls_where_choco_converges():
    """Mixing compressed models directly (x <- W C(x)) keeps a consensus error; CHOCO does not."""
    x0 = torch.randn(8, 200, generator=torch.Generator().manual_seed(1))
    comp, w = build_compressor("topk", {"density": 0.1}), _ring(8)
    naive = x0.clone()
    for _ in range(300):
        naive = naive + torch.mm(w, comp.decompress(comp.compress(naive))) - comp.decompress(comp.compress(naive))
    x = x0.clone()
    dists = _gossip(Choco(compressor="topk", compressor_params={"density": 0.1}, gamma=0.1), comp, x, 3000)
    naive_dist = float((naive - naive.mean(0)).square().sum()) / 8
    assert dists[-1] < 1e-6 * naive_dist


def test_identity_with_gamma_one_is_one_mixing_step():
    x = torch.randn(6, 30, generator=torch.Generator().manual_seed(2))
    expected = torch.mm(_ring(6), x)
    algo = Choco()
    payload = algo.gossip_step(_ring(6), x, algo.init_public(x), build_compressor("none"), seed=0,
                               keys=algo.keys(6, 1, 0))
    assert torch.allclose(x, expected, atol=1e-6) and (payload == 4 * 30).all()


def test_payload_sizes_are_the_encodings_and_public_copies_follow_the_messages():
    x = torch.randn(6, 500, generator=torch.Generator().manual_seed(3))
    algo, comp = Choco(compressor="topk", compressor_params={"k": 7}, gamma=0.3), build_compressor("topk", {"k": 7})
    public = algo.init_public(x)
    start, diff = public.clone(), x - public
    payload = algo.gossip_step(_ring(6), x, public, comp, seed=0, keys=algo.keys(6, 1, 0))
    enc = comp.compress(diff, seed=0, keys=algo.keys(6, 1, 0))
    assert (payload == enc.nbytes).all() and (payload == [len(comp.to_bytes(enc, i)) for i in range(6)]).all()
    assert torch.equal(public, start + comp.decompress(enc))
    assert ((public != start).sum(1) <= 7).all()


def test_keys_differ_per_node_round_and_step():
    keys = np.concatenate([Choco.keys(4, r, s) for r in (1, 2) for s in (0, 1, 2)])
    assert len(set(keys.tolist())) == len(keys)


@pytest.mark.parametrize("params,match", [
    ({"gamma": 0}, "gamma"), ({"gamma": 1.5}, "gamma"), ({"compressor": "zip"}, "unknown compressor"),
    ({"compressor": "topk", "compressor_params": {"density": 2}}, "density"),
    ({"aggregator": "median"}, "aggregator: mean"), ({"gossip_steps": 5000}, "gossip_steps"),
])
def test_bad_params_are_refused(params, match):
    with pytest.raises(ValueError, match=match):
        ALGORITHMS.get("choco").from_params(params)
