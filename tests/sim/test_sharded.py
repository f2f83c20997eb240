"""The simulator sharded over torch.distributed ranks: work split, exact sums, failures, resume."""

import csv
import io
import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from gossamer import config
from gossamer.algorithms.dl.dpsgd import mix_into
from gossamer.config import ConfigError
from gossamer.sim.experiment import build_experiment
from gossamer.sim.sharded import BLOCK, Shard, block_sums, check, ranges
from gossamer.sim.sharded.dl import halo
from gossamer.topology import to_torch_sparse
from tests.conftest import small_config


def test_ranges_are_contiguous_block_aligned_and_balanced_by_work():
    work = np.ones(1000)
    work[:200] = 10                                   # the first ids hold most of the data
    cuts = ranges(work, 2, block=50)
    assert cuts[0][0] == 0 and cuts[-1][1] == 1000 and cuts[0][1] == cuts[1][0]
    assert cuts[0][1] % 50 == 0
    share = [work[a:b].sum() for a, b in cuts]
    assert abs(share[0] - share[1]) <= 50 * 10       # within one block's work
    assert ranges(work, 1) == [(0, 1000)]
    many = ranges(np.ones(100), 4, block=BLOCK)       # fewer blocks than ranks: some own nothing
    assert [b - a for a, b in many].count(0) >= 2 and sum(b - a for a, b in many) == 100


def _shards(edges):
    return [Shard(k, len(edges) - 1, edges[k], edges[k + 1], tuple(edges)) for k in range(len(edges) - 1)]


def test_each_rank_mixes_its_rows_from_its_halo_as_one_product_would():
    import scipy.sparse as sp

    rng = np.random.default_rng(0)
    n, p = 300, 200
    dense = (rng.random((n, n)) < 0.02) * rng.random((n, n))     # a sparse, irregular W
    dense[np.arange(n), np.arange(n)] = 1.0
    w = sp.csr_matrix(dense / dense.sum(1, keepdims=True))
    x = torch.randn(n, p)
    full = torch.empty_like(x)
    mix_into(to_torch_sparse(w), x, full)
    shards = _shards([0, 64, 192, 300])
    plans = [halo(w, s, torch.float32) for s in shards]
    for s, plan in zip(shards, plans, strict=True):
        # held rows: every id this rank's rows of W name (own or not), sorted
        held = np.union1d(w[s.lo:s.hi].indices, np.arange(s.lo, s.hi))
        assert (plan.below, plan.above) == (int((held < s.lo).sum()), int((held >= s.hi).sum()))
        out = torch.empty(s.hi - s.lo, p)
        mix_into(plan.mixing, x[torch.from_numpy(held)], out)
        assert torch.equal(out, full[s.lo:s.hi])           # bit for bit
        for k, other in enumerate(shards):                  # what k sends here is what we hold of k
            if k != s.rank:
                got = other.lo + plans[k].send[s.rank]
                assert plan.recv[k] == len(got)
                assert np.array_equal(got, held[(held >= other.lo) & (held < other.hi)])


def test_a_blocks_sum_does_not_depend_on_what_else_a_rank_holds():
    rows = torch.randn(300, 500)
    whole = block_sums(rows, 0)
    assert whole.shape == (5, 500)
    assert torch.equal(block_sums(rows[128:], 128), whole[2:])
    assert torch.equal(block_sums(rows[256:], 256), whole[4:])
    with pytest.raises(ValueError):
        block_sums(rows[10:], 10)


@pytest.mark.parametrize("algorithm, change, field", [
    ("dpsgd", {"algorithm": {"name": "choco"}, "faults": {"message_loss": {"prob": 0.1}}}, "faults"),
    ("fedavg", {"algorithm": {"name": "zo_fedavg"}}, "algorithm.name"),
    ("dpsgd", {"algorithm": {"name": "choco"}, "adversary": {"attack": "sign_flip", "fraction": 0.25}},
     "adversary"),
    ("dpsgd", {"algorithm": {"name": "choco"},
               "system": {"availability": {"model": "markov", "mean_on_s": 300.0, "mean_off_s": 60.0}}},
     "system.availability.model"),
])
def test_what_the_sharded_simulator_cannot_run_is_refused(algorithm, change, field):
    exp = build_experiment(config.validate({**small_config(algorithm), **change}))
    with pytest.raises(ConfigError) as err:
        check(exp)
    assert err.value.field == field


def test_an_unknown_transport_is_refused_naming_the_variable(monkeypatch):
    from gossamer.sim.sharded import TRANSPORT_ENV, check_config

    monkeypatch.setenv(TRANSPORT_ENV, "carrier-pigeon")
    with pytest.raises(ConfigError) as err:
        check_config(config.validate(small_config("fedavg")))
    assert err.value.field == TRANSPORT_ENV


def test_ranks_on_gpus_take_a_gpu_each_and_exchange_rows_through_nccl(monkeypatch):
    """Torch is told it sees 2 GPUs (nothing runs on them): a rank resolves ``cuda`` to its
    local rank's GPU, the launcher refuses a fixed GPU or more ranks than GPUs naming
    ``device``, and shared memory (host rows) naming the transport; the process group sends
    host tensors by gloo and the GPU's by NCCL, and GPU rows never go to shared memory."""
    from gossamer import devices
    from gossamer.sim.sharded import TRANSPORT_ENV, check_config
    from gossamer.sim.sharded.base import backend, shared_if_possible

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    for local, world, want in (("1", "2", 1), ("3", "4", 1), ("1", "1", 0)):     # not a rank: the current
        monkeypatch.setenv("LOCAL_RANK", local)
        monkeypatch.setenv("WORLD_SIZE", world)
        assert devices.resolve("cuda") == devices.resolve("auto") == torch.device("cuda", want)
    monkeypatch.setenv("WORLD_SIZE", "1")

    def on(device: str, ranks: int) -> None:
        check_config(config.validate({**small_config("dpsgd"), "device": device}), ranks)

    on("cuda", 2)
    on("auto", 2)
    on("cuda:1", 1)                      # one rank: any GPU
    for device, ranks in (("cuda:1", 2), ("cuda", 3)):
        with pytest.raises(ConfigError) as err:
            on(device, ranks)
        assert err.value.field == "device"
    monkeypatch.setenv(TRANSPORT_ENV, "shared")
    with pytest.raises(ConfigError) as err:
        on("cuda", 2)
    assert err.value.field == TRANSPORT_ENV
    on("cpu", 2)
    assert backend(torch.device("cpu")) == "gloo"
    assert backend(torch.device("cuda", 1)) == "cpu:gloo,cuda:nccl"
    gpu = Shard(0, 2, 0, 64, (0, 64, 128), device=torch.device("cuda", 0))
    assert not gpu.on_host and shared_if_possible(gpu, (2, 8), torch.float32) is None


def _gossamer(capfd, *args, env=None):
    """``gossamer ARGS`` with ``env`` added, run by this process: the launcher forks its ranks
    from this process's forkserver (gossamer/processes.py), so PyTorch is imported once a test
    session, not once a rank; what the launcher and its ranks print is read from the file
    descriptors."""
    from gossamer.cli import main

    capfd.readouterr()
    saved = {key: os.environ.get(key) for key in env or {}}
    os.environ.update(env or {})
    try:
        code = main(list(args))
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    out, err = capfd.readouterr()
    return SimpleNamespace(returncode=code, stdout=out, stderr=err)


def _config(tmp_path: Path) -> Path:
    cfg = small_config("fedavg", partition={"name": "dirichlet", "num_nodes": 200, "params": {"alpha": 0.5}},
                       local={"epochs": 2, "batch_size": 8, "lr": 0.1}, stop={"rounds": 5},
                       output={"progress": False, "checkpoint_every": 2})
    cfg["algorithm"] = {"name": "fedavg", "params": {"client_fraction": 0.4}}
    path = tmp_path / "sharded.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_metrics_are_bit_identical_with_2_4_ranks_and_after_a_killed_rank_resumes_with_1(tmp_path, capfd):
    cfg = _config(tmp_path)
    texts = []
    # 2 ranks share memory; 4 send rows, as across machines (or on GPUs), every tensor on its device
    for ranks in (2, 4):
        out = tmp_path / f"r{ranks}"
        done = _gossamer(capfd, "run", str(cfg), "--out", str(out), "--ranks", str(ranks), "--quiet",
                         env={"GOSSAMER_SHARDED_TRANSPORT": "shared"} if ranks == 2
                         else {"GOSSAMER_SHARDED_TRANSPORT": "p2p", **_meta_default(tmp_path)})
        assert done.returncode == 0, done.stderr[-2000:]
        texts.append((out / "metrics.csv").read_text())
    assert texts[0] == texts[1]
    models = [torch.load(tmp_path / f"r{k}" / "model.pt", weights_only=True) for k in (2, 4)]
    for name, value in models[0].items():                 # the model itself, bit for bit
        assert torch.equal(value, models[1][name])
    rows = texts[0].splitlines()
    assert len(rows) == 7 and rows[-1].split(",")[7] == "80"      # 40% of 200 clients a round
    # rank 1 of 2 killed at round 3 (checkpoints every 2): one line, exit 3; resumed with 1 rank
    out = tmp_path / "killed"
    died = _gossamer(capfd, "run", str(cfg), "--out", str(out), "--ranks", "2", "--quiet",
                     env={"GOSSAMER_TEST_KILL_AT_ROUND": "3", "GOSSAMER_TEST_KILL_RANK": "1"})
    assert died.returncode == 3
    last = died.stderr.strip().splitlines()[-1]
    assert last.startswith("gossamer: rank 1 of 2 stopped (signal SIGKILL)") and "--resume" in last
    assert "Traceback" not in died.stderr
    assert len((out / "metrics.csv").read_text().splitlines()) < 7
    back = _gossamer(capfd, "run", "--resume", str(out), "--ranks", "1", "--quiet")     # 1 rank
    assert back.returncode == 0, back.stderr[-2000:]
    assert (out / "metrics.csv").read_text() == texts[0]
    resumed = torch.load(out / "model.pt", weights_only=True)
    assert all(torch.equal(value, resumed[name]) for name, value in models[0].items())


@pytest.mark.slow
def test_dpsgd_is_bit_identical_with_1_2_4_ranks_and_a_killed_run_resumes(tmp_path, capfd):
    cfg = small_config("dpsgd", data={"dataset": "mnist5k"}, stop={"rounds": 5},
                       partition={"name": "dirichlet", "num_nodes": 200, "params": {"alpha": 0.5}},
                       local={"epochs": 1, "batch_size": 8, "lr": 0.05}, eval={"every": 1, "nodes": 50},
                       topology={"name": "random_regular", "params": {"degree": 4}},
                       output={"progress": False, "checkpoint_every": 2})
    cfg["algorithm"]["params"] = {"gossip_steps": 2, "final_merge": True}
    path = tmp_path / "dpsgd.yaml"
    path.write_text(yaml.safe_dump(cfg))
    files = ("metrics.csv", "nodes.csv", "model.pt")
    out = tmp_path / "r4"         # 4 ranks send their rows point to point, as across machines
    done = _gossamer(capfd, "run", str(path), "--out", str(out), "--ranks", "4", "--quiet",
                     env={"GOSSAMER_SHARDED_TRANSPORT": "p2p"})
    assert done.returncode == 0, done.stderr[-2000:]
    want = [(out / f).read_bytes() for f in files]
    rows = want[0].decode().splitlines()
    assert len(rows) == 7 and float(rows[-1].split(",")[12]) < 1e-9     # final merge: consensus
    # 2 ranks sharing memory: rounds 1-2 (checkpointed), then rank 0 killed at round 3;
    # resumed with 1 rank, the whole run equals the 4 ranks' (1, 2 and 4 ranks agree)
    out = tmp_path / "killed"
    died = _gossamer(capfd, "run", str(path), "--out", str(out), "--ranks", "2", "--quiet",
                     env={"GOSSAMER_TEST_KILL_AT_ROUND": "3", "GOSSAMER_TEST_KILL_RANK": "0",
                          "GOSSAMER_SHARDED_TRANSPORT": "shared"})
    assert died.returncode == 3 and "Traceback" not in died.stderr
    assert died.stderr.strip().splitlines()[-1].startswith("gossamer: rank 0 of 2 stopped (signal SIGKILL)")
    back = _gossamer(capfd, "run", "--resume", str(out), "--ranks", "1", "--quiet")
    assert back.returncode == 0, back.stderr[-2000:]
    assert [(out / f).read_bytes() for f in files] == want


@pytest.mark.slow
def test_async_fedbuff_over_ranks_equals_one_process_and_a_killed_run_resumes(tmp_path, capfd):
    import gossamer

    # a registered population of 10^6 clients: owned in even id ranges, nothing of length N
    cfg = small_config("fedbuff", stop={"rounds": 30}, eval={"every": 5},
                       data={"dataset": "synthetic", "params": {"alpha": 1.0, "beta": 1.0, "dim": 60,
                                                                "num_classes": 10}},
                       population={"lazy": True, "max_samples": 500, "eval_clients": 200},
                       partition={"name": "natural", "num_nodes": 1_000_000}, model={"name": "logreg"},
                       local={"steps": 5, "batch_size": 10, "lr": 0.05},
                       system={"sample_time_s": {"dist": "lognormal", "median": 0.002, "sigma": 0.7}},
                       output={"progress": False, "checkpoint_every": 10})
    cfg["algorithm"]["params"] = {"concurrency": 40, "buffer_size": 10, "server_lr": 1.0}
    path = tmp_path / "fedbuff.yaml"
    path.write_text(yaml.safe_dump(cfg))
    gossamer.run(path, out=tmp_path / "one")                 # one process, in this one
    files = ("metrics.csv", "model.pt")
    want = [(tmp_path / "one" / f).read_bytes() for f in files]
    out = tmp_path / "r3"
    done = _gossamer(capfd, "run", str(path), "--out", str(out), "--ranks", "3", "--quiet")
    assert done.returncode == 0, done.stderr[-2000:]
    assert [(out / f).read_bytes() for f in files] == want
    assert len(want[0].decode().splitlines()) == 8
    assert _killed_and_resumed(capfd, path, tmp_path / "killed", (2, 15, 1), 1,
                               files) == want                                # rank 1 of 2 dies at update 15


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["fedavg", "scaffold"])
def test_sync_fl_over_a_registered_population_on_ranks(tmp_path, capfd, algorithm):
    """20,000 registered clients owned in even id ranges (nothing of length N by rank): each
    rank generates and trains the round's clients it owns; FedAvg's block sums and SCAFFOLD's
    uploads give 1 and 2 ranks the same bytes, SCAFFOLD's control variates stay in their owner's
    store (spilled past its budget), and a run killed with 2 ranks resumes with 1."""
    cfg = small_config(algorithm, stop={"rounds": 6}, eval={"every": 2},
                       data={"dataset": "synthetic", "params": {"alpha": 1.0, "beta": 1.0, "dim": 60,
                                                                "num_classes": 10}},
                       population={"lazy": True, "max_samples": 500, "eval_clients": 200,
                                   "state_budget_mb": 0.5},
                       partition={"name": "natural", "num_nodes": 20_000},
                       model={"name": "mlp", "params": {"hidden": [64]}},
                       local={"steps": 4, "batch_size": 10, "lr": 0.05},
                       output={"progress": False, "checkpoint_every": 2})
    cfg["algorithm"]["params"] = {"client_fraction": 0.002}
    path = tmp_path / "registered.yaml"
    path.write_text(yaml.safe_dump(cfg))
    files = ("metrics.csv", "model.pt")
    got = _ranked_runs(capfd, path, (1, 2), files)
    assert got[0] == got[1]
    if algorithm == "scaffold":
        store = json.loads((tmp_path / "r2" / "summary.json").read_text())["client_state"]
        assert store["disk_bytes"] > 0 and store["ranks"] == 2
        assert _killed_and_resumed(capfd, path, tmp_path / "killed", (2, 3, 1), 1, files) == got[0]


@pytest.mark.slow
@pytest.mark.parametrize("example, sets", [
    ("hierarchy/fedavg_tree.yaml", ["stop.rounds=2"]),
    ("contribution/free_riders.yaml", ["stop.rounds=2", "contribution.permutations=3",
                                       "contribution.validation=200"]),
])
def test_hierarchies_and_contribution_scores_on_ranks_write_one_process_bytes(tmp_path, capfd, example, sets):
    """An aggregator tree's partial sums and the server's contribution scores are computed
    from every upload, which every rank holds: 1 (one process), 2 ranks with 4-id blocks (each
    rank trains some of the round's clients) write the same metrics, model and scores."""
    import gossamer

    raw = yaml.safe_load((Path(__file__).parents[2] / "examples" / example).read_text())
    data = config.apply_overrides(raw, [*sets, "output.checkpoint_every=0", "sharding.block=4"])
    path = tmp_path / "example.yaml"
    path.write_text(yaml.safe_dump(data))
    threads = torch.get_num_threads()
    try:                                  # one thread, as each rank
        torch.set_num_threads(1)
        gossamer.run(path, out=tmp_path / "one")
    finally:
        torch.set_num_threads(threads)
    files = ("metrics.csv", "model.pt") + (("contributions.csv",) if "contribution" in example else ())
    want = [(tmp_path / "one" / f).read_bytes() for f in files]
    assert _ranked_runs(capfd, path, (2,), files) == [want]


@pytest.mark.slow
@pytest.mark.parametrize("algorithm, model", [("ditto", "mlp"), ("fedbn", "mlp_bn"), ("fedcac", "mlp")])
def test_personalized_fl_on_ranks(tmp_path, capfd, algorithm, model):
    """Every rank holds every client's personal model; the personal steps (Ditto; FedRep's come
    first, checked by hand), the
    clients' own BatchNorm entries (FedBN) and the starts the server personalizes from (FedCAC)
    are trained by the client's owner and shared: 2 ranks write one rank's metrics, model and
    clients.csv, and the metrics and per-client accuracies of one process (one thread)."""
    import gossamer

    cfg = small_config("fedavg", data={"dataset": "mnist5k"}, stop={"rounds": 2}, eval={"every": 1},
                       partition={"name": "dirichlet", "num_nodes": 80, "params": {"alpha": 0.5},
                                  "test_fraction": 0.2},
                       model={"name": model, "params": {"hidden": [32]}},
                       local={"epochs": 1, "batch_size": 10, "lr": 0.05}, sharding={"block": 8},
                       output={"progress": False, "checkpoint_every": 0})
    cfg["algorithm"] = {"name": algorithm, "params": {"client_fraction": 0.5}}
    path = tmp_path / "personal.yaml"
    path.write_text(yaml.safe_dump(cfg))
    files = ("metrics.csv", "clients.csv", "model.pt")
    got = _ranked_runs(capfd, path, (1, 2), files)
    assert got[0] == got[1]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        gossamer.run(path, out=tmp_path / "one")
    finally:
        torch.set_num_threads(threads)
    assert [(tmp_path / "one" / f).read_bytes() for f in files[:2]] == got[0][:2]
    rows = list(csv.DictReader(io.StringIO(got[0][0].decode())))
    assert float(rows[-1]["personal_accuracy"]) > 0


@pytest.mark.slow
def test_pretraining_on_public_rows_on_ranks(tmp_path, capfd):
    """``model.pretrain`` on ``partition.public_fraction`` rows runs as every rank builds the
    run (FedIns' backbone here): every rank starts from the same model, and 1 and 2 ranks write
    the same bytes."""
    cfg = small_config("fedavg", data={"dataset": "mnist5k"}, stop={"rounds": 2}, eval={"every": 1},
                       partition={"name": "dirichlet", "num_nodes": 40, "params": {"alpha": 0.5},
                                  "public_fraction": 0.1},
                       model={"name": "mlp", "params": {"hidden": [32]},
                              "pretrain": {"steps": 30, "lr": 0.05, "batch_size": 32}},
                       local={"epochs": 1, "batch_size": 16, "lr": 0.05}, sharding={"block": 8},
                       output={"progress": False, "checkpoint_every": 0})
    cfg["algorithm"] = {"name": "fedins", "params": {"pool_size": 5, "top_k": 2, "client_fraction": 0.5}}
    path = tmp_path / "pretrain.yaml"
    path.write_text(yaml.safe_dump(cfg))
    got = _ranked_runs(capfd, path, (1, 2), ("metrics.csv", "model.pt"))
    assert got[0] == got[1]


def test_torchrun_without_a_shared_run_directory_is_refused(tmp_path):
    from gossamer.cli import main

    cfg = _config(tmp_path)
    os.environ["WORLD_SIZE"] = "2"
    try:
        assert main(["run", str(cfg), "--quiet"]) == 2
    finally:
        del os.environ["WORLD_SIZE"]


def test_the_launcher_refuses_what_it_cannot_shard_before_starting_processes(tmp_path, capsys):
    from gossamer.cli import main

    cfg = yaml.safe_load(_config(tmp_path).read_text())
    cfg["algorithm"] = {"name": "zo_fedavg"}
    path = tmp_path / "zeroth.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(path), "--ranks", "2", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "algorithm.name" in err[0] and not (tmp_path / "x").exists()


def _one_rank_and_one_process(capfd, cfg: dict, path: Path, files: tuple[str, ...]):
    """``cfg`` (written to ``path``) run with ``--ranks 1``: its files' bytes and metrics rows,
    and the rows of the one-process driver run round by round beside it (with batches as wide
    as the population's, which a rank uses so that a node's batches never depend on the other
    nodes of its call)."""
    from gossamer.sim.drivers import driver_for

    path.write_text(yaml.safe_dump(cfg))
    out = path.parent / "r1"
    one = _gossamer(capfd, "run", str(path), "--out", str(out), "--ranks", "1", "--quiet")
    assert one.returncode == 0, one.stderr[-2000:]
    want = [(out / f).read_bytes() for f in files]
    exp = build_experiment(config.validate({**cfg, "output": {"progress": False, "checkpoint_every": 0}}))
    exp.trainer.batch_width = "population"
    single = driver_for(exp.algorithm.pattern)(exp)
    rows = [single.evaluate()]
    for _ in range(cfg["stop"]["rounds"]):
        single.run_round()
        rows.append(single.evaluate())
    return want, list(csv.DictReader(io.StringIO(want[0].decode()))), rows


CHURN = {"sample_time_s": {"dist": "uniform", "low": 0.001, "high": 0.01},
         "availability": {"model": "markov", "mean_on_s": 0.3, "mean_off_s": 0.2}}


@pytest.mark.slow
@pytest.mark.parametrize("name, params, extra", [
    ("gradient_tracking", {"gossip_steps": 2}, {}),
    # with label-flipping nodes, which are not measured
    ("choco", {"compressor": "topk", "compressor_params": {"density": 0.1}, "gamma": 0.8, "gossip_steps": 2},
     {"adversary": {"attack": "label_flip", "fraction": 0.2}}),
    # nodes going off and on: offline nodes keep their model, neighbours fold their weight onto
    # their own, and the final merge averages the nodes online at the end
    ("dpsgd", {"gossip_steps": 2, "final_merge": True}, {"system": CHURN}),
], ids=["gradient_tracking", "choco", "dpsgd_churn"])
def test_dl_variants_are_bit_identical_with_1_2_3_ranks_and_resume(tmp_path, capfd, name, params, extra):
    """Gradient tracking's directions and CHOCO-SGD's public copies mix over ranks as the
    models do (shared rows or point to point), so metrics, nodes.csv and the model equal one
    rank's; a checkpoint holds every node's corrections (public copies), so a run resumed with
    another number of ranks continues exactly. Under churn each round's mixing matrix is the
    one-process driver's, planned anew on every rank."""
    cfg = small_config("dpsgd", data={"dataset": "mnist5k"}, stop={"rounds": 4},
                       partition={"name": "dirichlet", "num_nodes": 150, "params": {"alpha": 0.3}},
                       local={"steps": 3, "batch_size": 8, "lr": 0.05}, eval={"every": 1, "nodes": 30},
                       topology={"name": "random_regular", "params": {"degree": 4},
                                 "mixing": "metropolis_hastings"},
                       output={"progress": False, "checkpoint_every": 2}, **extra)
    cfg["algorithm"] = {"name": name, "params": params}
    path = tmp_path / "dl.yaml"
    files = ("metrics.csv", "nodes.csv", "model.pt")
    want, sharded, rows = _one_rank_and_one_process(capfd, cfg, path, files)
    for key in ("test_accuracy", "test_loss", "acc_min", "acc_max", "bytes_up", "online"):
        assert [float(r[key]) for r in sharded] == pytest.approx([float(r[key]) for r in rows], rel=1e-6), key
    if "system" in extra:
        assert min(int(r["online"]) for r in sharded[1:]) < 150
    assert _ranked_runs(capfd, path, ((3, "p2p"),), files) == [want]
    # 2 ranks sharing memory to round 2 (checkpoint), killed at 3; 3 sending rows on
    assert _killed_and_resumed(capfd, path, tmp_path / "killed", (2, 3, 1), 3, files,
                               {"GOSSAMER_SHARDED_TRANSPORT": "shared"},
                               {"GOSSAMER_SHARDED_TRANSPORT": "p2p"}) == want


@pytest.mark.slow
@pytest.mark.parametrize("params, extra", [
    ({"mode": "push_pull", "merge": "age_weighted"}, {}),
    # DADAO's dual clocks, the variance-corrected merge of independently initialized models,
    # and nodes going off and on (messages to an offline node are dropped)
    ({"mode": "pull", "clocks": "dual", "compute_period_s": 0.3, "merge": "variance_corrected"},
     {"model": {"name": "logreg", "init": "independent"},
      "system": {"sample_time_s": {"dist": "uniform", "low": 0.001, "high": 0.01},
                 "latency_s": {"dist": "constant", "value": 0.05},
                 "availability": {"model": "markov", "mean_on_s": 3.0, "mean_off_s": 1.0}}}),
], ids=["push_pull", "dual_clocks_churn"])
def test_gossip_is_bit_identical_with_1_2_3_ranks_and_a_killed_run_resumes(tmp_path, capfd, params, extra):
    """Every rank runs the whole schedule and executes its own nodes' merges and updates;
    messages between ranks are copied from shared memory or sent point to point (as across
    machines). metrics.csv, nodes.csv and the model equal one rank's, one rank equals the
    one-process driver, and a checkpoint with messages in flight resumes exactly with another
    number of ranks and the other transport."""
    base = {"model": {"name": "logreg"},
            "system": {"sample_time_s": {"dist": "uniform", "low": 0.001, "high": 0.01},
                       "latency_s": {"dist": "constant", "value": 0.05}}}
    cfg = small_config("gossip", data={"dataset": "mnist5k"}, stop={"rounds": 3},
                       partition={"name": "dirichlet", "num_nodes": 100, "params": {"alpha": 0.5}},
                       topology={"name": "random_regular", "params": {"degree": 4}},
                       local={"steps": 2, "batch_size": 8, "lr": 0.05}, eval={"every": 1, "nodes": 40},
                       output={"progress": False, "checkpoint_every": 2}, **{**base, **extra})
    cfg["algorithm"] = {"name": "gossip", "params": {"period_s": 1.0, **params}}
    path = tmp_path / "gossip.yaml"
    files = ("metrics.csv", "nodes.csv", "model.pt")
    want, sharded, rows = _one_rank_and_one_process(capfd, cfg, path, files)
    assert int(sharded[-1]["events"]) == rows[-1]["events"] > 100 * 3
    for key in ("test_accuracy", "test_loss", "acc_min", "acc_max", "train_loss", "bytes_up", "online"):
        assert [float(r[key] or "nan") for r in sharded[1:]] == pytest.approx(
            [float(r[key]) for r in rows[1:]], rel=1e-6), key
    way = "p2p+meta" if params["mode"] == "push_pull" else "p2p"     # one with every tensor on its device
    assert _ranked_runs(capfd, path, ((2, "shared"), (3, way)), files) == [want, want]
    # 3 ranks sending rows to round 2 (checkpoint), killed at 3; resumed by 2 sharing memory
    assert _killed_and_resumed(capfd, path, tmp_path / "killed", (3, 3, 2), 2, files,
                               {"GOSSAMER_SHARDED_TRANSPORT": "p2p"}) == want


@pytest.mark.slow
@pytest.mark.parametrize("algorithm, params, extra", [
    ("modest", {"sample_size": 12, "aggregators": 2, "success_fraction": 0.8, "timeout_s": 2.0,
                "announce_churn": True},
     {"topology": {"name": "complete"}, "stop": {"rounds": 12},
      "system": {"sample_time_s": {"dist": "lognormal", "median": 0.002, "sigma": 0.5},
                 "latency_s": {"dist": "constant", "value": 0.05},
                 "availability": {"model": "markov", "mean_on_s": 30.0, "mean_off_s": 10.0}}}),
    ("srrw", {"alpha": 10.0, "base": "metropolis_hastings", "num_tokens": 8},
     {"topology": {"name": "random_regular", "params": {"degree": 4}}, "stop": {"rounds": 24}}),
], ids=["modest", "srrw"])
def test_modest_and_random_walks_over_ranks_equal_one_process_and_resume(tmp_path, capfd, algorithm,
                                                                          params, extra):
    """The whole protocol runs on every rank and only the training is split by node owner, so
    1, 2 and 3 ranks write one process's bytes, and a run killed with 2 ranks resumes with 3."""
    import gossamer

    every = extra["stop"]["rounds"] // 4
    cfg = small_config("dpsgd", data={"dataset": "mnist5k"},
                       partition={"name": "dirichlet", "num_nodes": 90, "params": {"alpha": 0.5}},
                       local={"epochs": 1, "batch_size": 10, "lr": 0.05}, eval={"every": every},
                       output={"progress": False, "checkpoint_every": 2 * every}, **extra)
    cfg["algorithm"] = {"name": algorithm, "params": params}
    path = tmp_path / "walks.yaml"
    path.write_text(yaml.safe_dump(cfg))
    gossamer.run(path, out=tmp_path / "one")
    files = ("metrics.csv", "model.pt")
    want = [(tmp_path / "one" / f).read_bytes() for f in files]
    assert len(want[0].decode().splitlines()) == 6
    assert _ranked_runs(capfd, path, (1, 2, 3), files) == [want, want, want]
    assert _killed_and_resumed(capfd, path, tmp_path / "killed", (2, 3 * every, 1), 3,
                               files) == want


@pytest.mark.slow
def test_fedavg_of_a_model_too_large_for_a_block_a_pass_is_bit_identical_over_ranks(tmp_path, capfd):
    """A 784-128-10 MLP with BatchNorm trains 54 clients a pass (autograd path), fewer than a
    64-id block holds: each block's sum is formed in groups of a pass in id order, so 1 and 2
    ranks write the same bytes, and the run agrees with one process's to float rounding."""
    import gossamer

    cfg = small_config("fedavg", data={"dataset": "mnist5k"}, partition={"name": "iid", "num_nodes": 130},
                       model={"name": "mlp_bn", "params": {"hidden": [128]}},
                       local={"steps": 2, "batch_size": 8, "lr": 0.05}, stop={"rounds": 2},
                       eval={"every": 1}, output={"progress": False, "checkpoint_every": 0})
    cfg["algorithm"] = {"name": "fedavg", "params": {"client_fraction": 1.0}}
    path = tmp_path / "big.yaml"
    path.write_text(yaml.safe_dump(cfg))
    from gossamer.sim.experiment import build_experiment as build

    assert build(config.validate(cfg)).trainer.nodes_per_pass < BLOCK
    texts = _ranked_runs(capfd, path, (1, 2))
    assert texts[0] == texts[1]
    gossamer.run(path, out=tmp_path / "one")
    one = list(csv.DictReader((tmp_path / "one" / "metrics.csv").open()))
    sharded = list(csv.DictReader(io.StringIO(texts[0][0].decode())))
    for key in ("test_loss", "test_accuracy"):
        assert [float(r[key]) for r in sharded] == pytest.approx([float(r[key]) for r in one], rel=1e-5), key


@pytest.mark.slow
def test_few_clients_spread_over_ranks_with_a_small_block(tmp_path, capfd):
    """Ten cross-silo clients: with ``sharding.block: 1`` every rank owns some of them (the
    default block of 64 would give one rank all ten), and 1 and 3 ranks write the same bytes."""
    cfg = small_config("fedavg", partition={"name": "dirichlet", "num_nodes": 10, "params": {"alpha": 1.0}},
                       stop={"rounds": 3}, sharding={"block": 1},
                       output={"progress": False, "checkpoint_every": 0})
    sizes = build_experiment(config.validate(cfg)).trainer.sizes
    assert all(hi > lo for lo, hi in ranges(np.asarray(sizes, dtype=np.float64), 3, block=1))
    assert sorted(hi - lo for lo, hi in ranges(np.asarray(sizes, dtype=np.float64), 3)) == [0, 0, 10]
    path = tmp_path / "silos.yaml"
    path.write_text(yaml.safe_dump(cfg))
    got = _ranked_runs(capfd, path, (1, 3))
    assert got[0] == got[1]


def _killed_and_resumed(capfd, path: Path, out: Path, kill: tuple, ranks: int, files: tuple[str, ...],
                        env: dict | None = None, resume_env: dict | None = None) -> list[bytes]:
    """``path`` run with ``kill[0]`` ranks (and ``env``) until rank ``kill[2]`` is killed at
    round ``kill[1]`` (it must fail in one line, exit 3), then resumed with ``ranks`` (and
    ``resume_env``): the finished ``files``."""
    died = _gossamer(capfd, "run", str(path), "--out", str(out), "--ranks", str(kill[0]), "--quiet",
                     env={"GOSSAMER_TEST_KILL_AT_ROUND": str(kill[1]), "GOSSAMER_TEST_KILL_RANK": str(kill[2]),
                          **(env or {})})
    assert died.returncode == 3 and "Traceback" not in died.stderr
    back = _gossamer(capfd, "run", "--resume", str(out), "--ranks", str(ranks), "--quiet", env=resume_env)
    assert back.returncode == 0, back.stderr[-2000:]
    return [(out / f).read_bytes() for f in files]


def _meta_default(folder: Path) -> dict[str, str]:
    """The environment of ranks started as fresh interpreters whose torch default device is
    ``meta`` (a ``sitecustomize`` on their path). A tensor the sharded executors make without
    naming its device is then a meta tensor, which fails or changes the metrics: on a GPU it
    would be a host tensor meeting the device's rows, or sent by gloo to a rank that waits on
    NCCL (tests/test_devices.py checks one process the same way)."""
    site = folder / "meta_default"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text("import torch\n\ntorch.set_default_device('meta')\n")
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    return {"GOSSAMER_START_METHOD": "spawn", "PYTHONPATH": path}


def _ranked_runs(capfd, path: Path, runs: tuple, files: tuple[str, ...] = ("metrics.csv", "model.pt")
                 ) -> list[list[bytes]]:
    """``files`` of ``path`` run with each of ``runs``: a number of ranks, or (ranks, transport);
    a transport ``p2p+meta``: point to point, with torch's default device ``meta`` in the ranks
    (:func:`_meta_default`)."""
    got = []
    for run in runs:
        ranks, way = run if isinstance(run, tuple) else (run, None)
        out = path.parent / f"r{ranks}{way or ''}"
        env = {"GOSSAMER_SHARDED_TRANSPORT": way.removesuffix("+meta")} if way else None
        if way and way.endswith("+meta"):
            env.update(_meta_default(path.parent))
        done = _gossamer(capfd, "run", str(path), "--out", str(out), "--ranks", str(ranks), "--quiet", env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        got.append([(out / f).read_bytes() for f in files])
    return got


def _event_config(algorithm: str, params: dict, nodes: int = 60, **over) -> dict:
    """A small MNIST-5k run of gossip, MoDeST, random walks, FedBuff or D-PSGD: logistic
    regression on a Dirichlet split, a random 4-regular graph (MoDeST: complete; FedBuff: none),
    short compute times and a constant latency; ``over`` sets top-level entries."""
    cfg = small_config("gossip" if algorithm == "gossip" else "dpsgd", data={"dataset": "mnist5k"},
                       partition={"name": "dirichlet", "num_nodes": nodes, "params": {"alpha": 0.5}},
                       topology={"name": "complete"} if algorithm == "modest"
                       else {"name": "random_regular", "params": {"degree": 4}},
                       system={"sample_time_s": {"dist": "uniform", "low": 0.001, "high": 0.01},
                               "latency_s": {"dist": "constant", "value": 0.05}},
                       model={"name": "logreg"}, local={"steps": 2, "batch_size": 8, "lr": 0.05},
                       output={"progress": False, "checkpoint_every": 0}, **over)
    cfg["algorithm"] = {"name": algorithm, "params": params}
    if algorithm == "fedbuff":
        del cfg["topology"]
    return cfg


FAULTS = {"crash": {"fraction": 0.1, "at_s": {"dist": "uniform", "low": 0.5, "high": 3.0}},
          "churn": {"fraction": 0.3, "on_s": {"dist": "exponential", "mean": 1.5},
                    "off_s": {"dist": "exponential", "mean": 1.0}},
          "message_loss": {"prob": 0.1}, "stragglers": {"fraction": 0.2, "factor": 3.0},
          "rejoin": "fresh"}


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["fedavg", "dpsgd"])
def test_faults_give_the_same_bytes_on_any_number_of_ranks(tmp_path, capfd, algorithm):
    """Crashes, churn, message loss and stragglers are a counter-based schedule every rank
    computes alike: synchronous FL (whose rounds then take the general path: some uploads are
    lost) and D-PSGD (lost links reweight the mixing; a node that rejoins fresh is reset by its
    owner) write the same metrics, model and faults.csv with 1 and 2 ranks (D-PSGD also with 3
    sending rows point to point, and one rank measures what one process does)."""
    cfg = small_config(algorithm, data={"dataset": "mnist5k"}, stop={"rounds": 5}, eval={"every": 1},
                       partition={"name": "dirichlet", "num_nodes": 96, "params": {"alpha": 0.5}},
                       system={"sample_time_s": {"dist": "uniform", "low": 0.001, "high": 0.01}},
                       local={"epochs": 1, "batch_size": 10, "lr": 0.05}, faults=FAULTS,
                       output={"progress": False, "checkpoint_every": 0})
    if algorithm == "fedavg":
        cfg["algorithm"] = {"name": "fedavg", "params": {"client_fraction": 0.5}}
    else:
        cfg["topology"] = {"name": "random_regular", "params": {"degree": 4}}
    path = tmp_path / "faults.yaml"
    files = ("metrics.csv", "model.pt", "faults.csv")
    if algorithm == "fedavg":
        path.write_text(yaml.safe_dump(cfg))
        got = _ranked_runs(capfd, path, (1, 2), files)
    else:               # and one rank measures what one process does (gone nodes are not measured)
        want, sharded, single = _one_rank_and_one_process(capfd, cfg, path, files)
        for key in ("test_accuracy", "test_loss", "acc_min", "online", "lost_messages"):
            assert [float(r[key]) for r in sharded] == pytest.approx([float(r[key]) for r in single],
                                                                      rel=1e-6), key
        got = [want, *_ranked_runs(capfd, path, (2, (3, "p2p")), files)]
    assert all(g == got[0] for g in got[1:])
    transitions = list(csv.DictReader(io.StringIO(got[0][2].decode())))
    assert {r["kind"] for r in transitions} >= {"crash", "churn"}
    rows = list(csv.DictReader(io.StringIO(got[0][0].decode())))[1:]
    assert len({int(r["participants" if algorithm == "fedavg" else "online"]) for r in rows}) > 1


@pytest.mark.slow
@pytest.mark.parametrize("algorithm, params, attack", [
    ("fedbuff", {"concurrency": 12, "buffer_size": 4}, "alie"),
    ("modest", {"sample_size": 12, "aggregators": 2, "success_fraction": 0.8, "timeout_s": 2.0}, "sign_flip"),
])
def test_model_attacks_in_async_fl_and_modest_on_ranks(tmp_path, capfd, algorithm, params, attack):
    """Every rank holds every trained model of a batch (a round's trainers), so the Byzantine
    clients' crafted uploads (ALIE crafts from the whole batch) are the same on every rank, and
    so are FedBuff's compressed uploads (top-k with error feedback, each client's residual
    kept alike on every rank): 1 and 2 ranks write the same bytes."""
    cfg = small_config("fedbuff" if algorithm == "fedbuff" else "dpsgd", data={"dataset": "mnist5k"},
                       stop={"rounds": 16 if algorithm == "fedbuff" else 6}, eval={"every": 3},
                       partition={"name": "dirichlet", "num_nodes": 60, "params": {"alpha": 0.5}},
                       system={"sample_time_s": {"dist": "uniform", "low": 0.001, "high": 0.01},
                               "latency_s": {"dist": "constant", "value": 0.05}},
                       model={"name": "logreg"}, local={"steps": 2, "batch_size": 8, "lr": 0.05},
                       adversary={"attack": attack, "fraction": 0.2},
                       output={"progress": False, "checkpoint_every": 0})
    cfg["algorithm"] = {"name": algorithm, "params": params}
    if algorithm == "modest":
        cfg["topology"] = {"name": "complete"}
    else:
        cfg["compression"] = {"uplink": {"name": "topk", "params": {"density": 0.1}}, "feedback": "ef"}
    path = tmp_path / "attack.yaml"
    path.write_text(yaml.safe_dump(cfg))
    got = _ranked_runs(capfd, path, (1, 2), ("metrics.csv", "model.pt"))
    assert got[0] == got[1]


@pytest.mark.slow
@pytest.mark.parametrize("algorithm, params", [
    ("gossip", {"mode": "push_pull", "period_s": 1.0}),
    ("modest", {"sample_size": 12, "aggregators": 2, "success_fraction": 0.8, "timeout_s": 2.0}),
    ("random_walk", {"walk": "simple", "num_tokens": 8}),
    ("fedbuff", {"concurrency": 12, "buffer_size": 4}),
])
def test_faults_in_the_schedule_driven_patterns_on_ranks(tmp_path, capfd, algorithm, params):
    """Gossip, MoDeST, random walks and asynchronous FL run their whole schedule on every rank,
    faults included (gossip's fresh rejoins reset the node on its owner, in its wave): 1 and 2
    ranks write the same bytes, and those of one process where the pattern's ranks do."""
    import gossamer

    cfg = _event_config(algorithm, params, stop={"rounds": 16 if algorithm == "fedbuff" else 4},
                        eval={"every": 2, "nodes": 30}, faults=FAULTS)
    path = tmp_path / "faults.yaml"
    path.write_text(yaml.safe_dump(cfg))
    files = ("metrics.csv", "model.pt", "faults.csv")
    got = _ranked_runs(capfd, path, (1, 2), files)
    assert got[0] == got[1]
    if algorithm != "gossip":                 # gossip's ranks batch as the population does
        gossamer.run(path, out=tmp_path / "one")
        assert [(tmp_path / "one" / f).read_bytes() for f in files] == got[0]
    back = [r for r in csv.DictReader(io.StringIO(got[0][2].decode())) if r["kind"] == "churn"]
    assert any(r["state"] == "up" for r in back)            # some nodes rejoined (fresh)


@pytest.mark.slow
@pytest.mark.parametrize("aggregator, params, runs", [("trimmed_mean", {"f": 1}, (2,)),
                                                      ("bristle", {}, ((3, "p2p"),))])
def test_robust_dl_merges_on_ranks(tmp_path, capfd, aggregator, params, runs):
    """A robust merge (trimmed mean; Bristle, which scores candidates on the receiver's data)
    runs on each node's owner from the rows it holds: every row in shared memory, or its halo
    sent point to point; 1 and 2 ranks (and 3, p2p) write the same bytes, one rank what one process
    measures, and the merges skipped (too few models held) are counted over every rank."""
    cfg = small_config("dpsgd", data={"dataset": "mnist5k"}, stop={"rounds": 3}, eval={"every": 1},
                       partition={"name": "dirichlet", "num_nodes": 90, "params": {"alpha": 0.5}},
                       topology={"name": "random_regular", "params": {"degree": 4}},
                       local={"epochs": 1, "batch_size": 10, "lr": 0.05}, model={"name": "logreg"},
                       system={"availability": {"model": "markov", "mean_on_s": 3.0, "mean_off_s": 2.0}},
                       output={"progress": False, "checkpoint_every": 0})
    cfg["algorithm"] = {"name": "dpsgd", "params": {"aggregator": aggregator, "aggregator_params": params}}
    path = tmp_path / "robust.yaml"
    files = ("metrics.csv", "nodes.csv", "model.pt")
    want, sharded, single = _one_rank_and_one_process(capfd, cfg, path, files)
    for key in ("test_accuracy", "test_loss", "acc_min", "merges_skipped", "consensus_distance"):
        assert [float(r[key]) for r in sharded] == pytest.approx([float(r[key]) for r in single], rel=1e-5), key
    assert _ranked_runs(capfd, path, runs, files) == [want]
    if aggregator == "trimmed_mean":              # offline neighbours leave some with too few
        assert int(sharded[-1]["merges_skipped"]) > 0


@pytest.mark.slow
@pytest.mark.parametrize("attack, aggregator, runs", [("gaussian", "trimmed_mean", (2, (3, "p2p+meta"))),
                                                      ("alie", "mean", ((2, "p2p"),))])
def test_model_attacks_in_dpsgd_on_ranks(tmp_path, capfd, attack, aggregator, runs):
    """Byzantine neighbours craft what each honest receiver merges on the receiver's owner,
    from the rows it holds, a random attack's draws keyed by the receiver (not by which
    receivers share a call): 1, 2 and 3 ranks write the same bytes, one rank what one process
    measures."""
    cfg = small_config("dpsgd", data={"dataset": "mnist5k"}, stop={"rounds": 3}, eval={"every": 1},
                       partition={"name": "dirichlet", "num_nodes": 90, "params": {"alpha": 0.5}},
                       topology={"name": "random_regular", "params": {"degree": 4}},
                       local={"epochs": 1, "batch_size": 10, "lr": 0.05}, model={"name": "logreg"},
                       adversary={"attack": attack, "fraction": 0.2},
                       output={"progress": False, "checkpoint_every": 0})
    params = {"aggregator": "trimmed_mean", "aggregator_params": {"f": 1}} if aggregator != "mean" else {}
    cfg["algorithm"] = {"name": "dpsgd", "params": params}
    path = tmp_path / "attack.yaml"
    files = ("metrics.csv", "nodes.csv", "model.pt")
    want, sharded, single = _one_rank_and_one_process(capfd, cfg, path, files)
    for key in ("test_accuracy", "test_loss", "acc_min", "consensus_distance"):
        assert [float(r[key]) for r in sharded] == pytest.approx([float(r[key]) for r in single], rel=1e-5), key
    assert _ranked_runs(capfd, path, runs, files) == [want] * len(runs)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm, params, attack, runs", [
    ("gossip", {"mode": "push_pull", "period_s": 1.0}, "label_flip", (1, 2)),
    ("random_walk", {"walk": "simple", "num_tokens": 8}, "label_flip", (1, 2)),
    ("gossip", {"mode": "push", "period_s": 1.0}, "gaussian", (1, 2, (3, "p2p"))),
    ("gossip", {"mode": "push_pull", "period_s": 1.0}, "alie", (1, (2, "p2p"))),
])
def test_attacks_in_gossip_and_random_walks_on_ranks(tmp_path, capfd, algorithm, params, attack, runs):
    """Label-flipping nodes poison their labels as every rank builds the run; a Byzantine gossip
    sender's message is crafted against its receiver's model by the receiver's owner (the row
    sent, or read from shared memory), its draws keyed by the message: 1, 2 and 3 ranks write
    the same bytes (random walks: one process's), and the attackers are not measured."""
    import gossamer

    cfg = _event_config(algorithm, params, stop={"rounds": 4}, eval={"every": 2},
                        adversary={"attack": attack, "fraction": 0.25})
    path = tmp_path / "poisoned.yaml"
    path.write_text(yaml.safe_dump(cfg))
    files = ("metrics.csv", "model.pt")
    got = _ranked_runs(capfd, path, runs, files)
    assert all(g == got[0] for g in got[1:])
    gossamer.run(path, out=tmp_path / "one")
    if algorithm != "gossip":                 # gossip's ranks batch as the population does
        assert [(tmp_path / "one" / f).read_bytes() for f in files] == got[0]
    else:                                     # the same crafted messages as one process
        one = list(csv.DictReader(io.StringIO((tmp_path / "one" / "metrics.csv").read_text())))
        ranked = list(csv.DictReader(io.StringIO(got[0][0].decode())))
        for key in ("test_accuracy", "test_loss", "acc_min"):
            assert [float(r[key]) for r in ranked] == pytest.approx([float(r[key]) for r in one], rel=1e-4), key
    byzantine = set(json.loads((tmp_path / "r1" / "summary.json").read_text())["byzantine_nodes"])
    assert len(byzantine) == 15
    if algorithm == "gossip":                 # nodes.csv: the honest nodes only
        nodes = {int(r["node"]) for r in csv.DictReader(io.StringIO((tmp_path / "r1" / "nodes.csv").read_text()))}
        assert nodes and not nodes & byzantine


@pytest.mark.slow
def test_dp_accounting_on_ranks_resumes_with_another_rank_count(tmp_path, capfd):
    """Each rank's DP-SGD steps go into the checkpoint summed (every node's); a run killed on
    2 ranks resumes on 1 with the same metrics, epsilon included."""
    cfg = _event_config("dpsgd", {}, nodes=40, stop={"rounds": 4}, eval={"every": 1},
                        privacy={"dp": {"level": "sample", "noise_multiplier": 0.8, "clip_norm": 1.0}})
    cfg["partition"] = {"name": "iid", "num_nodes": 40}
    cfg["output"] = {"progress": False, "checkpoint_every": 1}
    path = tmp_path / "dp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    want = _ranked_runs(capfd, path, (2,), ("metrics.csv",))[0]
    assert b"epsilon" in want[0]
    assert _killed_and_resumed(capfd, path, tmp_path / "killed", (2, 3, 1), 1, ("metrics.csv",)) == want


@pytest.mark.slow
@pytest.mark.parametrize("algorithm, params, level", [
    ("dpsgd", {}, "sample"),
    ("gossip", {"mode": "push_pull", "period_s": 1.0}, "sample"),
    ("fedbuff", {"concurrency": 12, "buffer_size": 4}, "sample"),
    ("fedbuff", {"concurrency": 12, "buffer_size": 4}, "client"),
], ids=["dpsgd", "gossip", "fedbuff", "dp_fedbuff"])
def test_dp_outside_synchronous_fl_on_ranks(tmp_path, capfd, algorithm, params, level):
    """DP-SGD's clipping and noise happen in each node's training, its noise keyed by the node,
    its update and the step: 1 and 2 ranks write the same bytes (D-PSGD and asynchronous FL:
    one process's; gossip: its per-node scores), epsilon included (each rank records its own
    nodes' steps; a row sums them over the ranks). Client-level DP in FedBuff: every rank runs
    the protocol, which clips each full buffer and adds its noise alike."""
    import gossamer

    cfg = _event_config(algorithm, params, nodes=40, stop={"rounds": 12 if algorithm == "fedbuff" else 3},
                        eval={"every": 3 if algorithm == "fedbuff" else 1},
                        privacy={"dp": {"level": level, "noise_multiplier": 0.8, "clip_norm": 1.0}})
    cfg["partition"] = {"name": "iid", "num_nodes": 40}   # one sampling rate: one accountant curve
    path = tmp_path / "dp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    files = ("metrics.csv", "model.pt")
    got = _ranked_runs(capfd, path, (1, 2), files)
    assert got[0] == got[1]
    gossamer.run(path, out=tmp_path / "one")
    one = list(csv.DictReader(io.StringIO((tmp_path / "one" / "metrics.csv").read_text())))
    ranked = list(csv.DictReader(io.StringIO(got[0][0].decode())))
    clean = dict(cfg, privacy={})
    (tmp_path / "clean").mkdir()
    gossamer.run(config.validate(clean), out=tmp_path / "clean" / "run")
    plain = list(csv.DictReader(io.StringIO((tmp_path / "clean" / "run" / "metrics.csv").read_text())))
    for key in ("test_accuracy", "test_loss"):
        assert [float(r[key]) for r in ranked] == pytest.approx([float(r[key]) for r in one], rel=1e-5), key
    assert [r["test_loss"] for r in ranked] != [r["test_loss"] for r in plain]      # the noise is there
    # epsilon from every rank's DP-SGD steps summed: one process's, growing
    assert [r["epsilon"] for r in ranked] == [r["epsilon"] for r in one]
    assert float(ranked[-1]["epsilon"]) > float(ranked[1]["epsilon"]) > 0


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["fedavg", "fedpub", "dpsgd"])
def test_graph_data_on_ranks(tmp_path, capfd, algorithm):
    """SBM client subgraphs (a GCN): every rank builds the same graphs; FL clients are scored
    on their own test nodes by their owners, and FED-PUB's trained models travel beside their
    uploads (its server embeds them). 1 and 2 ranks write one process's bytes (D-PSGD: its
    per-node scores)."""
    import gossamer

    cfg = small_config("dpsgd" if algorithm == "dpsgd" else "fedavg", stop={"rounds": 3}, eval={"every": 1},
                       data={"dataset": "sbm", "params": {"num_clients": 8, "nodes": 400, "communities": 8,
                                                          "classes": 4, "features": 8}},
                       partition={"name": "natural", "num_nodes": 8},
                       model={"name": "gcn", "params": {"hidden": 16, "masked": algorithm == "fedpub"}},
                       local={"epochs": 2, "batch_size": 1, "lr": 0.2},
                       output={"progress": False, "checkpoint_every": 0})
    if algorithm == "fedpub":
        cfg["algorithm"] = {"name": "fedpub", "params": {"tau": 10.0, "l1": 0.001, "loc_l2": 0.001}}
        cfg["local"] = {"epochs": 2, "batch_size": 1, "optimizer": "adamw", "lr": 0.005}
    path = tmp_path / "sbm.yaml"
    path.write_text(yaml.safe_dump(cfg))
    got = _ranked_runs(capfd, path, (1, 2), ("metrics.csv",))
    assert got[0] == got[1]
    gossamer.run(path, out=tmp_path / "one")
    one = (tmp_path / "one" / "metrics.csv").read_bytes()
    if algorithm != "dpsgd":
        assert one == got[0][0]
        assert "personal_accuracy" in one.decode().splitlines()[0]
    else:                                     # the average model: block sums (last digits)
        for key in ("test_accuracy", "test_loss", "acc_min", "acc_max"):
            ranked = [float(r[key]) for r in csv.DictReader(io.StringIO(got[0][0].decode()))]
            assert ranked == [float(r[key]) for r in csv.DictReader(io.StringIO(one.decode()))], key


@pytest.mark.slow
def test_fedamd_anchors_and_miners_on_ranks(tmp_path, capfd):
    """FedAMD: each rank computes its anchors' full-shard gradients (batches as wide as the
    population's largest shard) and trains its miners; every rank attacks the miners' models
    and aggregates alike: 1 and 2 ranks write the same bytes, one rank one process's metrics."""
    cfg = small_config("fedavg", data={"dataset": "mnist5k"}, stop={"rounds": 3}, eval={"every": 1},
                       partition={"name": "dirichlet", "num_nodes": 40, "params": {"alpha": 0.5}},
                       model={"name": "logreg"}, local={"epochs": 1, "batch_size": 8, "lr": 0.05},
                       adversary={"attack": "alie", "fraction": 0.2},
                       output={"progress": False, "checkpoint_every": 0})
    cfg["algorithm"] = {"name": "fedamd", "params": {"client_fraction": 0.5}}
    path = tmp_path / "fedamd.yaml"
    files = ("metrics.csv", "model.pt")
    want, sharded, single = _one_rank_and_one_process(capfd, cfg, path, files)
    for key in ("test_accuracy", "test_loss", "train_loss"):          # (round 0 has no train_loss)
        assert [float(r[key]) for r in sharded[1:]] == pytest.approx([float(r[key]) for r in single[1:]],
                                                                      rel=1e-5), key
    assert _ranked_runs(capfd, path, (2,), files) == [want]


@pytest.mark.slow
@pytest.mark.parametrize("system, params", [
    ({"availability": {"model": "markov", "mean_on_s": 3.0, "mean_off_s": 2.0}}, {}),
    ({}, {"deadline_s": 0.3, "over_selection": 0.3}),
], ids=["churn", "deadline"])
def test_fedavg_with_churn_or_deadlines_is_bit_identical_over_ranks_and_resumes(tmp_path, capfd, system, params):
    """Availability changes only whom a round selects, and a deadline only whose upload counts
    (arrival times come from profiles and sample counts, before training): both are counter-
    based and the same on every rank, so synchronous FL writes the same bytes with 1 and 3
    ranks (each scoring some of the 4 test batches), and a run killed with 2 resumes with 3."""
    cfg = small_config("fedavg", data={"dataset": "mnist5k"}, stop={"rounds": 6},
                       eval={"every": 2, "batch_size": 300},      # 4 test batches, split over ranks
                       partition={"name": "dirichlet", "num_nodes": 200, "params": {"alpha": 0.5}},
                       system={"sample_time_s": {"dist": "uniform", "low": 0.001, "high": 0.01}, **system},
                       output={"progress": False, "checkpoint_every": 2})
    cfg["algorithm"] = {"name": "fedavg", "params": {"client_fraction": 0.3, **params}}
    path = tmp_path / "fl.yaml"
    path.write_text(yaml.safe_dump(cfg))
    got = _ranked_runs(capfd, path, (1, 3))
    assert got[0] == got[1]
    rows = list(csv.DictReader(io.StringIO(got[0][0].decode())))[1:]
    if params:                             # some uploads missed the deadline, some made it
        assert int(rows[-1]["dropped"]) > 0 and int(rows[-1]["bytes_up"]) > 0
    else:                                  # some selected nodes were off
        assert len({int(r["participants"]) for r in rows}) > 1
    assert _killed_and_resumed(capfd, path, tmp_path / "killed", (2, 3, 1), 3,
                               ("metrics.csv", "model.pt")) == got[0]


@pytest.mark.slow
@pytest.mark.parametrize("algorithm, params, extra", [
    ("scaffold", {"client_fraction": 0.3}, {}),               # client states, kept by their owners
    # ALIE crafts the attackers' uploads from every honest one: after the uploads are shared
    ("fedavg", {"client_fraction": 0.3, "aggregator": "median"}, {"adversary": {"attack": "alie", "fraction": 0.2}}),
], ids=["scaffold", "median_alie"])
def test_fl_beyond_the_mean_runs_on_ranks_as_in_one_process(tmp_path, capfd, algorithm, params, extra):
    """Each rank trains its clients (SCAFFOLD: and keeps their control variates); every rank
    gets every upload in the round's order, then attacks and aggregates alike, so 1 and 3 ranks
    write one process's bytes, and a run killed with 2 ranks resumes with 3 (the checkpoint
    gathers every rank's client states)."""
    import gossamer

    cfg = small_config("fedavg", data={"dataset": "mnist5k"}, stop={"rounds": 6}, eval={"every": 2},
                       partition={"name": "dirichlet", "num_nodes": 200, "params": {"alpha": 0.5}},
                       output={"progress": False, "checkpoint_every": 2}, **extra)
    cfg["algorithm"] = {"name": algorithm, "params": params}
    path = tmp_path / "fl.yaml"
    path.write_text(yaml.safe_dump(cfg))
    gossamer.run(path, out=tmp_path / "one")
    want = [(tmp_path / "one" / f).read_bytes() for f in ("metrics.csv", "model.pt")]
    assert _ranked_runs(capfd, path, (1, 3)) == [want, want]
    assert _killed_and_resumed(capfd, path, tmp_path / "killed", (2, 5, 1), 3,
                               ("metrics.csv", "model.pt")) == want


@pytest.mark.slow
@pytest.mark.parametrize("section", [
    {"compression": {"uplink": {"name": "topk", "params": {"density": 0.01}}, "feedback": "ef"}},
    {"privacy": {"secure_aggregation": {"threshold": 0.5, "bits": 32, "clip": 1.0}}},
], ids=["topk_ef", "secure_aggregation"])
def test_compressed_private_and_secure_uploads_on_ranks_equal_one_process(tmp_path, capfd, section):
    """Compression (with error feedback) and secure aggregation (DP too: checked by hand, its
    accountant makes the test slow) key their randomness by client and round, and every rank
    runs the server's side of the upload pipeline over every upload: 2 ranks write one
    process's bytes, also after a run killed with 2 resumes with 3."""
    import gossamer

    cfg = small_config("fedavg", data={"dataset": "mnist5k"}, stop={"rounds": 4}, eval={"every": 4},
                       partition={"name": "dirichlet", "num_nodes": 100, "params": {"alpha": 0.5}},
                       output={"progress": False, "checkpoint_every": 2}, **section)
    cfg["algorithm"] = {"name": "fedavg", "params": {"client_fraction": 0.3}}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    gossamer.run(path, out=tmp_path / "one")
    want = [(tmp_path / "one" / f).read_bytes() for f in ("metrics.csv", "model.pt")]
    assert _ranked_runs(capfd, path, (2,)) == [want]
    assert _killed_and_resumed(capfd, path, tmp_path / "killed", (2, 3, 1), 3,
                               ("metrics.csv", "model.pt")) == want


@pytest.mark.slow
def test_only_rank_0_scores_an_unsplit_test_batch_unless_a_target_needs_it(tmp_path, capfd):
    """With one test batch the other ranks skip the global model's evaluation (rank 0 writes
    the metrics, and its tracker alone logs them); with a target accuracy to stop at, every
    rank scores it and all stop at the same round."""
    cfg = small_config("fedavg", stop={"rounds": 4}, output={"progress": False, "checkpoint_every": 0,
                                                             "trackers": [{"name": "tensorboard"}]})
    path = tmp_path / "skip.yaml"
    path.write_text(yaml.safe_dump(cfg))
    one, two = _ranked_runs(capfd, path, (1, 2), ("metrics.csv",))
    assert one == two
    assert len(list((tmp_path / "r2" / "tensorboard").glob("events.out.tfevents.*"))) == 1
    acc = [float(row["test_accuracy"]) for row in csv.DictReader(io.StringIO(one[0].decode()))]
    target = acc[2] - 1e-4         # reached at round 2 or before (below the printed digits' rounding)
    cfg["stop"] = {"rounds": 4, "target_accuracy": target}
    cfg["output"] = {"progress": False, "checkpoint_every": 0}
    (tmp_path / "target").mkdir()
    path = tmp_path / "target" / "stop.yaml"
    path.write_text(yaml.safe_dump(cfg))
    one, two = _ranked_runs(capfd, path, (1, 2), ("metrics.csv",))
    assert one == two
    rounds = [int(row["round"]) for row in csv.DictReader(io.StringIO(one[0].decode()))]
    assert rounds[-1] == next(r for r, a in enumerate(acc) if a >= target) <= 2
