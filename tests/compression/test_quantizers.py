import struct

import numpy as np
import pytest
import torch

from gossamer.compression import QSGD, Quantize, ScaledSign


def gaussian(rows, cols, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def assert_unbiased(compressor, x, rows=4000):
    """Mean of ``rows`` independent compressions within 4.5 standard errors of ``x``."""
    out = compressor.roundtrip(x.expand(rows, -1).contiguous(), seed=9,
                               keys=np.arange(rows))[0].double()
    mean, se = out.mean(dim=0), out.std(dim=0) / rows**0.5
    assert ((mean - x[0].double()).abs() <= 4.5 * se + 1e-6).all()
    return out


def test_qsgd_rounds_each_entry_to_a_neighbouring_level():
    x = gaussian(6, 50)
    s = 4
    c = QSGD(levels=s)
    enc = c.compress(x, seed=1)
    norm = x.double().norm(dim=1, keepdim=True).float()
    assert torch.equal(enc.parts["norm"], norm[:, 0])
    r = x.double().abs() / norm.double() * s
    levels = enc.parts["levels"].double()
    assert ((levels == r.floor()) | (levels == r.ceil())).all()
    out = c.decompress(enc)
    assert torch.equal(out, torch.sign(x) * norm * (enc.parts["levels"].float() / s))


def test_qsgd_is_unbiased_with_both_codings():
    x = gaussian(1, 12, seed=3)
    for coding in ("fixed", "elias"):
        out = assert_unbiased(QSGD(levels=2, coding=coding), x)
        assert (out != out[0]).any()  # really random across keys


def test_qsgd_elias_bytes_of_a_tiny_case():
    # norm 5, s = 5: levels are exactly 3 and 4 at indices 1 and 4.
    x = torch.tensor([[0.0, 3.0, 0.0, 0.0, -4.0]])
    c = QSGD(levels=5, coding="elias")
    enc = c.compress(x)
    # gamma(2)=010, +=0, gamma(3)=011 | gamma(3)=011, -=1, gamma(4)=00100 (LSB-first bytes)
    expected = struct.pack("<fI", 5.0, 2) + bytes([0b01100010, 0b00100111])
    assert c.to_bytes(enc, 0) == expected and enc.nbytes[0] == len(expected)
    assert torch.equal(c.from_bytes(expected, 5), x[0])
    assert QSGD(levels=5).nominal_bytes(5) == 4 + 3  # 5 entries x (3 + 1) bits


def test_qsgd_elias_is_smaller_on_sparse_levels():
    x = gaussian(3, 4000)
    fixed, elias = QSGD(levels=1), QSGD(levels=1, coding="elias")
    assert (elias.compress(x).nbytes < fixed.nominal_bytes(4000) / 4).all()


@pytest.mark.parametrize("payload", [
    struct.pack("<fI", 5.0, 2) + bytes([0b01100010]),                  # ends inside a code
    struct.pack("<fI", 5.0, 3) + bytes([0b01100010, 0b00100111]),      # count too large
    struct.pack("<fI", 5.0, 1) + bytes([0b01100010, 0b00100111]),      # bits left over
    struct.pack("<fI", 5.0, 2) + bytes([0b01100010, 0b00100111, 0]),   # a trailing byte
    struct.pack("<fI", 5.0, 1) + bytes([0b10010110]),  # one entry (5 bits), dirty padding
    struct.pack("<fI", 5.0, 9) + bytes([0b01100010, 0b00100111]),      # more than P
    struct.pack("<fI", float("nan"), 2) + bytes([0b01100010, 0b00100111]),
    struct.pack("<fI", -1.0, 2) + bytes([0b01100010, 0b00100111]),
    struct.pack("<fI", 5.0, 1) + bytes([0b00110001, 0]),  # gap 8 runs past P = 5
    struct.pack("<f", 5.0)[:3],
])
def test_qsgd_elias_rejects_malformed_payloads(payload):
    with pytest.raises(ValueError):
        QSGD(levels=5, coding="elias").from_bytes(payload, 5)


def test_qsgd_elias_rejects_a_level_above_s():
    good = struct.pack("<fI", 5.0, 2) + bytes([0b01100010, 0b00100111])
    with pytest.raises(ValueError, match="level"):
        QSGD(levels=3, coding="elias").from_bytes(good, 5)  # level 4 > s = 3


def test_qsgd_fixed_rejects_bad_codes():
    c = QSGD(levels=4)  # 3 level bits + 1 sign bit = one nibble per entry
    assert c.from_bytes(struct.pack("<f", 2.0) + bytes([0x40]), 2).tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match="level above s"):
        c.from_bytes(struct.pack("<f", 2.0) + bytes([0x0A]), 2)  # level 5
    with pytest.raises(ValueError, match="signed zero"):
        c.from_bytes(struct.pack("<f", 2.0) + bytes([0x01]), 2)


def test_quantize_nearest_is_within_half_a_step():
    x = gaussian(5, 300)
    for bits in (1, 3, 8):
        c = Quantize(bits=bits, stochastic=False)
        enc = c.compress(x)
        lo, hi = x.min(dim=1).values, x.max(dim=1).values
        assert torch.equal(enc.parts["lo"], lo) and torch.equal(enc.parts["hi"], hi)
        step = (hi - lo) / (2**bits - 1)
        err = (c.decompress(enc) - x).abs()
        assert (err <= step[:, None] / 2 * (1 + 1e-5) + 1e-6).all()
        assert enc.parts["codes"].max() <= 2**bits - 1
        assert c.nominal_bytes(300) == 8 + (300 * bits + 7) // 8


def test_quantize_stochastic_is_unbiased_and_rounds_to_neighbours():
    x = gaussian(1, 10, seed=4)
    c = Quantize(bits=2)
    out = assert_unbiased(c, x)
    step = float(x.max() - x.min()) / 3
    assert ((out - x.double()).abs() <= step * (1 + 1e-5)).all()


def test_quantize_rejects_bad_ranges():
    c = Quantize(bits=8)
    for lo, hi in ((1.0, 0.0), (float("nan"), 1.0), (0.0, float("inf"))):
        with pytest.raises(ValueError, match="bad range"):
            c.from_bytes(struct.pack("<ff", lo, hi) + bytes(4), 4)


def test_scaled_sign_is_mean_magnitude_times_sign():
    x = torch.tensor([[1.0, -2.0, 0.0, -3.0, 4.0, 0.5, -0.5, 1.0, 2.0]])
    c = ScaledSign()
    enc = c.compress(x)
    scale = 14.0 / 9
    assert torch.allclose(c.decompress(enc), scale * torch.tensor(
        [[1.0, -1, 1, -1, 1, 1, -1, 1, 1]]))
    data = c.to_bytes(enc, 0)
    assert data[4:] == bytes([0b01001010, 0])  # negatives at 1, 3, 6
    assert not c.unbiased
    with pytest.raises(ValueError, match="nonzero padding"):
        c.from_bytes(data[:4] + bytes([0b01001010, 0b10]), 9)
