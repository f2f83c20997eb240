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


def test_one_hash_takes_the_same_value_and_shape_as_the_vectorized_path():
    """A single cell is hashed with Python ints (much cheaper than numpy's calls): every key
    kind, negative and 64-bit keys included, gives the elementwise path's bits and shape."""
    keys = np.array([0, 7, -1, -(1 << 40), (1 << 62) + 3], dtype=np.int64)
    many = rng.hash_u64(5, rng.STREAM_SYSTEM, 3, keys)
    for j, key in enumerate(keys):
        for one in (int(key), key, keys[j:j + 1], keys[j:j + 1].reshape(1, 1), np.asarray(key)):
            got = rng.hash_u64(5, rng.STREAM_SYSTEM, np.int32(3), one)
            assert got.dtype == np.uint64 and got.reshape(-1).tolist() == [int(many[j])]
            assert got.shape == np.broadcast_shapes((1,), np.shape(one))
    big = np.array([(1 << 64) - 5], dtype=np.uint64)
    assert rng.hash_u64(1, 2, big).tolist() == rng.hash_u64(1, 2, np.concatenate([big, big])).tolist()[:1]
    assert rng.hash_u64(1, 2, True).tolist() == rng.hash_u64(1, 2, np.array([1, 1])).tolist()[:1]
