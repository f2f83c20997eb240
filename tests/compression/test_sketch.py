"""Count sketch (linear, exact bytes, hostile payloads refused, heavy hitters recovered) and
FetchSGD's server step, alone and in a simulated FL run."""

import csv
import json

import numpy as np
import pytest
import torch

from gossamer import config, rng, wire
from gossamer.compression import build_compressor, fetchsgd_step
from gossamer.compression.base import TAG_COUNTSKETCH
from gossamer.compression.sketch import SHARED_KEY
from gossamer.config import ConfigError
from gossamer.protocols.upload import FETCHSGD_ERROR, FETCHSGD_MOMENTUM, Compress, Uploads
from gossamer.sim.drivers.sync_fl import SyncFLDriver
from gossamer.sim.experiment import build_experiment
from gossamer.sim.runner import Runner
from tests.conftest import run_split, small_config

P = 300


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _integers(n, seed):
    return torch.randint(-50, 51, (n, P), generator=_gen(seed)).float()


def fetch_config(rounds=8, reset="zero_buckets", **params):
    sketch = {"rows": 5, "ratio": 0.5, "density": 0.05, **params}
    return small_config("fedavg", stop={"rounds": rounds}, compression={
        "uplink": {"name": "countsketch", "params": sketch}, "feedback": "fetchsgd",
        "momentum": 0.9, "reset": reset})


def _run(cfg, out):
    runner = Runner(config.validate(cfg), out)
    runner.prepare(resume=False)
    runner.run()
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return rows, json.loads((out / "summary.json").read_text())


# --------------------------------------------------------------------------- the sketch


def test_sketches_add_exactly_and_ignore_the_sender():
    cs = build_compressor("countsketch", {"rows": 5, "columns": 40})
    a, b = _integers(3, 0), _integers(3, 1)          # integer sums are exact in float32
    sa, sb = cs.sketch(a, seed=4), cs.sketch(b, seed=4)
    assert torch.equal(sa + sb, cs.sketch(a + b, seed=4))
    assert torch.equal(sa.sum(0), cs.sketch(a.sum(0, keepdim=True), seed=4)[0])
    x, y = torch.randn(2, P, generator=_gen(2)), torch.randn(2, P, generator=_gen(3))
    assert torch.allclose(cs.sketch(x) + cs.sketch(y), cs.sketch(x + y), atol=1e-5)
    # the hashes depend on the seed only: any sender in any round sketches with the same map
    one = cs.compress(a[:1], seed=4, keys=np.array([5]))
    other = cs.compress(a[:1], seed=4, keys=np.array([(7 << 32) + 9]))
    assert torch.equal(one.parts["table"], other.parts["table"])
    assert not torch.equal(cs.compress(a[:1], seed=5).parts["table"], one.parts["table"])


def test_hashes_are_the_documented_counter_based_formula():
    cs = build_compressor("countsketch", {"rows": 3, "columns": 37})
    buckets, signs = cs.hashes(P, 11)
    prefix = rng.hash_u64(11, rng.STREAM_COMPRESS, SHARED_KEY, TAG_COUNTSKETCH, np.arange(3))
    with np.errstate(over="ignore"):
        v = rng._splitmix64(prefix[:, None] ^ np.arange(P, dtype=np.uint64)[None, :])
    want = ((v >> np.uint64(32)) * np.uint64(37)) >> np.uint64(32)
    assert np.array_equal(buckets.numpy(), want.astype(np.int64))
    assert np.array_equal(signs.numpy(), np.where(v & np.uint64(1), -1.0, 1.0).astype(np.float32))
    assert 0 <= int(buckets.min()) and int(buckets.max()) < 37
    # the table is that map: bucket b of row i sums s_i(j) x_j over h_i(j) = b
    x = torch.randn(1, P, generator=_gen(0))
    table = cs.sketch(x, seed=11)[0]
    dense = torch.zeros(3, 37, dtype=torch.float64)
    for i in range(3):
        dense[i].index_add_(0, buckets[i], (x[0] * signs[i]).double())
    assert torch.allclose(table.double(), dense, atol=1e-5)


def test_a_rows_sketch_does_not_depend_on_the_batch():
    cs = build_compressor("countsketch", {"rows": 5, "columns": 23, "k": 7})
    x = torch.randn(6, P, generator=_gen(1))
    enc = cs.compress(x, seed=3)
    for i in (0, 4):
        alone = cs.compress(x[i:i + 1], seed=3)
        assert torch.equal(alone.parts["table"][0], enc.parts["table"][i])
        assert cs.to_bytes(alone, 0) == cs.to_bytes(enc, i)
    assert torch.equal(cs.decompress(cs.compress(x.flip(0), seed=3)).flip(0), cs.decompress(enc))


def test_heavy_hitters_are_recovered_exactly():
    p, big = 5000, torch.tensor([0, 17, 1234, 3001, 4999])
    x = 0.01 * torch.randn(1, p, generator=_gen(5))
    x[0, big] = torch.tensor([40.0, -25.0, 12.0, -60.0, 8.0])
    cs = build_compressor("countsketch", {"rows": 5, "columns": 200, "k": 5})   # 20x smaller
    enc = cs.compress(x, seed=9)
    out = cs.decompress(enc)[0]
    assert torch.equal(torch.nonzero(out).reshape(-1), big)
    assert torch.allclose(out[big], x[0, big], atol=0.3)     # off by the colliding noise only
    # every coordinate's estimate (no k): median over rows, close for the heavy ones too
    every = build_compressor("countsketch", {"rows": 5, "columns": 200}).decompress(enc)[0]
    assert torch.equal(every[big], out[big])
    assert float((every - x[0]).abs().median()) < 0.1


def test_heavy_hitter_ties_go_to_the_lower_index():
    from gossamer.compression.sketch import CountSketch

    g = _gen(0)
    for _ in range(20):                          # small integers: many equal magnitudes
        x = torch.randint(-4, 5, (5, 60), generator=g).float()
        k = int(torch.randint(1, 61, (1,), generator=g))
        want = torch.sort(x.abs(), dim=1, descending=True, stable=True).indices[:, :k]
        assert torch.equal(CountSketch.heavy_hitters(x, k), want.sort(dim=1).values)
    nan = torch.tensor([[1.0, float("nan"), -3.0, float("inf"), 2.0]])
    assert CountSketch.heavy_hitters(nan, 3).tolist() == [[1, 2, 3]]


def test_estimates_are_the_median_of_the_rows():
    x = torch.randn(1, P, generator=_gen(7))
    for rows in (1, 2, 3, 4, 17):
        cs = build_compressor("countsketch", {"rows": rows, "columns": 11})
        table = cs.sketch(x, seed=2)[0]
        buckets, signs = cs.hashes(P, 2)
        per_row = torch.stack([signs[i] * table[i, buckets[i]] for i in range(rows)])
        s = per_row.sort(dim=0).values
        want = s[rows // 2] if rows % 2 else s[rows // 2 - 1] * 0.5 + s[rows // 2] * 0.5
        assert torch.equal(cs.decompress(cs.compress(x, seed=2))[0], want)


def test_one_rows_estimate_is_unbiased_over_the_hash_functions():
    x = torch.linspace(-2.0, 3.0, 40)[None]
    cs = build_compressor("countsketch", {"rows": 1, "columns": 8})
    seeds = 600
    mean = sum(cs.decompress(cs.compress(x, seed=s))[0] for s in range(seeds)) / seeds
    # each estimate is x_j plus ~5 colliding terms of random sign (std ~ 4 over 600 seeds: 0.17)
    assert float((mean - x[0]).abs().max()) < 0.8
    assert not cs.unbiased                      # for one seed it is a fixed function of x


def test_bytes_are_the_row_major_float32_table():
    cs = build_compressor("countsketch", {"rows": 4, "ratio": 0.2})
    c = cs.columns_for(P)
    assert c == 15 and cs.nominal_bytes(P) == 4 * 4 * 15
    x = torch.randn(3, P, generator=_gen(0))
    enc = cs.compress(x, seed=1)
    assert enc.nbytes.tolist() == [240] * 3
    for i in range(3):
        data = cs.to_bytes(enc, i)
        assert len(data) == enc.nbytes[i]
        table = np.frombuffer(data, dtype="<f4").reshape(4, c)
        assert np.array_equal(table, enc.parts["table"][i].numpy())
        assert torch.equal(cs.from_bytes(data, P, seed=1), cs.decompress(enc)[i])


def test_hostile_payloads_are_refused():
    cs = build_compressor("countsketch", {"rows": 3, "columns": 10, "k": 4})
    data = cs.to_bytes(cs.compress(torch.randn(1, P, generator=_gen(0))), 0)
    for bad in (b"", data[:-1], data[:-4], data + b"\x00" * 4):
        with pytest.raises(ValueError, match="countsketch payload has .* bytes, expected 120"):
            cs.from_bytes(bad, P)
    for value in (float("nan"), float("inf"), float("-inf")):
        table = np.frombuffer(data, dtype="<f4").copy()
        table[17] = value
        with pytest.raises(ValueError, match="non-finite"):
            cs.from_bytes(table.tobytes(), P)


@pytest.mark.parametrize("params, message", [
    ({"rows": 3}, "exactly one of columns or ratio"),
    ({"columns": 4, "ratio": 0.1}, "exactly one of columns or ratio"),
    ({"rows": 0, "columns": 4}, "rows must be an int in"),
    ({"columns": 0}, "columns must be an int"),
    ({"ratio": 1.5}, r"ratio must be a number in \(0, 1\]"),
    ({"columns": 4, "k": 2, "density": 0.1}, "at most one of k or density"),
])
def test_bad_params_are_one_line(params, message):
    with pytest.raises(ValueError, match=message):
        build_compressor("countsketch", params)


# --------------------------------------------------------------------------- FetchSGD's step


def _step_case(reset, columns=4000):
    cs = build_compressor("countsketch", {"rows": 3, "columns": columns, "k": 6})
    x = 0.01 * torch.randn(P, generator=_gen(3))
    x[[3, 50, 120, 200, 250, 299]] = torch.tensor([5.0, -4.0, 3.0, -6.0, 2.0, 7.0])
    table = cs.sketch(x[None], seed=1)[0]
    return cs, x, table, fetchsgd_step(cs, table, None, None, numel=P, seed=1, rho=0.9, reset=reset)


def test_subtract_leaves_the_sketch_of_what_was_not_extracted():
    cs, x, table, step = _step_case("subtract")
    assert step.indices.tolist() == [3, 50, 120, 200, 250, 299]
    assert torch.count_nonzero(step.update) == 6
    # S_e - S(Delta) is the sketch of x - Delta (linearity), and Delta's estimates are gone
    assert torch.allclose(step.error, cs.sketch((x - step.update)[None], seed=1)[0], atol=1e-5)
    assert torch.equal(cs.estimate(step.error[None], P, seed=1, indices=step.indices)[0],
                       torch.zeros(6))
    assert torch.equal(cs.estimate(step.momentum[None], P, seed=1, indices=step.indices)[0],
                       torch.zeros(6))
    # next round: momentum rho S_u + S_g, error S_e + S_u
    nxt = fetchsgd_step(cs, table, step.momentum, step.error, numel=P, seed=1, rho=0.9,
                        reset="subtract")
    u = table + 0.9 * step.momentum
    assert torch.allclose(nxt.error + cs.sketch(nxt.update[None], seed=1)[0], step.error + u,
                          atol=1e-5)


def test_zero_buckets_clears_exactly_the_extracted_buckets():
    cs, x, table, step = _step_case("zero_buckets", columns=50)
    buckets, _ = cs.hashes(P, 1)
    hit = torch.zeros(3, 50, dtype=torch.bool)
    hit.scatter_(1, buckets[:, step.indices], True)
    assert torch.equal(step.error[hit], torch.zeros(int(hit.sum())))
    assert torch.equal(step.error[~hit], table[~hit]) and torch.equal(step.momentum, step.error)
    assert torch.equal(step.update[step.indices], cs.estimate(table[None], P, seed=1)[0, step.indices])


def test_fetchsgd_needs_heavy_hitters_and_a_known_reset():
    cs = build_compressor("countsketch", {"rows": 3, "columns": 10})
    with pytest.raises(ValueError, match="k heavy hitters"):
        fetchsgd_step(cs, torch.zeros(3, 10), None, None, numel=P)
    cs = build_compressor("countsketch", {"rows": 3, "columns": 10, "k": 2})
    with pytest.raises(ValueError, match="reset must be one of"):
        fetchsgd_step(cs, torch.zeros(3, 10), None, None, numel=P, reset="halve")


# --------------------------------------------------------------------------- in federated learning


def test_the_upload_stage_sends_sketches_and_the_server_sums_them():
    cs = build_compressor("countsketch", {"rows": 3, "columns": 40, "k": 5})
    comp = Compress(cs, "fetchsgd", seed=11, momentum_factor=0.5)
    assert comp.init(3, P) == {} and comp.nominal_bytes(P, 1) == 4 * 3 * 40
    start = torch.randn(P, generator=_gen(0))
    up = Uploads.of(4, np.array([4, 1, 7]), start, start + torch.randn(3, P, generator=_gen(1)))
    sent, decoded, state = comp.apply(up, {})
    assert decoded is None and state == {}
    for b in range(3):                  # a client alone puts its table on the wire, bit for bit
        one = Uploads.of(4, up.clients[b: b + 1], start, up.model[b: b + 1])
        data = comp.to_bytes(comp.apply(one, {})[0])
        assert len(data) == 480 and torch.equal(cs.table_from_bytes(data, P),
                                                sent.encoded.parts["table"][b])
    w = torch.tensor([0.5, 0.25, 0.25])
    update, extra = comp.fetch({"server_m": torch.ones(2)}, sent.encoded.parts["table"], w, P)
    table = (w[:, None, None] * sent.encoded.parts["table"]).sum(0)
    want = fetchsgd_step(cs, table, None, None, numel=P, seed=11)
    assert torch.equal(update, want.update) and torch.count_nonzero(update) == 5
    assert torch.equal(extra[FETCHSGD_ERROR], want.error) and "server_m" in extra
    assert torch.allclose(table, cs.sketch((w @ up.delta())[None], seed=11)[0], atol=1e-5)
    again, _ = comp.fetch(extra, sent.encoded.parts["table"], w, P)      # momentum 0.5 carried
    second = fetchsgd_step(cs, table, want.momentum, want.error, numel=P, seed=11, rho=0.5)
    assert torch.equal(again, second.update)



def test_fetchsgd_trains_and_uploads_cost_the_table(tmp_path):
    cfg = fetch_config(rounds=10)
    rows, summary = _run(cfg, tmp_path / "run")
    exp = build_experiment(config.validate(cfg))
    cs = exp.uplink
    r, c = cs.rows, cs.columns_for(exp.spec.numel)
    per_upload = wire.HEADER_BYTES + 4 * r * c                    # the header + the table
    assert per_upload == 28 + 4 * 5 * round(0.5 * exp.spec.numel / 5)
    assert all(int(row["bytes_up"]) == int(row["round"]) * 8 * per_upload for row in rows)
    assert summary["bytes_sent_total"] == 10 * 8 * per_upload
    first, last = rows[0], rows[-1]
    assert float(last["test_accuracy"]) > 0.4                    # 10 classes: chance is 0.1
    assert float(last["test_loss"]) < float(first["test_loss"]) - 0.3


def test_the_server_keeps_momentum_and_error_sketches_and_resumes_identically(tmp_path):
    cfg = fetch_config(rounds=4)
    driver = SyncFLDriver(build_experiment(config.validate(cfg)))
    driver.run_round()
    r, c = driver.exp.uplink.rows, driver.exp.uplink.columns_for(driver.exp.spec.numel)
    assert driver.stage_state == {}                                  # nothing on the clients
    assert driver.state.extra[FETCHSGD_MOMENTUM].shape == (r, c)
    assert driver.state.extra[FETCHSGD_ERROR].shape == (r, c)
    assert driver.sent_up.tolist() == [wire.HEADER_BYTES + 4 * r * c] * 8
    run_split(cfg, tmp_path, split=2, total=4).run()
    assert (tmp_path / "a/metrics.csv").read_bytes() == (tmp_path / "b/metrics.csv").read_bytes()


def test_a_collision_free_sketch_of_everything_without_momentum_is_fedavg(tmp_path):
    plain, _ = _run(small_config("fedavg", stop={"rounds": 3}), tmp_path / "plain")
    # 5 rows of 200,000 buckets: no coordinate of the 1,210 shares a bucket in 3 rows, so every
    # median is the coordinate's own (weighted mean) value
    cfg = fetch_config(rounds=3, ratio=None, rows=5, columns=200_000, density=1.0)
    cfg["compression"]["momentum"] = 0.0
    fetched, _ = _run(cfg, tmp_path / "fetch")
    assert [r["test_accuracy"] for r in fetched] == [r["test_accuracy"] for r in plain]
    assert np.allclose([float(r["test_loss"]) for r in fetched],
                       [float(r["test_loss"]) for r in plain], rtol=0, atol=1e-5)


def test_fetchsgd_refusals_are_one_line():
    topk = fetch_config()
    topk["compression"]["uplink"] = {"name": "topk", "params": {"density": 0.1}}
    with pytest.raises(ConfigError, match="fetchsgd needs the countsketch uplink compressor"):
        config.validate(topk)
    no_k = fetch_config(density=None)
    del no_k["compression"]["uplink"]["params"]["density"]
    with pytest.raises(ConfigError, match="heavy hitters"):
        config.validate(no_k)
    median = fetch_config()
    median["algorithm"]["params"] = {"aggregator": "median"}
    with pytest.raises(ConfigError, match="compression.feedback.*aggregates more than that mean"):
        build_experiment(config.validate(median))
    scaffold = fetch_config()
    scaffold["algorithm"] = {"name": "scaffold"}
    with pytest.raises(ConfigError, match="compression.feedback"):
        build_experiment(config.validate(scaffold))
    from gossamer.runtime.common import refuse_simulator_only

    refuse_simulator_only(config.validate(fetch_config()))     # real processes run it too


def test_a_sketched_gradient_still_reveals_the_image_it_was_computed_on():
    """Song et al. (ICML 2023): sketching is not privacy. benchmarks/sketch_leakage.py reads a
    client's one training image off its count-sketched gradient; at a tenth of the model's size
    the rank-one reading is far closer to the image than any guess made without the gradient."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "sketch_leakage.py"
    spec = importlib.util.spec_from_file_location("sketch_leakage", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    report = module.measure(8, [1.0, 0.1])
    base = report["baseline"]
    assert base["exact_gradient"] > 0.999 and base["exact_gradient_rank_one"] > 0.999
    guess = max(base["mean_image"], base["another_image"])
    exact_size, tenth = report["sketches"]
    assert exact_size["all_rank_one"] > 0.95
    assert tenth["all_rank_one"] > guess + 0.1                 # the sketch leaks the image
    assert tenth["all_rank_one"] > tenth["all"]                # the structure is what leaks
