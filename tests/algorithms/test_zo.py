"""Zeroth-order FedAvg's pure parts: directions from seeds, central differences, codes, bytes,
and the server's update rebuilt from scalars alone."""

import numpy as np
import pytest
import torch

from gossamer import wire
from gossamer.algorithms import ALGORITHMS
from gossamer.algorithms.fl.zo import ZOFedAvg, directions


def _algo(**params) -> ZOFedAvg:
    return ALGORITHMS.get("zo_fedavg").from_params(params)


def test_directions_are_standard_normal_rows_that_depend_on_their_own_keys_only():
    keys = np.array([[1, c, k] for c in range(4) for k in range(3)])
    z = directions(7, keys, 5001)
    assert z.shape == (12, 5001) and z.dtype == torch.float32
    assert torch.equal(directions(7, keys[5:6], 5001)[0], z[5])       # alone == in a batch
    assert torch.equal(directions(7, keys[::-1].copy(), 5001), z.flip(0))
    assert not torch.equal(directions(8, keys[:1], 5001)[0], z[0])    # the seed matters
    assert len({tuple(row[:8].tolist()) for row in z}) == 12            # every key its own row
    assert abs(float(z.mean())) < 0.02 and abs(float(z.std()) - 1) < 0.02
    assert float((z.double() @ z.double().T / 5001 - torch.eye(12, dtype=torch.float64)).abs().max()) < 0.1


def test_central_difference_is_the_directional_derivative_of_a_quadratic():
    """For L(w) = w'Aw/2 + b'w, (L(x + eps z) - L(x - eps z)) / (2 eps) = z'(Ax + b) exactly."""
    gen = torch.Generator().manual_seed(0)
    p = 30
    a = torch.randn(p, p, generator=gen, dtype=torch.float64)
    a = a @ a.T
    b, x = torch.randn(p, generator=gen, dtype=torch.float64), torch.randn(p, generator=gen, dtype=torch.float64)
    algo = _algo(eps=0.5, perturbations=3)                  # large eps: no eps^2 term remains
    z = directions(0, algo.direction_keys(1, np.array([2, 5])), p).double()
    rows = algo.perturbed(x, z)
    assert rows.shape == (12, p)
    losses = 0.5 * torch.einsum("rp,pq,rq->r", rows, a, rows) + rows @ b
    g = algo.projected_gradients(losses)
    assert torch.allclose(g.double(), z @ (a @ x + b), rtol=1e-6, atol=1e-5)


def test_direction_keys_per_client_and_shared():
    per, shared = _algo(perturbations=2), _algo(perturbations=2, directions="shared")
    assert per.direction_keys(4, np.array([3, 9])).tolist() == [[4, 3, 0], [4, 3, 1], [4, 9, 0], [4, 9, 1]]
    assert shared.direction_keys(4, np.array([3, 9])).tolist() == [[4, 0, 0], [4, 0, 1], [4, 0, 0], [4, 0, 1]]


@pytest.mark.parametrize("mode", ["per_client", "shared"])
def test_server_update_is_the_mean_of_g_z_rebuilt_from_the_seeds(mode):
    """The clients draw z and send only g; the server's update, which regenerates z from
    (seed, round, client, k), equals -lr * mean_ik g_ik z_ik computed with the clients' z."""
    algo, p, seed, r, lr = _algo(perturbations=3, directions=mode), 1000, 5, 7, 0.3
    clients = np.array([0, 4, 6, 11])
    z_clients = directions(seed, algo.direction_keys(r, clients), p)        # what clients used
    g = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    x = torch.randn(p, generator=torch.Generator().manual_seed(2))
    expected = x - lr * (g.reshape(-1, 1) * z_clients).mean(0)
    assert torch.allclose(algo.server_update(x, g, clients, r, seed, lr), expected, atol=1e-5)
    other = algo.server_update(x, g, clients, r + 1, seed, lr)             # other round: other z
    assert not torch.allclose(other, expected, atol=1e-3)
    assert torch.equal(algo.server_update(x, g[:0], clients[:0], r, seed, lr), x)


@pytest.mark.parametrize("bits, dtype_bytes", [(None, 4), (8, 1), (16, 2)])
def test_upload_is_the_header_plus_k_scalars(bits, dtype_bytes):
    algo = _algo(perturbations=5, quantize_bits=bits)
    assert algo.upload_bytes() == wire.HEADER_BYTES + 5 * dtype_bytes
    assert algo.record_bytes(3) == wire.HEADER_BYTES + 3 * (4 + 5 * dtype_bytes)
    assert _algo(perturbations=5, quantize_bits=bits, directions="shared").record_bytes(3) == \
        wire.HEADER_BYTES + 5 * 4


def test_one_byte_codes_round_stochastically_without_bias_and_clip():
    algo = _algo(perturbations=1000, quantize_bits=8, quantize_scale=0.1)
    g = torch.full((2, 1000), 0.234)
    g[1, :10] = 100.0                                                      # beyond 127 * scale
    codes = algo.encode(g, 3, 1, np.array([0, 1]))
    assert codes.min() >= -127 and codes.max() <= 127
    assert set(codes[0].tolist()) == {2, 3}                                # 0.234 / 0.1 = 2.34
    assert abs(float(algo.decode(codes)[0].mean()) - 0.234) < 0.01         # unbiased on average
    assert (algo.decode(codes)[1, :10] == pytest.approx(12.7))
    assert torch.equal(codes[1:], algo.encode(g[1:], 3, 1, np.array([1])))  # a lone client: same
    plain = _algo(perturbations=2)
    assert torch.equal(plain.decode(plain.encode(g[:, :2], 3, 1, np.array([0, 1]))), g[:, :2])


def test_selection_takes_the_fraction_sorted():
    algo = _algo(client_fraction=0.25, min_clients=2)
    ids = algo.select(np.arange(20), np.random.default_rng(0))
    assert len(ids) == 5 and np.all(np.diff(ids) > 0)
    assert len(algo.select(np.arange(4), np.random.default_rng(0))) == 2


@pytest.mark.parametrize("params", [{"perturbations": 0}, {"eps": 0}, {"quantize_bits": 4},
                                    {"client_fraction": 1.5}, {"directions": "mixed"},
                                    {"quantize_scale": -1}, {"local_steps": 2}])
def test_bad_params_are_refused(params):
    with pytest.raises(ValueError):
        _algo(**params)
