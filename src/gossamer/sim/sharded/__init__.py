"""The simulator sharded over ``torch.distributed`` ranks (docs/scale.md).

Every rank builds the same experiment and runs the same protocol: selection, simulated times
and accounting are counter-based, so every rank takes every decision identically without
talking. What is split is the work: rank ``k`` owns the contiguous node ids ``[lo_k, hi_k)``
(cut at block boundaries, ``sharding.block`` ids, so that the ranks' expected work is about
equal) and trains,
mixes and evaluates only its nodes. What crosses ranks is summed in an order fixed by node
id, not by rank, so a run writes the same ``metrics.csv`` and ``model.pt`` with 1, 2 or 4
ranks, bit for bit, and resumes from its checkpoint with any number of ranks. Rank 0 writes
the run directory.

- synchronous FL (also personalized, FED-PUB and FedAMD; also over a registered population): :mod:`.fl`;
  an aggregate that is the uploads' weighted mean (FedAvg, FedProx, FedAvgM, FedAdam, ...) from
  block sums, any other (SCAFFOLD, DiLoCo, robust aggregators) from every upload, shared in the
  round's order;
- synchronous DL with mean mixing (D-PSGD, DFedSAM; static or dynamic topologies, gossip
  steps, the final merge): :mod:`.dl`, neighbours' rows point to point before every mixing
  step; gradient tracking (:mod:`.tracking`), whose trackers' directions mix the same way;
  CHOCO-SGD (:mod:`.choco`), whose public copies mix the same way;
- gossip learning (every mode, merge rule and clock model): :mod:`.gossip`, one schedule on
  every rank, each node merged and trained by its owner, messages across ranks copied from
  shared memory (one machine) or sent point to point;
- MoDeST and random walks: :mod:`.walks`, the whole protocol on every rank, the round's
  trainers (the tokens' visits) trained by their nodes' owners;
- asynchronous FL (FedAsync, FedBuff, FedCompass, ...; also over a registered population):
  :mod:`.async_fl`, one schedule on every rank, each task trained by its client's owner, the
  uploads of a batch of training shared (:mod:`.owned`).

Launch: ``gossamer run CONFIG --ranks K`` starts K processes on this machine (gloo, one
intra-op thread each unless ``--threads``); ``torchrun --nproc-per-node K -m gossamer run
CONFIG --out DIR`` (one or several machines, torchrun's rendezvous) works the same. With
``device: cuda`` (or ``auto`` where torch sees GPUs) each rank computes on the GPU of its local
rank and the process group is gloo for host tensors and NCCL for the GPU's: rows, block sums and
the tree's additions go rank to rank through NCCL (never through shared memory).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from gossamer.config import ConfigError, ExperimentConfig
from gossamer.sim.sharded.base import (
    BLOCK,
    TIMEOUT_S,
    TRANSPORT_ENV,
    Shard,
    block_sums,
    ranges,
    start,
    transport,
    world_from_env,
)
from gossamer.sim.sharded.launch import launch

if TYPE_CHECKING:
    from gossamer.sim.drivers import Driver
    from gossamer.sim.experiment import Experiment

REFUSED = ("faults and model attacks with CHOCO-SGD (refused in one process too), compression (but in FL), "
           "client-level DP (but in FL), secure aggregation, contribution scores and hierarchies (but in synchronous FL), a registered "
           "population (synchronous DL) and availability changes (CHOCO-SGD)")


def check_config(cfg: ExperimentConfig, ranks: int | None = None) -> None:
    """One line for what the sharded simulator cannot run yet (from the config alone, so the
    launcher refuses before it starts any process; ``ranks``: how many it would start, else
    ``WORLD_SIZE``)."""
    from gossamer.algorithms import ALGORITHMS
    from gossamer.experiment import features_in_use

    transport()
    algo = ALGORITHMS.get(cfg.algorithm.name).from_params(cfg.algorithm.params)
    fl = algo.pattern == "sync_fl"
    dl = algo.pattern in ("sync_dl", "gradient_tracking", "choco")
    gossip = algo.pattern == "async_gossip"
    if not (fl or dl or gossip or algo.pattern in ("async_fl", "sampled_dl", "random_walk")):
        raise ConfigError("algorithm.name", f"the sharded simulator runs synchronous FL, synchronous DL "
                          f"(dpsgd, dfedsam, gradient_tracking, choco), gossip learning, MoDeST, random "
                          f"walks and asynchronous FL (fedasync, fedbuff, ...); {cfg.algorithm.name} runs "
                          f"in one process (drop --ranks)")
    if cfg.model.compile:
        raise ConfigError("model.compile", "not with the sharded simulator: a compiled kernel may round a "
                          "node's values differently with the number of nodes in its call, and the ranks "
                          "must compute every node's bits alike; drop --ranks or model.compile")
    _check_device(cfg.device, ranks)
    features = features_in_use(cfg)
    if fl:     # every rank runs the attack, the upload pipeline and the server's side alike
        features.update(compression=False, privacy=False, adversary=False,     # over every upload
                        **{"contribution.methods": False, "hierarchy.levels": False,
                           "partition.test_fraction": False})      # every client's test rows
    if algo.pattern == "async_fl":      # every rank forms every upload, compressed and noised alike
        features.update(compression=False, privacy=False)
    # asynchronous FL, MoDeST: every rank holds every trained model; DL, gossip: crafted on the
    # receiver's owner, keyed by it; CHOCO-SGD: data attacks only (as in one process)
    if algo.pattern != "choco" or _data_attacks_only(cfg):
        features.update(adversary=False)
    dp = cfg.privacy.dp
    if dp is not None and dp.level == "sample" and cfg.privacy.secure_aggregation is None:
        features.update(privacy=False)      # DP-SGD: each node's noise keyed by node, update and step
    if algo.pattern != "choco":         # faults: a counter-based schedule, alike on every rank
        features.update(faults=False)
    # pre-training on public rows happens as every rank builds the run: the same initial model;
    # graph data (sbm): every rank builds the same graphs (FL: each client's test nodes scored
    # by its owner, as held-out rows are)
    features.update({"partition.public_fraction": False, "model.pretrain": False, "data.dataset": False})
    unsupported = {"population.lazy": dl and cfg.population.lazy, **features,
                   "system.availability.model": algo.pattern == "choco" and cfg.system.availability.model != "always"}
    field = next((k for k, bad in unsupported.items() if bad), None)
    if field is not None:
        raise ConfigError(field, f"not with the sharded simulator yet (it shards runs without {REFUSED}); "
                          "drop --ranks")


def _check_device(name: str, ranks: int | None) -> None:
    """Ranks on GPUs: one GPU a rank (NCCL's rule), each taking its local rank's
    (:func:`gossamer.devices.resolve`), and rows exchanged through NCCL, not shared memory."""
    import os

    import torch

    from gossamer.sim.sharded.base import world_from_env

    world = world_from_env()[1] if ranks is None else ranks
    if world == 1 or name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return
    if torch.device("cuda" if name == "auto" else name).index is not None:     # (the config allows cuda[:N])
        raise ConfigError("device", f"{name} would put every rank on one GPU: set device: cuda (each rank "
                          "takes the GPU of its local rank)")
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world)) if ranks is None else ranks
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if local > count:
        raise ConfigError("device", f"{local} ranks on this machine but torch sees {count} CUDA device(s): "
                          "NCCL needs a GPU a rank (fewer ranks, or device: cpu)")
    if transport() == "shared":
        raise ConfigError(TRANSPORT_ENV, "shared: ranks on GPUs exchange rows through NCCL, not shared "
                          "memory (unset it, or p2p)")


def _data_attacks_only(cfg: ExperimentConfig) -> bool:
    """Whether every attacker of the config poisons its data (none crafts models)."""
    from gossamer.attacks.data import DATA_ATTACKS

    return all(a in DATA_ATTACKS for a in (cfg.adversary.attack, *(g.attack for g in cfg.adversary.groups))
               if a is not None)


def check(exp: Experiment) -> None:
    """:func:`check_config` for a built experiment."""
    check_config(exp.cfg)


def build_driver(exp: Experiment) -> tuple[Shard, Driver]:
    """This rank's shard (joining the process group) and its driver. FL ranks are balanced by
    their clients' samples (a registered population: by id count); DL ranks by samples plus
    one average shard a node (every node mixes and is evaluated, data or not). Sample-level DP
    outside synchronous FL: epsilon from every rank's DP-SGD steps (:mod:`.ledger`)."""
    check(exp)
    shard, driver = _build_driver(exp)
    if driver.steps_ledger is not None and shard.world > 1:
        from gossamer.sim.sharded.ledger import RankSummedLedger

        driver.steps_ledger = RankSummedLedger(driver.steps_ledger, shard)
        driver.collective_state = True          # the checkpoint sums every rank's steps
    return shard, driver


def _build_driver(exp: Experiment) -> tuple[Shard, Driver]:
    block = exp.cfg.sharding.block
    if exp.algorithm.pattern == "async_fl":
        from gossamer.sim.sharded.async_fl import ShardedAsyncFLDriver

        registered = exp.population is not None          # nothing of length N: even id ranges
        shard = start(exp.num_nodes if registered else np.asarray(exp.trainer.sizes, dtype=np.float64), block,
                      exp.device)
        return shard, ShardedAsyncFLDriver(exp, shard)
    if exp.algorithm.pattern == "sync_fl" and exp.population is not None:   # registered: even id ranges
        from gossamer.sim.sharded.fl import ShardedSyncFLDriver

        shard = start(exp.num_nodes, block, exp.device)
        return shard, ShardedSyncFLDriver(exp, shard)
    sizes = np.asarray(exp.trainer.sizes, dtype=np.float64)
    if exp.algorithm.pattern in ("sampled_dl", "random_walk"):
        from gossamer.sim.sharded.walks import ShardedModestDriver, ShardedRandomWalkDriver

        shard = start(sizes, block, exp.device)          # a node's share of the training is its data's
        cls = ShardedModestDriver if exp.algorithm.pattern == "sampled_dl" else ShardedRandomWalkDriver
        return shard, cls(exp, shard)
    if exp.algorithm.pattern == "async_gossip":
        from gossamer.sim.sharded.gossip import ShardedGossipDriver

        # about the same number of updates a node: each costs its samples, plus a merge and an
        # evaluation for every node
        schedule = exp.trainer.schedule
        per_update = schedule.steps * schedule.batch_size if schedule.steps else (schedule.epochs or 1) * sizes
        work = np.where(sizes > 0, per_update, 0.0)
        shard = start(work + max(float(work.mean()), 1.0), block, exp.device)
        return shard, ShardedGossipDriver(exp, shard)
    if exp.algorithm.pattern == "sync_fl":
        from gossamer.sim.sharded.fl import ShardedSyncFLDriver

        shard = start(sizes, block, exp.device)
        return shard, ShardedSyncFLDriver(exp, shard)
    from gossamer.sim.sharded.choco import ShardedChocoDriver
    from gossamer.sim.sharded.dl import ShardedSyncDLDriver
    from gossamer.sim.sharded.tracking import ShardedGradientTrackingDriver

    shard = start(sizes + max(float(sizes.mean()), 1.0), block, exp.device)
    if exp.algorithm.pattern == "gradient_tracking":
        return shard, ShardedGradientTrackingDriver(exp, shard)
    if exp.algorithm.pattern == "choco":
        return shard, ShardedChocoDriver(exp, shard)
    return shard, ShardedSyncDLDriver(exp, shard)


__all__ = ["BLOCK", "TIMEOUT_S", "TRANSPORT_ENV", "Shard", "block_sums", "build_driver", "check", "check_config",
           "launch", "ranges", "start", "world_from_env"]
