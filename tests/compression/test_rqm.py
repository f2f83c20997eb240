"""RQM (Youn et al. 2023, arXiv:2306.11913): the sampler draws the mechanism's distribution,
is unbiased inside [-c, c], and its wire format is the documented bit-packed level indices."""

import itertools

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from gossamer.compression import build_compressor
from gossamer.compression.rqm import RQM


def enumerated_pmf(x, c, extension, m, q):
    """The mechanism by its definition: every kept set of interior levels, then rounding."""
    levels = -(c + extension) + np.arange(m) * 2 * (c + extension) / (m - 1)
    x = min(max(x, -c), c)
    pmf = np.zeros(m)
    for keep in itertools.product((0, 1), repeat=m - 2):
        kept = [0] + [i + 1 for i, k in enumerate(keep) if k] + [m - 1]
        weight = np.prod([q if k else 1 - q for k in keep])
        lo = max(i for i in kept if levels[i] <= x)
        hi = min(i for i in kept if levels[i] > x) if lo < m - 1 else lo
        up = (x - levels[lo]) / (levels[hi] - levels[lo])
        pmf[lo] += weight * (1 - up)
        pmf[hi] += weight * up
    return pmf


@pytest.mark.parametrize("c,extension,m,q,x", [
    (1.0, 1.0, 5, 0.4, 0.37), (1.0, 0.5, 7, 0.3, -0.8), (0.5, 0.2, 4, 0.7, 0.5),
    (1.0, 1.0, 6, 0.5, 0.0), (1.0, 0.0, 5, 0.5, 0.5), (1.0, 1.0, 2, 0.5, 3.0)])
def test_sampler_draws_the_mechanisms_distribution(c, extension, m, q, x):
    # one row of 400k copies of x: each coordinate is an independent draw (fixed seed)
    comp = RQM(c=c, levels=m, q=q, extension=extension)
    n = 400_000
    index = comp.compress(torch.full((1, n), x), seed=3).parts["index"][0].numpy()
    counts = np.bincount(index, minlength=m)
    pmf = enumerated_pmf(x, c, extension, m, q)
    assert counts[pmf == 0].sum() == 0
    assert chisquare(counts[pmf > 0], pmf[pmf > 0] * n).pvalue > 1e-3


def test_unbiased_inside_the_clip_range_and_clipped_outside():
    comp = RQM(c=0.5, levels=9, q=0.3, extension=0.25)
    x = torch.tensor([-0.5, -0.31, 0.0, 0.12, 0.4999, 0.5, 2.0, -7.0])
    rows = 40_000
    batch = x.expand(rows, -1).contiguous()
    decoded = comp.decompress(comp.compress(batch, seed=11)).double()
    target = x.double().clamp(-0.5, 0.5)
    se = decoded.std(0) / rows**0.5
    assert torch.all((decoded.mean(0) - target).abs() < 5 * se + 1e-12)
    assert set(np.unique(decoded.numpy()).round(6)) <= set(
        (-0.75 + np.arange(9) * 1.5 / 8).round(6))


def test_q_one_is_plain_stochastic_rounding_between_adjacent_levels():
    comp = RQM(c=1.0, levels=5, q=1.0, extension=1.0)     # levels -2, -1, 0, 1, 2
    out = comp.decompress(comp.compress(torch.full((1, 1000), 0.25), seed=0))
    assert set(out[0].tolist()) == {0.0, 1.0}


def test_wire_format_is_bit_packed_level_indices():
    comp = RQM(c=1.0, levels=5, q=0.5, extension=1.0)     # 3-bit codes, levels -2..2 step 1
    enc = comp.compress(torch.zeros(1, 3), seed=0)
    enc.parts["index"][0] = torch.tensor([1, 4, 2], dtype=torch.int32)
    data = comp.to_bytes(enc, 0)
    # codes LSB first: 1 -> 100, 4 -> 001, 2 -> 010; stream 10000101 0 -> 0xA1 0x00
    assert data == bytes([0xA1, 0x00]) and enc.nbytes[0] == 2 == comp.nominal_bytes(3)
    assert comp.from_bytes(data, 3).tolist() == [-1.0, 2.0, 0.0]
    assert RQM(levels=2).nominal_bytes(17) == 3 and RQM(levels=256).nominal_bytes(3) == 3


def test_receiver_rejects_level_indices_out_of_range():
    comp = RQM(levels=5)
    with pytest.raises(ValueError, match="out of range"):
        comp.from_bytes(bytes([0x07, 0x00]), 3)              # index 7 with 5 levels
    with pytest.raises(ValueError, match="padding"):
        comp.from_bytes(bytes([0x00, 0x80]), 3)


def test_parameters_are_checked_in_one_line():
    for params, msg in [({"levels": 1}, "levels must be an int"), ({"q": 0}, "q must be"),
                        ({"c": 0}, "c must be"), ({"extension": -1}, "extension must be")]:
        with pytest.raises(ValueError, match=msg):
            build_compressor("rqm", params)
