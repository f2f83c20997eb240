import struct

import numpy as np
import pytest
import torch

from gossamer.compression import RandK, Threshold, TopK
from gossamer.compression._bits import uses_bitmap


def test_topk_keeps_exactly_the_k_largest_magnitudes():
    x = torch.tensor([[0.5, -3.0, 0.1, 2.0, -0.2, 1.0], [1.0, 2.0, 3.0, -4.0, 5.0, -6.0]])
    out = TopK(k=2).roundtrip(x)[0]
    assert torch.equal(out, torch.tensor([[0, -3.0, 0, 2.0, 0, 0], [0, 0, 0, 0, 5.0, -6.0]]))
    x = torch.randn(20, 200, generator=torch.Generator().manual_seed(1))
    out = TopK(density=0.1).roundtrip(x)[0]
    kept = out != 0
    assert (kept.sum(dim=1) == 20).all()
    assert torch.equal(out[kept], x[kept])
    smallest_kept = torch.where(kept, x.abs(), float("inf")).min(dim=1).values
    largest_dropped = torch.where(kept, 0.0, x.abs()).max(dim=1).values
    assert (smallest_kept >= largest_dropped).all()


@pytest.mark.parametrize(("k", "numel", "bitmap"), [(1, 1000, False), (31, 1000, False),
                                                    (32, 1000, True), (500, 1000, True)])
def test_topk_index_encoding_is_the_smaller(k, numel, bitmap):
    # 4 k int32 bytes against ceil(P / 8) bitmap bytes; ties keep the index list.
    assert uses_bitmap(k, numel) is bitmap
    expected = 4 + (125 if bitmap else 4 * k) + 4 * k
    assert TopK(k=k).nominal_bytes(numel) == expected
    x = torch.randn(2, numel)
    enc = TopK(k=k).compress(x)
    assert len(TopK(k=k).to_bytes(enc, 1)) == expected


def test_topk_density_rounds_to_nearest_and_keeps_one():
    assert TopK(density=0.1).k_for(30) == 3
    assert TopK(density=0.001).k_for(30) == 1
    assert TopK(density=1.0).k_for(30) == 30
    assert TopK(k=50).k_for(30) == 30


def test_sparse_payload_validation():
    c = TopK(k=3)
    numel = 100  # 3 int32 indices (12 bytes) beat a 13-byte bitmap
    good = struct.pack("<I3i3f", 3, 1, 4, 7, 1.0, 2.0, 3.0)
    assert torch.equal(c.from_bytes(good, numel)[[1, 4, 7]], torch.tensor([1.0, 2.0, 3.0]))
    bad = {
        "unsorted": struct.pack("<I3i3f", 3, 4, 1, 7, 1.0, 2.0, 3.0),
        "repeated": struct.pack("<I3i3f", 3, 4, 4, 7, 1.0, 2.0, 3.0),
        "out of range": struct.pack("<I3i3f", 3, 1, 4, 100, 1.0, 2.0, 3.0),
        "negative": struct.pack("<I3i3f", 3, -1, 4, 7, 1.0, 2.0, 3.0),
        "wrong k": struct.pack("<I2i2f", 2, 1, 4, 1.0, 2.0),
        "huge count": struct.pack("<I", 2**31),
    }
    for what, payload in bad.items():
        with pytest.raises(ValueError):
            c.from_bytes(payload, numel)
            pytest.fail(f"accepted a payload with {what}")


def test_bitmap_payload_validation():
    c = Threshold(tau=0.5)
    numel = 16  # bitmap (2 bytes) once count >= 1
    good = struct.pack("<I", 2) + bytes([0b00000101, 0]) + struct.pack("<2f", 1.0, -2.0)
    assert torch.equal(c.from_bytes(good, numel)[:3], torch.tensor([1.0, 0.0, -2.0]))
    popcount = struct.pack("<I", 2) + bytes([0b00000111, 0]) + struct.pack("<2f", 1.0, -2.0)
    with pytest.raises(ValueError, match="bitmap has 3 entries, header says 2"):
        c.from_bytes(popcount, numel)
    padding = struct.pack("<I", 1) + bytes([0b10000001]) + struct.pack("<f", 1.0)
    with pytest.raises(ValueError, match="nonzero padding"):
        c.from_bytes(padding, 4)  # bit 7 lies beyond P = 4


def test_threshold_keeps_entries_at_or_above_tau():
    x = torch.tensor([[0.5, -1.0, 1.5, -0.99, 0.0], [2.0, 2.0, 2.0, 2.0, 2.0]])
    c = Threshold(tau=1.0)
    enc = c.compress(x)
    assert torch.equal(c.decompress(enc), torch.tensor([[0, -1.0, 1.5, 0, 0], [2.0] * 5]))
    # count + a 1-byte bitmap (smaller than 2 or 5 int32 indices) + float32 values
    assert list(enc.nbytes) == [4 + 1 + 8, 4 + 1 + 20]
    assert c.nominal_bytes(5) is None


def test_randk_indices_are_shared_and_uniform():
    c = RandK(density=0.25)
    keys = np.arange(2000)
    idx = c.indices(40, seed=3, keys=keys)
    assert idx.shape == (2000, 10)
    assert (idx.diff(dim=1) > 0).all()                      # distinct and ascending
    assert torch.equal(c.indices(40, seed=3, keys=keys[5:6]), idx[5:6])
    counts = torch.bincount(idx.reshape(-1), minlength=40).double()
    expected = 2000 * 10 / 40
    assert ((counts - expected).abs() < 5 * (expected * 0.75) ** 0.5).all()


def test_randk_sends_only_values_and_scale_option():
    x = torch.arange(1.0, 21.0).reshape(1, 20)
    scaled, unscaled = RandK(density=0.2), RandK(density=0.2, scale=False)
    enc = scaled.compress(x, seed=1, keys=np.array([9]))
    assert enc.nbytes[0] == 16 and len(scaled.to_bytes(enc, 0)) == 16
    out = scaled.decompress(enc)[0]
    kept = enc.parts["indices"][0]
    assert torch.equal(out[kept], x[0, kept] * 5.0)
    assert int((out != 0).sum()) == 4
    plain = unscaled.decompress(unscaled.compress(x, seed=1, keys=np.array([9])))[0]
    assert torch.equal(plain[kept], x[0, kept])
    # Decoding with the wrong key puts the values elsewhere: the key really is needed.
    wrong = scaled.from_bytes(scaled.to_bytes(enc, 0), 20, seed=1, key=10)
    assert not torch.equal(wrong, out)


def test_randk_is_unbiased():
    x = torch.randn(1, 30, generator=torch.Generator().manual_seed(2))
    rows = 6000
    out = RandK(density=0.2).roundtrip(x.expand(rows, 30).contiguous(), seed=5,
                                       keys=np.arange(rows))[0].double()
    mean, se = out.mean(dim=0), out.std(dim=0) / rows**0.5
    assert ((mean - x[0]).abs() <= 4.5 * se + 1e-6).all()
