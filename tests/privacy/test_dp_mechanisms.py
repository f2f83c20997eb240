"""DP mechanisms alone: clipping, counter-based Gaussian noise, DP-FedAvg's noise, accounting."""

import math

import numpy as np
import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant

from gossamer.privacy import DPLedger, clip_rows, dp_fedavg_updates, epsilon, gaussian


def test_clipping_bounds_each_row_and_keeps_small_rows():
    rows = torch.randn(50, 300) * torch.logspace(-2, 2, 50).unsqueeze(1)
    clipped = clip_rows(rows, 1.5)
    norms, before = clipped.norm(dim=1), rows.norm(dim=1)
    assert bool((norms <= 1.5 + 1e-5).all())
    small = before <= 1.5
    assert torch.equal(clipped[small], rows[small])
    assert torch.allclose(norms[~small], torch.full_like(norms[~small], 1.5), rtol=1e-5)
    # direction is kept
    cos = torch.nn.functional.cosine_similarity(clipped, rows, dim=1)
    assert torch.allclose(cos, torch.ones(50), atol=1e-5)


def test_gaussian_is_standard_normal_and_keyed_per_row():
    keys = np.stack([np.arange(8), np.full(8, 3)], axis=1)
    z = gaussian(0, 1, keys, 25_001)
    assert z.shape == (8, 25_001) and z.dtype == torch.float32
    flat = z.double().flatten()
    assert abs(float(flat.mean())) < 0.005 and abs(float(flat.std()) - 1) < 0.005
    assert abs(float((flat.abs() < 1).double().mean()) - 0.6827) < 0.005    # shape, not only moments
    # a row depends on its own key only, not on the batch it is drawn in
    assert torch.equal(gaussian(0, 1, keys[5:6], 25_001)[0], z[5])
    assert not torch.equal(gaussian(1, 1, keys[5:6], 25_001)[0], z[5])


@pytest.mark.parametrize("noise", ["server", "clients"])
def test_dp_fedavg_noise_has_the_configured_std(noise):
    # zero updates: the mean row is pure noise of std z C / expected
    deltas = torch.zeros(4, 40_000)
    rows = dp_fedavg_updates(deltas, np.arange(4), 7, clip_norm=0.5, noise_multiplier=2.0,
                             noise=noise, expected=4, seed=0)
    assert torch.equal(rows[0], rows[3])
    std = float(rows[0].double().std())
    assert abs(std - 2.0 * 0.5 / 4) < 0.01 * 0.25


def test_dp_fedavg_without_noise_is_the_mean_of_clipped_updates_over_expected():
    deltas = torch.randn(3, 20) * 10
    rows = dp_fedavg_updates(deltas, np.arange(3), 1, clip_norm=1.0, noise_multiplier=0.0,
                             noise="server", expected=5, seed=0)
    assert torch.allclose(rows[0], clip_rows(deltas, 1.0).sum(0) / 5, atol=1e-6)


def test_epsilon_is_opacus_value():
    rdp = RDPAccountant()
    rdp.history = [(1.1, 0.01, 300)]
    assert epsilon([(1.1, 0.01, 300)], 1e-5) == rdp.get_epsilon(1e-5)
    prv = PRVAccountant()
    prv.history = [(1.1, 0.01, 300)]
    assert epsilon([(1.1, 0.01, 300)], 1e-5, "prv") == pytest.approx(prv.get_epsilon(1e-5), rel=1e-9)
    assert epsilon([], 1e-5) == 0.0 and math.isinf(epsilon([(0.0, 0.1, 1)], 1e-5))


def test_ledger_takes_the_most_exposed_node_per_sampling_rate():
    ledger = DPLedger("sample", 1.0, 1e-5, "rdp", np.array([100, 100, 50]), batch_size=10)
    ledger.sample_steps(np.array([0, 2]), np.array([10, 5]))
    ledger.sample_steps(np.array([0, 1]), np.array([10, 10]))
    assert ledger.history() == [[(1.0, 0.1, 20)], [(1.0, 0.2, 5)]]
    assert ledger.epsilon() == max(epsilon([(1.0, 0.1, 20)], 1e-5), epsilon([(1.0, 0.2, 5)], 1e-5))
    client = DPLedger("client", 1.0, 1e-5, "rdp", np.ones(3), 1)
    for sel, cand in ((1, 10), (1, 10), (2, 10)):
        client.client_round(sel, cand)
    assert client.history() == [[(1.0, 0.1, 2), (1.0, 0.2, 1)]]
    again = DPLedger("client", 1.0, 1e-5, "rdp", np.ones(3), 1)
    again.load_state_dict(client.state_dict())
    assert again.history() == client.history() and again.epsilon() == client.epsilon()
