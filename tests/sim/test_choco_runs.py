"""CHOCO-SGD in the simulator: D-PSGD as the identity case, consensus under compression,
bytes from the real encodings, exact resume, and one-line refusals."""

import json

import numpy as np
import pytest
import torch

from gossamer import wire
from gossamer.cli import main
from tests.conftest import run_split
from tests.sim.test_dpsgd_variants_runs import _cfg as dpsgd_cfg
from tests.sim.test_dpsgd_variants_runs import _driver, _rounds

TOPK = {"compressor": "topk", "compressor_params": {"density": 0.1}, "gamma": 0.3}


def _cfg(params=None, name="choco", **overrides):
    return dpsgd_cfg(params, name, **overrides)


@pytest.mark.parametrize("params", [{}, {"gossip_steps": 2}])
def test_identity_compressor_with_gamma_one_is_dpsgd(params):
    """Same bytes, time and per-node bytes exactly; models equal up to float rounding, since
    CHOCO computes ``x + (W x - x)`` where D-PSGD computes ``W x``."""
    choco, dpsgd = _rounds(_driver(_cfg(params)), 4), _rounds(_driver(_cfg(params, "dpsgd")), 4)
    assert torch.allclose(choco.params, dpsgd.params, atol=1e-5)
    assert (choco.bytes_up, choco.bytes_down, choco.sim_time) == (dpsgd.bytes_up, dpsgd.bytes_down, dpsgd.sim_time)
    assert np.array_equal(choco.node_bytes, dpsgd.node_bytes)
    a, b = choco.evaluate(), dpsgd.evaluate()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key


def test_topk_gossip_pulls_independent_models_together():
    """Independent inits, almost no training: the consensus distance falls every round."""
    cfg = _cfg({**TOPK, "gossip_steps": 5, "public_init": "zero"}, model={"name": "mlp", "params": {
        "hidden": [16]}, "init": "independent"}, local={"epochs": 1, "batch_size": 16, "lr": 1e-4})
    d = _driver(cfg)
    dists = [d.evaluate()["consensus_distance"]]
    for _ in range(6):
        d.run_round()
        dists.append(d.evaluate()["consensus_distance"])
    assert all(b < a for a, b in zip(dists, dists[1:], strict=False)) and dists[-1] < 0.3 * dists[0]
    alone = _rounds(_driver(_cfg({"schedule": "local_only"}, name="dpsgd", model=cfg["model"],
                                 local=cfg["local"])), 6)
    assert dists[-1] < 0.3 * alone.evaluate()["consensus_distance"]


def test_compressed_training_keeps_consensus_close_to_dpsgd():
    choco, dpsgd = _rounds(_driver(_cfg(TOPK)), 6), _rounds(_driver(_cfg(name="dpsgd")), 6)
    alone = _rounds(_driver(_cfg({"schedule": "local_only"}, name="dpsgd")), 6)
    c, d, a = (x.evaluate()["consensus_distance"] for x in (choco, dpsgd, alone))
    assert d < c < 0.5 * a
    assert choco.bytes_up < 0.25 * dpsgd.bytes_up


def test_fixed_size_messages_cost_header_plus_payload_per_link_and_step():
    d = _rounds(_driver(_cfg({**TOPK, "gossip_steps": 3})), 2)
    msg = wire.HEADER_BYTES + d.compressor.nominal_bytes(d.exp.spec.numel)
    links = len(d.graph.src)                                     # ring of 8: 16 directed links
    assert d.bytes_up == d.bytes_down == 2 * 3 * links * msg
    assert (d.node_bytes == 2 * 3 * 4 * msg).all()              # 2 sent + 2 received per step


def test_value_dependent_messages_cost_their_senders_encodings(monkeypatch):
    d = _driver(_cfg({"compressor": "qsgd", "compressor_params": {"coding": "elias"}, "gamma": 0.2}))
    sizes = []
    compress = d.compressor.compress

    def spy(x, **kw):
        enc = compress(x, **kw)
        sizes.append(enc.nbytes.copy())
        assert [len(d.compressor.to_bytes(enc, i)) for i in range(enc.rows)] == enc.nbytes.tolist()
        return enc

    monkeypatch.setattr(d.compressor, "compress", spy)
    t0 = d.sim_time
    _rounds(d, 2)
    msg = [wire.HEADER_BYTES + s for s in sizes]
    assert len(set(np.concatenate(sizes).tolist())) > 1          # sizes do differ per node
    assert d.bytes_up == sum(int(m[d.graph.src].sum()) for m in msg)
    out_deg = np.bincount(d.graph.src, minlength=8)
    assert np.array_equal(d.node_bytes, sum(out_deg * m + np.bincount(d.graph.dst, m[d.graph.src], 8) for m in msg))
    assert d.sim_time > t0


@pytest.mark.parametrize("params", [TOPK, {"compressor": "quantize", "compressor_params": {"bits": 4},
                                           "gamma": 0.5, "gossip_steps": 2}])
def test_resume_is_identical(tmp_path, params):
    rest = run_split(_cfg(params), tmp_path, split=3, total=6)
    d = rest.driver                                           # x̂ was restored, not rebuilt
    assert d.round == 3 and not torch.equal(d.public, d.exp.init_params.expand_as(d.public))
    rest.run()
    assert (tmp_path / "a/metrics.csv").read_bytes() == (tmp_path / "b/metrics.csv").read_bytes()


def test_a_run_writes_dl_metrics_and_bytes(tmp_path, write_config):
    path = write_config(_cfg(TOPK, stop={"rounds": 2}))
    assert main(["run", str(path), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["mean_bytes_per_node"] > 0


@pytest.mark.parametrize("change, field", [
    ({"faults": {"message_loss": {"prob": 0.1}}}, "faults"),
    ({"system": {"availability": {"model": "markov"}}}, "system.availability"),
    ({"topology": {"name": "random_regular", "params": {"degree": 3}, "resample": "every_round"}}, "topology"),
    ({"adversary": {"attack": "sign_flip", "fraction": 0.25}}, "adversary.attack"),
    ({"model": {"name": "mlp", "params": {"hidden": [16]}, "init": "independent"}},
     "algorithm.params.public_init"),
    ({"algorithm": {"name": "choco", "params": {"gamma": 2}}}, "algorithm.params"),
    ({"algorithm": {"name": "choco", "params": {"compressor": "powersgd",
                                                "compressor_params": {"rank": 0}}}},
     "algorithm.params.compressor_params"),
    ({"compression": {"uplink": {"name": "topk", "params": {"density": 0.1}}}}, "compression.uplink"),
])
def test_unsupported_set_ups_are_one_line_exit_2(write_config, tmp_path, capsys, change, field):
    cfg = _cfg(TOPK, stop={"rounds": 1})
    cfg.update(change)
    code = main(["run", str(write_config(cfg)), "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"{field}: " in err[0], err
