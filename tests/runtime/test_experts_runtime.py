"""Isolated experts on real processes (runtime/experts.py): the simulator's rounds, islands and
routed evaluation, and a coordinator that keeps an island's expert when none of its nodes
delivered."""

import json

import numpy as np
import pytest
import torch

from gossamer import config
from gossamer.protocols import experts as protocol
from gossamer.runtime.codec import WireError, model_frames
from gossamer.runtime.experts import ExpertsCoordinator
from tests.conftest import small_config
from tests.runtime.test_fl_runtime import launched_and_simulated


def _cfg(**params):
    cfg = small_config("isolated_experts", stop={"rounds": 3},
                       partition={"name": "shards", "num_nodes": 6, "params": {"shards_per_node": 1}})
    cfg["algorithm"] = {"name": "isolated_experts", "params": {"islands": 2, **params}}
    cfg["runtime"] = {"round_timeout_s": 30, "join_timeout_s": 60, "poll_interval_s": 0.1,
                      "threads_per_process": 2}      # the simulator's threads: exact parity
    return cfg


@pytest.mark.slow
def test_launch_matches_the_simulator(write_config, tmp_path):
    real, sim = launched_and_simulated(write_config(_cfg()), tmp_path)
    assert [r["round"] for r in real] == ["0", "1", "2", "3"]
    for column in ("test_accuracy", "test_loss", "topk_accuracy", "best_expert_accuracy"):
        assert [r[column] for r in real] == [r[column] for r in sim], column
    assert [r["participants"] for r in real[1:]] == [r["participants"] for r in sim[1:]] == ["6"] * 3
    assert real[-1]["test_loss"] != real[0]["test_loss"]                  # it learned
    real_model = torch.load(tmp_path / "real" / "model.pt")["params"]
    sim_model = torch.load(tmp_path / "sim" / "model.pt")              # (the simulator: a state_dict)
    assert torch.equal(real_model, torch.cat([v.reshape(-1) for v in sim_model.values()]))   # island 0's expert
    assert json.loads((tmp_path / "real" / "summary.json").read_text())["rounds"] == 3


def test_an_island_without_uploads_keeps_its_expert(tmp_path):
    """The coordinator's step: each island's sample-weighted mean of its delivered experts, the
    router over everyone; an island none of whose nodes delivered keeps its expert. An upload
    is an expert and the router: an expert alone, or a value that is not finite, is refused."""
    cfg = config.validate(_cfg())
    coord = ExpertsCoordinator(cfg, tmp_path)
    whole = coord.numel + len(coord._models()[1])

    def upload(tensor):
        return coord._read_upload(iter(f.SerializeToString() for f in model_frames(
            tensor, sender=0, round=1, meta=10, run_id=cfg.runtime.run_id)))

    assert upload(torch.zeros(whole))[1].shape == (whole,)
    bad = torch.zeros(whole)
    bad[-1] = float("nan")
    for tensor in (torch.zeros(coord.numel), bad):
        with pytest.raises(WireError):
            upload(tensor)
    experts, router = (m.clone() for m in coord._models())
    p, r = coord.numel, len(router)
    gen = torch.Generator().manual_seed(0)
    first = [n for n, k in sorted(coord.island_of.items()) if k == 0]
    received = {n: (torch.randn(p + r, generator=gen), 10 + n) for n in first}
    coord._aggregate(1, received)
    after_experts, after_router = coord._models()
    rows = torch.stack([received[n][0] for n in first])
    w = torch.tensor([10.0 + n for n in first])
    want = protocol.group_means(rows, np.array([10 + n for n in first]), np.zeros(len(first), dtype=np.int64), 1)[0]
    assert torch.allclose(want, (w / w.sum()) @ rows, atol=1e-6)
    assert torch.equal(after_experts[0], want[:p]) and torch.equal(after_router, want[p:])
    assert torch.equal(after_experts[1], experts[1])                       # island 1: unchanged
    assert coord.participants == len(first)
    # each node's task: its island's expert and the router, hashed
    other = next(n for n, k in coord.island_of.items() if k == 1)
    assert torch.equal(coord._row(coord.island_of[other]), torch.cat([experts[1], after_router]))
