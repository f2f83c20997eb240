import numpy as np

from gossamer import rng


def test_uniform_is_pure_and_vectorized_like_scalar():
    a = rng.uniform(3, rng.STREAM_GOSSIP, np.arange(5), 2)
    b = rng.uniform(3, rng.STREAM_GOSSIP, np.arange(5), 2)
    assert np.array_equal(a, b) and ((a >= 0) & (a < 1)).all()
    assert [rng.uniform_scalar(3, rng.STREAM_GOSSIP, i, 2) for i in range(5)] == a.tolist()
    assert not np.array_equal(a, rng.uniform(4, rng.STREAM_GOSSIP, np.arange(5), 2))


def test_uniform_looks_uniform():
    u = rng.uniform(0, 1, np.arange(100_000))
    hist, _ = np.histogram(u, bins=10, range=(0, 1))
    assert abs(u.mean() - 0.5) < 0.005 and hist.min() > 9_500
