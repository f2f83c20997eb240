"""One contract over every registered compressor: exact bytes, faithful wire, row independence."""

import numpy as np
import pytest
import torch

from gossamer import rng
from gossamer.compression import COMPRESSORS, build_compressor
from gossamer.compression.base import row_uniform
from tests.compression.cases import CASES, SPEC, P

SEED = 7
KEYS = np.array([3, 2**32 + 5, 11, 12, 2**40 + 1], dtype=np.int64)


def batch() -> torch.Tensor:
    x = torch.randn(len(KEYS), P, generator=torch.Generator().manual_seed(0))
    x[3] = 0.0                     # an all-zero row (zero norm, zero range)
    x[4, ::2] = 0.0                # many exact zeros
    return x


@pytest.fixture(params=CASES, ids=[f"{n}-{p}" for n, p in CASES])
def case(request):
    name, params = request.param
    return build_compressor(name, params, spec=SPEC)


def test_every_registered_compressor_has_a_case():
    assert {name for name, _ in CASES} == set(COMPRESSORS.names())


def test_wire_matches_decompress_and_byte_count(case):
    x = batch()
    enc = case.compress(x, seed=SEED, keys=KEYS)
    dense = case.decompress(enc)
    assert dense.shape == x.shape and dense.dtype == torch.float32
    assert torch.isfinite(dense).all()
    assert enc.nbytes.dtype == np.int64 and enc.nbytes.shape == (len(KEYS),)
    nominal = case.nominal_bytes(P)
    for i, key in enumerate(KEYS):
        data = case.to_bytes(enc, i)
        assert isinstance(data, bytes)
        assert len(data) == enc.nbytes[i]
        if nominal is not None:
            assert len(data) == nominal
        assert torch.equal(case.from_bytes(data, P, seed=SEED, key=int(key)), dense[i])
    if case.name != "rqm":        # RQM is a DP mechanism: zero must not decode to zero surely
        assert torch.equal(dense[3], torch.zeros(P))  # an all-zero row decodes to zeros


def test_row_does_not_depend_on_batch(case):
    x = batch()
    enc = case.compress(x, seed=SEED, keys=KEYS)
    dense = case.decompress(enc)
    for i in (0, 2, 4):
        alone = case.compress(x[i:i + 1], seed=SEED, keys=KEYS[i:i + 1])
        assert torch.equal(case.decompress(alone)[0], dense[i])
        assert case.to_bytes(alone, 0) == case.to_bytes(enc, i)
    swapped = case.compress(x.flip(0), seed=SEED, keys=KEYS[::-1].copy())
    assert torch.equal(case.decompress(swapped).flip(0), dense)


def test_same_seed_same_result_and_keys_matter(case):
    x = batch()
    first = case.decompress(case.compress(x, seed=SEED, keys=KEYS))
    assert torch.equal(case.decompress(case.compress(x, seed=SEED, keys=KEYS)), first)
    if case.name in ("randk", "qsgd", "rqm") or (case.name == "quantize" and case.stochastic):
        other = case.decompress(case.compress(x, seed=SEED, keys=KEYS + 1))
        assert not torch.equal(other, first)


def test_default_keys_are_row_numbers(case):
    x = batch()[:3]
    default = case.decompress(case.compress(x, seed=SEED))
    explicit = case.decompress(case.compress(x, seed=SEED, keys=np.arange(3)))
    assert torch.equal(default, explicit)
    with pytest.raises(ValueError, match="keys has 2 entries for 3 rows"):
        case.compress(x, keys=np.arange(2))


def test_malformed_payloads_raise(case):
    enc = case.compress(batch(), seed=SEED, keys=KEYS)
    data = case.to_bytes(enc, 0)
    for bad in (data[:-1], data + b"\x00", data + b"\x01" * 9, b""):
        if bad == data:
            continue
        with pytest.raises(ValueError):
            case.from_bytes(bad, P, seed=SEED, key=int(KEYS[0]))


def test_refuses_non_float32_batches(case):
    with pytest.raises(ValueError, match="float32"):
        case.compress(batch().double())
    with pytest.raises(ValueError, match="float32"):
        case.compress(batch()[0])


def test_build_errors_are_one_line():
    with pytest.raises(ValueError, match="needs the model's parameter layout"):
        build_compressor("powersgd", {"rank": 1})
    with pytest.raises(ValueError, match="unexpected keyword"):
        build_compressor("topk", {"density": 0.1, "dens": 2})
    with pytest.raises(ValueError, match=r"density must be a number in \(0, 1\]"):
        build_compressor("topk", {"density": 1.5})
    with pytest.raises(ValueError, match="exactly one of density or k"):
        build_compressor("topk", {})
    with pytest.raises(ValueError, match="bits must be an int in"):
        build_compressor("quantize", {"bits": 17})
    with pytest.raises(ValueError, match="coding must be"):
        build_compressor("qsgd", {"coding": "huffman"})
    with pytest.raises(KeyError, match="unknown compressor"):
        build_compressor("zip", {})


def test_row_uniform_is_the_rng_reference():
    # The torch int64 splitmix must equal gossamer.rng's numpy uint64 one, bit for bit.
    keys = np.array([0, 5, -3, 2**62 + 7, 2**40], dtype=np.int64)
    got = row_uniform(9, keys, 2, 500, 4).numpy()
    want = rng.uniform(9, rng.STREAM_COMPRESS, keys[:, None], 2, 4, np.arange(500)[None, :])
    assert np.array_equal(got, want)
