"""Build everything a run needs from a validated config, with semantic checks.

The semantic checks need the data and the graph, so they live here rather than in the
schema; they raise :class:`ConfigError` naming the field, like schema errors do.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from gossamer import rng, wire
from gossamer.algorithms import ALGORITHMS, Algorithm
from gossamer.compression.base import Compressor
from gossamer.config import ConfigError, ExperimentConfig
from gossamer.data import Dataset, load_dataset, partition
from gossamer.models import ModelNotVectorizable, ParamSpec, build_model, make_stacked_forward
from gossamer.sim.adversary import Adversary
from gossamer.sim.evaluator import BatchedEvaluator
from gossamer.sim.faults import Faults
from gossamer.sim.system import Availability, SystemProfile
from gossamer.sim.trainer import DPSGD, SGD, BatchedTrainer, LocalSchedule

if TYPE_CHECKING:
    from gossamer.topology import DynamicTopology, Topology


@dataclass
class Experiment:
    """The built parts of one run; drivers read from it and never touch the config again."""

    cfg: ExperimentConfig
    algorithm: Algorithm
    dataset: Dataset
    shards: list[np.ndarray]
    model: torch.nn.Module
    spec: ParamSpec
    init_params: torch.Tensor          # [P] or [N, P] (independent init)
    trainer: BatchedTrainer
    evaluator: BatchedEvaluator
    system: SystemProfile
    availability: Availability
    message_bytes: int
    topology: Topology | None = None
    mixing: torch.Tensor | None = None
    mixing_scipy: object | None = None
    spectral_gap: float | None = None
    faults: Faults | None = None
    adversary: Adversary | None = None
    dynamic: DynamicTopology | None = None   # a graph per round; then `topology` is the union
                                             # of its first window and `mixing` is None
    uplink: Compressor | None = None         # compression of FL client updates (compression.uplink)
    downlink: Compressor | None = None       # compression of the FL broadcast (compression.downlink)

    @property
    def num_nodes(self) -> int:
        return self.cfg.partition.num_nodes

    def online(self, t: float) -> np.ndarray:
        """Bool ``[N]``: nodes up at simulated time ``t`` (availability and fault models)."""
        up = self.availability.at(t)
        if self.faults is not None and self.faults.enabled:
            up &= self.faults.alive(t)
        return up


def _user_error(field: str):
    """Turn a ValueError/KeyError raised while building a part into a ConfigError on ``field``."""

    class _Ctx:
        def __enter__(self):
            return self

        def __exit__(self, typ, exc, tb):
            if exc is not None and isinstance(exc, (ValueError, KeyError, TypeError)) \
                    and not isinstance(exc, ConfigError):
                message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
                raise ConfigError(field, str(message).splitlines()[0]) from None
            return False

    return _Ctx()


def build_experiment(cfg: ExperimentConfig) -> Experiment:
    algorithm = ALGORITHMS.get(cfg.algorithm.name).from_params(cfg.algorithm.params)
    n = cfg.partition.num_nodes
    with _user_error("data.params"):
        dataset = load_dataset(cfg.data.dataset, **cfg.data.params)
    samples = len(dataset.y_train)
    if n > samples and cfg.partition.params.get("relay_fraction", 0) == 0 and algorithm.family == "fl":
        raise ConfigError("partition.num_nodes",
                          f"{n} clients but only {samples} training samples")
    with _user_error("partition"):
        params = dict(cfg.partition.params)
        if cfg.partition.name == "natural":
            if dataset.natural_partition is None:
                raise ConfigError("partition.name", f"dataset {dataset.name} has no natural partition")
            params["natural"] = dataset.natural_partition
        shards = partition(cfg.partition.name, dataset.y_train.numpy(), n, cfg.seed, **params)
    with _user_error("model.params"):
        model = build_model(cfg.model.name, dataset.input_shape, dataset.num_classes, cfg.seed,
                            **cfg.model.params)
    spec = ParamSpec.from_module(model)
    try:
        forward = make_stacked_forward(model, spec, dataset.x_train[0], cfg.model.forward)
    except ModelNotVectorizable as exc:
        raise ConfigError("model", str(exc)) from None
    init = spec.flatten(model)
    if cfg.model.init == "independent":
        init = torch.stack([
            spec.flatten(build_model(cfg.model.name, dataset.input_shape, dataset.num_classes,
                                     int(rng.hash_u64(cfg.seed, rng.STREAM_INIT, i)[0] % 2**31),
                                     **cfg.model.params))
            for i in range(n)])
    local = cfg.local
    schedule = LocalSchedule(local.batch_size, None if local.steps else int(local.epochs or 1),
                             local.steps, local.shuffle)
    kernel = getattr(model, "stacked_kernel", None) if cfg.model.forward != "vmap" else None
    trainer = BatchedTrainer(forward, spec, dataset.x_train, dataset.y_train, shards, schedule,
                             SGD(local.lr, local.momentum, local.weight_decay, _sam_rho(cfg, algorithm)),
                             cfg.seed, kernel, dp=_dp_sgd(cfg))
    x_test, y_test = dataset.x_test, dataset.y_test
    if cfg.eval.test_subset is not None and cfg.eval.test_subset < len(y_test):
        keep = np.sort(rng.generator(cfg.seed, rng.STREAM_EVAL, 0).permutation(len(y_test))[: cfg.eval.test_subset])
        x_test, y_test = x_test[keep], y_test[keep]
    evaluator = BatchedEvaluator(forward, spec, x_test, y_test, cfg.eval.batch_size)
    if algorithm.family == "dl":
        for field in ("latency_up_s", "latency_down_s"):
            if getattr(cfg.system, field) is not None:
                raise ConfigError(f"system.{field}", "decentralized algorithms send peer to peer "
                                  "with one latency per node: set system.latency_s")
    system = SystemProfile.from_config(cfg.system, n, cfg.seed)
    if trainer.optimizer.sam_rho:       # SAM takes two gradients per step: twice the compute
        system = dataclasses.replace(system, sample_time_s=2 * system.sample_time_s)
    availability = Availability.from_config(cfg.system, n, cfg.seed)
    exp = Experiment(cfg, algorithm, dataset, shards, model, spec, init, trainer, evaluator, system,
                     availability, wire.encoded_size(spec.numel))
    if algorithm.family == "dl":
        _attach_topology(exp)
    _attach_faults_and_adversary(exp)
    _attach_compression(exp)
    _check_privacy(exp)
    if cfg.privacy.secure_aggregation is not None:         # docs/privacy.md
        from gossamer.privacy.secagg import check_config

        check_config(cfg, exp.algorithm, exp.num_nodes)
    return exp


def _dp_sgd(cfg: ExperimentConfig) -> DPSGD | None:
    dp = cfg.privacy.dp
    return DPSGD(dp.clip_norm, dp.noise_multiplier) if dp is not None and dp.level == "sample" else None


def _check_privacy(exp: Experiment) -> None:
    """Refuse what differential privacy cannot run with (docs/privacy.md)."""
    cfg, algorithm, dp = exp.cfg, exp.algorithm, exp.cfg.privacy.dp
    if dp is None:
        return
    if hasattr(algorithm, "anchors"):
        raise ConfigError("privacy.dp", "FedAMD's anchors upload full-shard gradients; DP is not "
                          "supported with fedamd")
    if dp.level == "sample":
        if exp.trainer.optimizer.sam_rho:
            raise ConfigError("privacy.dp", "DP-SGD does not combine with SAM (local.sam_rho)")
        return
    if algorithm.pattern != "sync_fl":
        raise ConfigError("privacy.dp.level", f"client-level DP runs with synchronous FL "
                          f"algorithms; {cfg.algorithm.name} is {algorithm.pattern}")
    if algorithm.upload_vectors != 1:
        raise ConfigError("privacy.dp.level", f"{cfg.algorithm.name} uploads more than the model "
                          "update (e.g. control variates), which client-level DP does not bound")
    if getattr(algorithm, "aggregator", "mean") != "mean":
        raise ConfigError("privacy.dp.level", "client-level DP averages clipped updates; it "
                          "does not combine with a robust aggregator")
    if cfg.compression.uplink is not None:
        raise ConfigError("privacy.dp.level", "client-level DP does not combine with upload "
                          "compression yet")
    if dp.mechanism == "rqm" and cfg.privacy.secure_aggregation is not None:
        raise ConfigError("privacy.dp.mechanism", "rqm uploads are level indices, not ring "
                          "elements; it does not combine with secure aggregation")


def _attach_compression(exp: Experiment) -> None:
    """Build ``compression.uplink`` and refuse what the drivers cannot run with it."""
    from gossamer.compression import build_compressor

    cfg, algorithm = exp.cfg, exp.algorithm
    comp = cfg.compression
    if comp.downlink is not None:
        if algorithm.pattern != "sync_fl":
            raise ConfigError("compression.downlink", f"broadcast compression runs with synchronous "
                              f"FL algorithms so far; {cfg.algorithm.name} is {algorithm.pattern}")
        if (algorithm.download_vectors != 1 or getattr(algorithm, "prox_mu", 0)
                or getattr(algorithm, "momentum_beta", None) is not None
                or algorithm.client_state_vectors or hasattr(algorithm, "anchors")):
            raise ConfigError("compression.downlink", f"{cfg.algorithm.name} sends clients more than "
                              "the model, or uses the global model in local training; broadcast "
                              "compression supports FedAvg and the server optimizers")
        with _user_error("compression.downlink.params"):
            exp.downlink = build_compressor(comp.downlink.name, comp.downlink.params, spec=exp.spec)
    if comp.uplink is None:
        if comp.feedback != "none":
            raise ConfigError("compression.feedback", f"{comp.feedback} needs compression.uplink")
        return
    if algorithm.pattern != "sync_fl":
        raise ConfigError("compression.uplink", f"upload compression runs with synchronous FL "
                          f"algorithms so far; {cfg.algorithm.name} is {algorithm.pattern}")
    if hasattr(algorithm, "anchors"):
        raise ConfigError("compression.uplink", "FedAMD's anchors upload full gradients; "
                          "compression is not supported with fedamd")
    with _user_error("compression.uplink.params"):
        exp.uplink = build_compressor(comp.uplink.name, comp.uplink.params, spec=exp.spec)
    variable = exp.uplink.nominal_bytes(exp.spec.numel) is None
    if variable and (algorithm.deadline_s is not None or algorithm.over_selection):
        raise ConfigError("compression.uplink", f"{comp.uplink.name} makes upload sizes depend on "
                          "the update, so arrival times are known only after training; it cannot "
                          "be combined with a round deadline or over-selection")


def _sam_rho(cfg: ExperimentConfig, algorithm: Algorithm) -> float:
    """SAM's radius for local training: ``local.sam_rho``, or the one a SAM algorithm
    (``dfedsam``: ``algorithm.params.rho``) sets; both set to different values is an error."""
    from gossamer.algorithms.fl.fedamd import FedAMD

    own = float(getattr(algorithm, "local_sam_rho", 0.0))
    rho = cfg.local.sam_rho
    if own and rho and own != rho:
        raise ConfigError("local.sam_rho", f"algorithm {cfg.algorithm.name} sets SAM's radius "
                          f"(params.rho = {own}); set it in one place")
    rho = rho or own
    if rho and isinstance(algorithm, FedAMD):
        raise ConfigError("local.sam_rho", "SAM does not combine with FedAMD's recursive "
                          "direction; set it to 0")
    return rho


def _attach_faults_and_adversary(exp: Experiment) -> None:
    cfg, n = exp.cfg, exp.num_nodes
    degrees = exp.topology.degrees() if exp.topology is not None else None
    exp.faults = Faults.from_config(cfg, n, degrees=degrees, has_data=exp.trainer.sizes > 0)
    exp.adversary = Adversary.from_config(cfg, n)
    if exp.adversary.data_attack:
        exp.trainer.y = exp.adversary.poison_labels(exp.trainer.y, exp.shards, exp.dataset.num_classes)
    name = getattr(exp.algorithm, "aggregator", "mean")
    if name != "mean":
        from gossamer.aggregators import check_aggregator

        if exp.algorithm.family == "fl":
            holders = int((exp.trainer.sizes > 0).sum())
            smallest = exp.algorithm.expected_clients(holders)
            what = f"{smallest} clients per round"
        elif exp.dynamic is not None:
            from gossamer.topology import window_links

            smallest = min(int(links.in_degrees.min()) for links in window_links(exp.dynamic)) + 1
            what = (f"{smallest} models at the least connected node of rounds 1..{exp.dynamic.window} "
                    "(its own and the ones it received)")
        else:
            smallest = int(exp.topology.degrees().min()) + 1
            what = f"{smallest} models at the least connected node (its own and its neighbours')"
        try:
            check_aggregator(name, smallest, **exp.algorithm.aggregator_params)
        except ValueError as exc:
            raise ConfigError("algorithm.params.aggregator",
                              f"{name} cannot run on {what}: {str(exc).splitlines()[0]}") from None


def _attach_topology(exp: Experiment) -> None:
    from gossamer.topology import (
        make_dynamic,
        make_topology,
        mixing_matrix,
        spectral_gap,
        to_torch_sparse,
    )

    cfg = exp.cfg
    assert cfg.topology is not None
    with _user_error("topology.params"):
        dynamic = make_dynamic(cfg.topology.name, exp.num_nodes, cfg.seed, cfg.topology.resample,
                               **cfg.topology.params)
    if dynamic is not None:
        _attach_dynamic(exp, dynamic)
        return
    with _user_error("topology.params"):
        topo = make_topology(cfg.topology.name, exp.num_nodes, cfg.seed, **cfg.topology.params)
    if exp.num_nodes > 1 and not topo.is_connected():
        raise ConfigError("topology", f"{cfg.topology.name} graph with {exp.num_nodes} nodes is "
                          "disconnected; decentralized training cannot reach consensus on it")
    w = mixing_matrix(cfg.topology.mixing, topo)
    exp.topology, exp.mixing_scipy = topo, w
    exp.mixing = to_torch_sparse(w)
    exp.spectral_gap = float(spectral_gap(w)) if exp.num_nodes > 1 else 1.0


def _attach_dynamic(exp: Experiment, dynamic: DynamicTopology) -> None:
    """A graph per round. Rule: one round's graph may be disconnected, but the union of rounds
    1..window (ceil(log2 N)) must be strongly connected, so every model can reach every node."""
    from gossamer.topology import union_links

    cfg, n, window = exp.cfg, exp.num_nodes, dynamic.window
    with _user_error("topology.params"):
        union = union_links(dynamic)
    if n > 1 and not union.is_strongly_connected():
        raise ConfigError("topology", f"{cfg.topology.name} with {n} nodes: the union of rounds 1..{window} "
                          "is disconnected; decentralized training cannot reach consensus on it")
    exp.dynamic, exp.topology = dynamic, union.undirected()
