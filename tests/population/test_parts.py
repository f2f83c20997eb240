"""The parts of a registered population: sparse columns, the client-state store, per-client
data sources, lazily drawn profiles and the cohort trainer."""

import numpy as np
import pytest
import torch

from gossamer.config import Distribution, SystemConfig
from gossamer.data import load_dataset
from gossamer.population import ClientStore, SparseColumn
from gossamer.population.clients import PartitionedClients, SyntheticClients
from gossamer.population.profiles import lazy_profile, open_uniform, quantile


def test_sparse_column_reads_default_until_written_and_adds_repeats():
    col = SparseColumn(10**8)
    assert len(col) == 10**8
    assert col[[5, 99_999_999]].tolist() == [0, 0]
    col.add_at([7, 7, 3], [1, 2, 5])
    col[9] = 4
    assert col[[3, 7, 9, 0]].tolist() == [5, 3, 4, 0]
    ids, values = col.written()
    assert ids.tolist() == [3, 7, 9] and values.tolist() == [5, 3, 4]
    again = SparseColumn(10**8)
    again.load_state_dict(col.state_dict())
    assert again[[3, 7, 9, 0]].tolist() == [5, 3, 4, 0]
    col.discard([7])
    assert col[7] == 0 and 7 not in col


def test_store_spills_past_its_budget_and_reads_back_exact_rows(tmp_path):
    init = torch.full((6,), -1.0)
    store = ClientStore(init, budget_bytes=3 * 6 * 4, spill_dir=tmp_path)     # three rows in memory
    g = torch.Generator().manual_seed(0)
    rows = {i: torch.randn(6, generator=g) for i in range(10)}
    for start in (0, 4, 8):
        ids = [i for i in range(start, min(start + 4, 10))]
        store.set(np.array(ids), torch.stack([rows[i] for i in ids]))
    assert len(store) == 10 and store.memory_bytes <= 3 * 6 * 4 and store.disk_bytes > 0
    got = store.get(np.array([9, 0, 42, 5]))
    assert torch.equal(got, torch.stack([rows[9], rows[0], init, rows[5]]))
    rows[0] = rows[0] + 1                                  # a spilled client written again
    store.set(np.array([0]), rows[0][None])
    assert torch.equal(store.get(np.arange(10)), torch.stack([rows[i] for i in range(10)]))
    copy = ClientStore(init, budget_bytes=2 * 6 * 4, spill_dir=tmp_path)
    copy.load_state_dict(store.state_dict())
    assert torch.equal(copy.get(np.arange(12)), torch.cat([torch.stack([rows[i] for i in range(10)]),
                                                           init.expand(2, -1)]))
    store.close()
    copy.close()
    assert not list(tmp_path.iterdir())                    # the spill files are removed


def test_store_refuses_a_budget_below_one_row():
    with pytest.raises(ValueError, match="holds no client"):
        ClientStore(torch.zeros(100), budget_bytes=10)


def test_synthetic_user_is_a_function_of_its_id_alone():
    src = SyntheticClients(10**8, alpha=1.0, beta=1.0, seed=3, max_samples=300)
    ids = np.array([12, 99_999_998, 5])
    x, y, sizes = src.data(ids)
    assert sizes.tolist() == src.sizes(ids).tolist() and len(x) == len(y) == sizes.sum()
    x_one, y_one, _ = src.data(np.array([5]))
    assert torch.equal(x[-sizes[-1]:], x_one) and torch.equal(y[-sizes[-1]:], y_one)
    assert (sizes <= 300 - round(0.2 * 300)).all() and (sizes >= 1).all()
    tx, ty = src.test(np.array([5]))
    assert len(tx) == src.total(np.array([5]))[0] - sizes[-1]
    assert not any(torch.equal(row, tx[0]) for row in x_one)  # test rows are the user's others
    assert y.min() >= 0 and y.max() < 10


def test_synthetic_sizes_follow_the_fedprox_law():
    src = SyntheticClients(10**6, seed=0)
    total = src.total(np.arange(20_000))
    assert total.min() >= 50
    median = np.median(total - 50)                      # int(lognormal(4, 2)): median e^4 = 54.6
    assert 50 <= median <= 60


def test_on_demand_partition_skews_labels_and_draws_counts_from_a_distribution():
    data = load_dataset("digits")
    spec = Distribution(dist="uniform", low=10, high=30)
    src = PartitionedClients(data, 10**7, "dirichlet", spec, seed=1, alpha=0.1)
    ids = np.arange(200)
    sizes = src.sizes(ids)
    assert 10 <= sizes.min() and sizes.max() <= 30
    _, y, _ = src.data(ids[:50])
    share = []
    offset = 0
    for s in src.sizes(ids[:50]).tolist():
        counts = np.bincount(y[offset: offset + s].numpy(), minlength=10)
        share.append(counts.max() / s)
        offset += s
    assert np.mean(share) > 0.6                          # Dir(0.1): a few labels per client
    iid = PartitionedClients(data, 10**7, "iid", spec, seed=1)
    _, y_iid, _ = iid.data(ids[:50])
    assert len(np.unique(y_iid.numpy())) == 10


def test_lazy_profiles_follow_their_distributions():
    cfg = SystemConfig(sample_time_s={"dist": "lognormal", "median": 0.01, "sigma": 0.5},
                       bandwidth_up_Bps={"dist": "tiers", "values": [1e5, 1e6], "probs": [0.25, 0.75]})
    prof = lazy_profile(cfg, seed=0)
    nodes = np.arange(10**8 - 40_000, 10**8)
    t = prof.compute_s(nodes, np.ones(len(nodes)))
    assert abs(np.median(t) / 0.01 - 1) < 0.02
    up = prof.bandwidth_up_Bps[nodes]
    assert set(np.unique(up).tolist()) == {1e5, 1e6} and abs((up == 1e5).mean() - 0.25) < 0.01
    assert np.array_equal(prof.compute_s(nodes[:3], 1), prof.compute_s(nodes[:3], 1))
    u = open_uniform(0, 1, np.arange(1000))
    assert (u > 0).all() and (u < 1).all()
    assert quantile(Distribution(dist="exponential", mean=2.0), np.array([1 - np.exp(-1)]))[0] == pytest.approx(2.0)
