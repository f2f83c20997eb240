"""Secure aggregation (Bonawitz et al. 2017): Shamir sharing, masks that look uniform, a server
that only holds masked vectors yet gets the exact sum despite dropouts, byte counts, FedAvg
parity within the fixed-point bound, and one-line refusals."""

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from gossamer import config, wire
from gossamer.config import ConfigError
from gossamer.privacy.secagg import (
    CIPHER_BYTES,
    PRIME,
    SHARE_BYTES,
    Randomness,
    decode,
    encode,
    fixed_point_scale,
    pack_ring,
    pairwise_mask,
    prg,
    ring_mask,
    shamir_reconstruct,
    shamir_split,
    unpack_ring,
)
from gossamer.privacy.secagg_server import run_protocol
from gossamer.runtime.common import refuse_simulator_only
from gossamer.sim.drivers.sync_fl import SyncFLDriver
from gossamer.sim.experiment import build_experiment
from tests.conftest import small_config


def _inputs(n: int, size: int, bits: int, seed: int = 0) -> dict[int, np.ndarray]:
    gen = np.random.default_rng(seed)
    return {u: gen.integers(0, 1 << bits, size, dtype=np.uint64) for u in range(n)}


def _sum(inputs, ids, bits):
    return sum((inputs[u] for u in ids), np.zeros_like(inputs[0])) & ring_mask(bits)


# --- the pure parts ----------------------------------------------------------------------------
def test_shamir_reconstructs_from_any_t_shares_and_not_from_t_minus_1():
    rand, t, xs = Randomness(3), 3, [1, 2, 3, 4, 5]
    secret = int.from_bytes(rand.bytes(32), "little")
    ys = shamir_split(secret, t, xs, rand)
    for subset in itertools.combinations(range(len(xs)), t):
        assert shamir_reconstruct([xs[i] for i in subset], [ys[i] for i in subset]) == secret
    for subset in itertools.combinations(range(len(xs)), t - 1):
        assert shamir_reconstruct([xs[i] for i in subset], [ys[i] for i in subset]) != secret
    assert all(0 <= y < PRIME for y in ys)
    with pytest.raises(ValueError):
        shamir_split(secret, 6, xs, rand)


def test_fixed_point_round_trip_and_no_overflow_at_the_bound():
    bits, n, bound = 16, 10, 1.0
    scale = fixed_point_scale(bits, bound, n)
    # n values whose sum sits at the bound: the ring sum decodes without wrapping
    vals = np.full((n, 3), bound / n) * np.array([1.0, -1.0, 0.3])
    total = sum(encode(v, scale, bits) for v in vals) & ring_mask(bits)
    assert np.allclose(decode(total, scale, bits), vals.sum(0), atol=0.5 * n / scale)
    for b in (8, 16, 20, 32, 48):
        v = np.random.default_rng(b).integers(0, 1 << b, 37, dtype=np.uint64)
        buf = pack_ring(v, b)
        assert len(buf) == math.ceil(37 * b / 8) and (unpack_ring(buf, 37, b) == v).all()
    with pytest.raises(ValueError):
        fixed_point_scale(8, 1.0, 300)


def test_masked_inputs_look_uniform_on_a_small_ring():
    """Client 0's masked vector for a fixed input over 200 protocol seeds: chi-square on R = 2^8."""
    bits, size = 8, 64
    inputs = {u: np.full(size, 7, dtype=np.uint64) for u in range(3)}
    seen = np.concatenate([run_protocol(inputs, threshold=2, bits=bits, seed=s).masked[0]
                           for s in range(200)])
    counts = np.bincount(seen.astype(np.int64), minlength=256)
    assert chisquare(counts).pvalue > 1e-3
    assert counts[7] < 3 * counts.mean()                 # the input value is not over-represented


def test_the_server_only_holds_masked_inputs_and_the_masks_are_the_protocols():
    bits, size, n = 32, 257, 5
    inputs = _inputs(n, size, bits)
    res = run_protocol(inputs, threshold=3, bits=bits, seed=1, dropouts={4: "masked_input"})
    assert sorted(res.masked) == [0, 1, 2, 3]
    for u, y in res.masked.items():
        c = res.parties[u]
        mask = (prg(c.b_seed, size, bits) + pairwise_mask(c, size, bits)) & ring_mask(bits)
        assert ((y - inputs[u]) & ring_mask(bits) == mask).all()
        assert (y != inputs[u]).mean() > 0.99
    # nothing the server received contains an input, a self-mask seed or a DH secret key
    secrets = [inputs[u].astype("<u4").tobytes()[:64] for u in inputs]
    secrets += [c.b_seed for c in res.parties.values()]
    secrets += [c.s_key.private_bytes_raw() for c in res.parties.values()]
    for _, _, msg in res.transcript:
        assert not any(s in msg for s in secrets)


@pytest.mark.parametrize("dropouts", [
    {},                                                       # nobody drops
    {2: "masked_input"},                                      # one masked input never arrives
    {0: "masked_input", 3: "unmasking", 5: "masked_input"},   # n - t after masking
    {1: "advertise_keys", 4: "share_keys", 6: "masked_input"},
])
def test_the_unmasked_sum_is_exact_despite_dropouts(dropouts):
    bits, n, t = 32, 7, 4
    inputs = _inputs(n, 300, bits, seed=len(dropouts))
    res = run_protocol(inputs, threshold=t, bits=bits, dropouts=dropouts, seed=2)
    assert res.aborted is None
    expected_survivors = [u for u in range(n) if dropouts.get(u) not in
                          ("advertise_keys", "share_keys", "masked_input")]
    assert res.survivors == expected_survivors
    assert (res.total == _sum(inputs, expected_survivors, bits)).all()


@pytest.mark.parametrize("dropouts", [
    {0: "masked_input", 1: "masked_input", 2: "masked_input"},
    {0: "unmasking", 1: "unmasking", 2: "masked_input"},
    {0: "advertise_keys", 1: "share_keys", 2: "share_keys"},
])
def test_too_many_dropouts_abort(dropouts):
    res = run_protocol(_inputs(5, 10, 16), threshold=3, bits=16, dropouts=dropouts, seed=0)
    assert res.total is None and "threshold 3" in res.aborted


def test_bytes_are_the_encodings_lengths():
    bits, size, n = 20, 101, 4
    res = run_protocol(_inputs(n, size, bits), threshold=2, bits=bits, seed=0,
                       dropouts={3: "masked_input"})
    per_sender = {}
    for stage, u, msg in res.transcript:
        per_sender[stage, u] = per_sender.get((stage, u), 0) + len(msg)
    for stage, arr in res.sent.items():
        assert arr.tolist() == [per_sender.get((stage, u), 0) for u in range(n)]
    assert CIPHER_BYTES == 12 + 8 + 2 * SHARE_BYTES + 16
    assert res.sent["advertise_keys"].tolist() == [68] * n
    assert res.sent["share_keys"].tolist() == [4 + (n - 1) * (4 + CIPHER_BYTES)] * n
    assert res.sent["masked_input"].tolist() == [wire.HEADER_BYTES + math.ceil(size * bits / 8)] * 3 + [0]
    assert res.sent["unmasking"].tolist() == [4 + n * (5 + SHARE_BYTES)] * 3 + [0]
    assert res.received["advertise_keys"].tolist() == [4 + 68 * n] * n
    assert res.received["masked_input"].tolist() == [4 + 4 * 3] * 3 + [0]


# --- synchronous FL -----------------------------------------------------------------------------
def _driver(algorithm: str = "fedavg", **overrides) -> SyncFLDriver:
    cfg = small_config(algorithm, stop={"rounds": 3}, **overrides)
    return SyncFLDriver(build_experiment(config.validate(cfg)))


@pytest.mark.parametrize("noise", ["clients", "server"])
def test_dp_fedavg_inside_the_secure_sum_is_dp_fedavg(noise):
    """With client-level DP each client clips (and adds its noise share) before masking; the
    server learns the sum of the clipped updates, adds its noise if it is the one to, and
    divides by the expected clients: DP-FedAvg, to the fixed-point bound."""
    dp = {"level": "client", "clip_norm": 0.5, "noise_multiplier": 0.8, "noise": noise}
    plain = _driver(privacy={"dp": dp})
    secure = _driver(privacy={"dp": dp, "secure_aggregation": {"threshold": 2, "clip": 1.0}})
    for _ in range(3):
        plain.run_round()
        secure.run_round()
        assert torch.allclose(secure.state.params, plain.state.params, rtol=0, atol=1e-6)
    assert secure.dp_ledger.epsilon() == plain.dp_ledger.epsilon()


@pytest.mark.parametrize("algorithm,faults", [("fedavg", {}), ("fedavgm", {}),
                                              ("fedavg", {"message_loss": {"prob": 0.2}})])
def test_fedavg_with_secure_aggregation_is_fedavg_within_the_fixed_point_bound(algorithm, faults):
    sa = {"threshold": 2, "bits": 32, "clip": 1.0}
    plain = _driver(algorithm, faults=faults)
    secure = _driver(algorithm, faults=faults, privacy={"secure_aggregation": sa})
    n = plain.exp.num_nodes
    # every coordinate of the mean is off by at most (survivors / 2) / scale / (their weight share)
    bound = 0.5 * n / fixed_point_scale(32, 1.0, n) / (1 / n)
    for _ in range(3):
        plain.run_round()
        secure.run_round()
        assert (secure.state.params - plain.state.params).abs().max() <= bound + 1e-6
        assert secure.state.round == plain.state.round
    assert secure.secagg_aborted == 0 and secure.secagg_clipped == 0
    assert (secure.state.params != secure.exp.init_params.reshape(-1)).any()
    if faults:
        assert secure.lost > 0                  # dropouts after masking happened and were recovered


def test_driver_bytes_are_the_protocols():
    drv = _driver(privacy={"secure_aggregation": {"threshold": 0.5}})
    drv.run_round()
    n, numel = drv.exp.num_nodes, drv.exp.spec.numel
    sent = 68 + 4 + (n - 1) * (4 + CIPHER_BYTES) + wire.encoded_size(numel) + 4 + n * (5 + SHARE_BYTES)
    assert drv.sent_up.tolist() == [sent] * n and drv.bytes_up == n * sent
    received = (4 + 68 * n) + 4 + (n - 1) * (4 + CIPHER_BYTES) + 4 + 4 * n
    assert drv.accounting.bytes_down.tolist() == [wire.encoded_size(numel) + received] * n


def test_a_round_below_threshold_aborts_and_is_counted():
    # a threshold above the clients per round is refused when the experiment is built
    # (tests/test_config_edge_cases.py); raise it afterwards to make every round abort
    drv = _driver(privacy={"secure_aggregation": {"threshold": 8}})
    drv.secagg = drv.secagg.model_copy(update={"threshold": 50})
    start = drv.state.params.clone()
    for _ in range(2):
        drv.run_round()
    assert drv.secagg_aborted == 2 and drv.round == 2 and (drv.state.params == start).all()
    assert drv.evaluate()["secagg_aborted"] == 2


@pytest.mark.parametrize("overrides,field", [
    ({"algorithm": {"name": "fedavg", "params": {"aggregator": "median"}}}, "privacy.secure_aggregation"),
    ({"algorithm": {"name": "fedasync"}}, "privacy.secure_aggregation"),
    ({"algorithm": {"name": "scaffold"}}, "privacy.secure_aggregation"),
    ({"compression": {"uplink": {"name": "topk", "params": {"density": 0.1}}}}, "privacy.secure_aggregation"),
])
def test_what_does_not_combine_is_refused_in_one_line(overrides, field):
    cfg = {**small_config("fedavg", privacy={"secure_aggregation": {}}), **overrides}
    with pytest.raises(ConfigError) as err:
        build_experiment(config.validate(cfg))
    assert err.value.field == field and "\n" not in str(err.value)


def test_config_fields_and_what_the_runtime_refuses():
    for bad in ({"threshold": 1}, {"threshold": 1.5}, {"bits": 4}, {"clip": 0}, {"tau": 1}):
        with pytest.raises(ConfigError) as err:
            config.validate(small_config("fedavg", privacy={"secure_aggregation": bad}))
        assert str(err.value).startswith("privacy.secure_aggregation.") and "\n" not in str(err.value)
    cfg = config.validate(small_config("fedavg", privacy={"secure_aggregation": {"threshold": 3}}))
    assert cfg.privacy.secure_aggregation.threshold == 3
    refuse_simulator_only(cfg)                     # secure aggregation runs on real processes
    refuse_simulator_only(config.validate(small_config("fedavg", privacy={
        "secure_aggregation": {"threshold": 3},
        "dp": {"level": "client", "clip_norm": 1.0, "noise_multiplier": 1.0}})))    # with DP too
