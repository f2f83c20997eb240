"""Build everything a run needs from a validated config, with semantic checks.

The semantic checks need the data and the graph, so they live here rather than in the
schema; they raise :class:`ConfigError` naming the field, like schema errors do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from gossamer import devices, rng, wire
from gossamer.algorithms import ALGORITHMS, Algorithm
from gossamer.algorithms.fl.personalized import head_parameters
from gossamer.attacks.adversary import Adversary
from gossamer.compression.base import Compressor
from gossamer.config import ConfigError, ExperimentConfig
from gossamer.data import Dataset, load_dataset, partition
from gossamer.data.partition import split_local_test
from gossamer.metrics.contribution import Contribution
from gossamer.models import ModelNotVectorizable, ParamSpec, build_model, make_stacked_forward
from gossamer.privacy.plan import calibrate
from gossamer.protocols.hierarchy import Link, Tree, build_tree
from gossamer.sim.faults import Faults
from gossamer.sim.system import Availability, SystemProfile
from gossamer.training.evaluator import BatchedEvaluator, PersonalEvaluator
from gossamer.training.pretrain import pretrain, public_rows
from gossamer.training.trainer import SGD, AdamW, BatchedTrainer, LocalSchedule, PrivateSGD

if TYPE_CHECKING:
    from gossamer.attacks.adversary import Adversary
    from gossamer.sim.faults import Faults
    from gossamer.sim.system import Availability, SystemProfile
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
    message_bytes: int
    system: SystemProfile | None = None          # the simulator's clock (sim/experiment.py)
    availability: Availability | None = None
    topology: Topology | None = None
    mixing: torch.Tensor | None = None
    mixing_scipy: object | None = None
    spectral_gap: float | None = None
    faults: Faults | None = None
    adversary: Adversary | None = None
    dynamic: DynamicTopology | None = None   # a graph per round; then `topology` is the union
                                             # of its first window and `mixing` is None
    uplink: Compressor | None = None         # compression of FL client updates (compression.uplink)
    contribution: Contribution | None = None  # contribution scores (metrics/contribution.py)
    hierarchy: Tree | None = None             # aggregators between clients and server (protocols/hierarchy.py)
    personal: PersonalEvaluator | None = None  # each client's own test rows (partition.test_fraction)
    downlink: Compressor | None = None       # compression of the FL broadcast (compression.downlink)
    population: object | None = None          # a registered population's ClientSource (population.lazy)
    clicks: object | None = None              # G-Rank's click model (data/clicks.py); then no
                                              # dataset, model, trainer or evaluator is built
    device: torch.device = torch.device("cpu")  # where the simulator computes (devices.py)

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


def build(cfg: ExperimentConfig, *, population: bool = True) -> Experiment:
    """Build and check what every executor shares: data, shards, model, trainer, evaluator,
    algorithm, compressors, topology, adversary (the simulator adds its clock and faults in
    :func:`gossamer.sim.experiment.build_experiment`). ``population``: the caller will hold the
    simulator's ``[N, P]`` model buffers, so a population that cannot fit in memory is refused
    before anything is allocated (a runtime process holding one node's model passes False;
    the graph is checked either way, every process builds it)."""
    algorithm = ALGORITHMS.get(cfg.algorithm.name).from_params(cfg.algorithm.params)
    device = devices.resolve(cfg.device)
    devices.check(device, cfg.precision, algorithm.pattern)
    with torch.device("cpu"):       # built on the host: the same bits on every device
        if cfg.population.lazy:
            exp = _build_registered(cfg, algorithm)
        elif algorithm.pattern == "grank" or cfg.data.dataset == "clicks":
            return _build_ranking(cfg, algorithm)
        else:
            exp = _build_dense(cfg, algorithm, population, device)
    _place(exp, device, devices.autocast_dtype(cfg.precision), population)
    return exp


def _place(exp: Experiment, device: torch.device, autocast: torch.dtype | None,
           population: bool) -> None:
    """Move what the run computes with onto ``device`` (docs/devices.md): the trainer's and
    evaluators' data and workspaces (a registered population's cohort data move per call),
    and for the simulator (``population``) the initial model and the mixing matrix too. A runtime process keeps its models, messages and protocol state
    on the host: its trainer and evaluators take host rows and return host results."""
    exp.device = device
    exp.init_params = exp.init_params.to(device) if population else exp.init_params
    copies = sum(count for _, count in population_buffers(exp.cfg, exp.algorithm, population))
    # (a registered population keeps nothing of length N on the device: its client state is
    # a host store, its cohorts' data move there per call)
    lazy = exp.population is not None
    reserved = 4 * exp.num_nodes * exp.spec.numel * copies if population and not lazy else 0
    exp.trainer.place(device, autocast, reserved=reserved)
    exp.evaluator.place(device, autocast, reserved=reserved)
    if exp.personal is not None:
        exp.personal.place(device, autocast, exp.trainer.x, exp.trainer.y)
    if exp.mixing is not None and population:
        exp.mixing = exp.mixing.to(device)
    if exp.contribution is not None:
        exp.contribution.place(device, autocast)


def _build_dense(cfg: ExperimentConfig, algorithm: Algorithm, population: bool,
                 device: torch.device) -> Experiment:
    """:func:`build` for a materialized population, on the host (``device``: where it will
    run, for the memory check and the convolutions' timing)."""
    n = cfg.partition.num_nodes
    with _user_error("data.params"):
        dataset = load_dataset(cfg.data.dataset, **cfg.data.params)
    samples = len(dataset.y_train)
    if n > samples and cfg.partition.params.get("relay_fraction", 0) == 0 and algorithm.family == "fl":
        raise ConfigError("partition.num_nodes",
                          f"{n} clients but only {samples} training samples")
    with _user_error("model.params"):
        model = build_model(cfg.model.name, dataset.input_shape, dataset.num_classes, cfg.seed,
                            **cfg.model.params)
    spec = ParamSpec.from_module(model)
    _check_population_memory(cfg, algorithm, spec.numel, device, population)   # before shards and graph
    own_tests = _own_tests(cfg, dataset, algorithm) if dataset.local_tests is not None else None
    with _user_error("partition"):
        params = dict(cfg.partition.params)
        if cfg.partition.name == "natural":
            if dataset.natural_partition is None:
                raise ConfigError("partition.name", f"dataset {dataset.name} has no natural partition")
            params["natural"] = dataset.natural_partition
        labels, public = dataset.y_train.numpy(), None
        if labels.ndim > 1:      # graph samples (natural partition only): their count matters
            labels = np.zeros(len(labels), dtype=np.int64)
        if cfg.partition.public_fraction:          # a public set no client holds (model.pretrain)
            if cfg.partition.name == "natural":
                raise ConfigError("partition.public_fraction", "a natural partition gives every "
                                  "row to its user: hold out public rows with another partitioner")
            public, rest = public_rows(samples, cfg.partition.public_fraction, cfg.seed)
            shards = [rest[s] for s in partition(cfg.partition.name, labels[rest], n, cfg.seed, **params)]
        else:
            shards = partition(cfg.partition.name, labels, n, cfg.seed, **params)
        local_tests = None
        if cfg.partition.test_fraction:             # each node's own test rows (personalized FL)
            shards, local_tests = split_local_test(shards, cfg.partition.test_fraction, cfg.seed)
        if dataset.local_tests is not None:         # graph data: each client's held-out nodes
            local_tests = own_tests
    _check_local_budget(cfg, shards)
    cfg = calibrate(cfg, algorithm, np.array([len(s) for s in shards]), _schedule(cfg))   # privacy.dp.target_epsilon
    model, spec = _pretrain_and_wrap(cfg, algorithm, dataset, model, spec, public)
    try:
        forward = make_stacked_forward(model, spec, dataset.x_train[0], cfg.model.forward, cfg.model.conv,
                                       device, compile=cfg.model.compile)
    except ModelNotVectorizable as exc:
        raise ConfigError("model", str(exc)) from None
    init = spec.flatten(model)
    _check_graph_model(cfg, dataset, algorithm, model, spec, forward, init)
    if cfg.model.init == "independent":
        init = torch.stack([
            spec.flatten(build_model(cfg.model.name, dataset.input_shape, dataset.num_classes,
                                     int(rng.hash_u64(cfg.seed, rng.STREAM_INIT, i)[0] % 2**31),
                                     **cfg.model.params))
            for i in range(n)])
    _check_batch_norm(cfg, algorithm, spec)
    schedule, optimizer, kernel = _local_training(cfg, algorithm, model)
    trainer = BatchedTrainer(forward, spec, dataset.x_train, dataset.y_train, shards, schedule,
                             optimizer, cfg.seed, kernel, dp=_dp_sgd(cfg))
    trainer.dense = cfg.model.dense
    x_test, y_test = dataset.x_test, dataset.y_test
    if cfg.eval.test_subset is not None and cfg.eval.test_subset < len(y_test):
        keep = np.sort(rng.generator(cfg.seed, rng.STREAM_EVAL, 0).permutation(len(y_test))[: cfg.eval.test_subset])
        x_test, y_test = x_test[keep], y_test[keep]
    evaluator = BatchedEvaluator(forward, spec, x_test, y_test, cfg.eval.batch_size)
    exp = Experiment(cfg, algorithm, dataset, shards, model, spec, init, trainer, evaluator,
                     wire.encoded_size(spec.numel))
    if getattr(algorithm, "head_layers", None) is not None:        # FedRep's head and body
        with _user_error("algorithm.params"):
            head_parameters(spec, algorithm.head_layers)
    if algorithm.local_entries:                                     # FedBN's BatchNorm layers
        with _user_error("model.name"):
            algorithm.personal_entries(spec)
    if cfg.eval.personal_finetune_steps and local_tests is None:
        raise ConfigError("eval.personal_finetune_steps", "fine-tuning before evaluation needs "
                          "each client's own test split: set partition.test_fraction")
    if local_tests is not None:
        if algorithm.pattern != "sync_fl":
            raise ConfigError("partition.test_fraction", "per-client test splits are evaluated for "
                              f"synchronous FL algorithms; {cfg.algorithm.name} is {algorithm.pattern}")
        exp.personal = PersonalEvaluator(forward, spec, dataset.x_train, dataset.y_train, local_tests)
    if algorithm.family == "dl":
        _attach_topology(exp)
    exp.adversary = Adversary.from_config(cfg, n)
    if cfg.adversary.groups and algorithm.pattern != "sync_fl":
        raise ConfigError("adversary.groups", f"several groups of attackers run with synchronous "
                          f"FL so far; {cfg.algorithm.name} is {algorithm.pattern}")
    if exp.adversary.data_attack:       # a Byzantine node trains on poisoned labels anywhere
        exp.trainer.y = exp.adversary.poison_labels(exp.trainer.y, exp.shards, exp.dataset.num_classes)
    _check_aggregator(exp)
    _attach_contribution(exp)
    _attach_compression(exp)
    _attach_hierarchy(exp)
    _check_privacy(exp)
    if cfg.privacy.secure_aggregation is not None:         # docs/privacy.md
        from gossamer.privacy.secagg import check_config

        check_config(cfg, exp.algorithm, exp.num_nodes)
        _check_secagg_threshold(exp)
    return exp


def _build_ranking(cfg: ExperimentConfig, algorithm: Algorithm) -> Experiment:
    """G-Rank's experiment: the click model and the graph; no model is trained (docs/grank.md)."""
    from gossamer.data.clicks import ClickModel, make_world

    if algorithm.pattern != "grank":
        raise ConfigError("data.dataset", f"clicks is a click model for learn-to-rank (algorithm "
                          f"grank); {cfg.algorithm.name} trains a model: choose a training dataset")
    if cfg.data.dataset != "clicks":
        raise ConfigError("data.dataset", "grank ranks items from click logs: set data.dataset: clicks")
    field = next((k for k, bad in features_in_use(cfg).items() if bad), None)
    if field is not None:
        raise ConfigError(field, "not with grank: it runs without attacks, faults, compression, "
                          "privacy, contribution scores or hierarchies (churn: system.availability)")
    if cfg.eval.nodes is not None:
        raise ConfigError("eval.nodes", "grank measures every node's NDCG (cheap: no model); leave it unset")
    n = cfg.partition.num_nodes
    with _user_error("data.params"):
        model = ClickModel.from_params(cfg.data.params)
    cells = n * n * model.tags * model.items           # counts[viewer, origin, query, item]
    if cells > 2**26:
        raise ConfigError("partition.num_nodes", f"grank keeps every node's click counts per origin, "
                          f"query and item: {n}^2 nodes x {model.tags} queries x {model.items} items "
                          f"is {cells:,} counters, over the {2**26:,} this simulator holds")
    world = make_world(model, n, cfg.seed)
    exp = Experiment(cfg, algorithm, None, [], None, None, None, None, None, 0, clicks=world)
    _attach_topology(exp)
    if exp.dynamic is not None:
        raise ConfigError("topology.name", "grank gossips over a static graph; choose a static topology")
    return exp


def _check_batch_norm(cfg: ExperimentConfig, algorithm: Algorithm, spec: ParamSpec) -> None:
    """What cannot train a model with BatchNorm layers (docs/models.md), refused naming the
    field: per-sample gradients (DP-SGD), and training without mini-batch forwards that
    update the running statistics (zeroth-order FL, full-shard gradients)."""
    if not spec.stats:
        return
    layer = spec.stats[0].rsplit(".", 1)[0]
    dp = cfg.privacy.dp
    if dp is not None and dp.level == "sample":
        raise ConfigError("privacy.dp", f"sample-level DP-SGD needs per-sample gradients, which "
                          f"BatchNorm ({layer}) couples; use level: client or a GroupNorm model")
    if algorithm.pattern in ("zo_fl", "coded") or algorithm.split_roles:
        raise ConfigError("model.name", f"{cfg.algorithm.name} never runs a training forward that "
                          f"updates BatchNorm's running statistics ({layer}); use a GroupNorm model")


def _check_graph_model(cfg: ExperimentConfig, dataset: Dataset, algorithm: Algorithm,
                       model: torch.nn.Module, spec: ParamSpec, forward, init: torch.Tensor) -> None:
    """Graph samples need per-node logits; FED-PUB needs masks and a functional embedding."""
    if dataset.y_train.dim() > 1:
        with torch.no_grad():
            out = forward(spec.views(init.reshape(1, -1)), dataset.x_train[:1].unsqueeze(0))
        if tuple(out.shape[2:-1]) != tuple(dataset.y_train.shape[1:]):
            raise ConfigError("model.name", f"dataset {dataset.name} labels every node of a graph "
                              f"sample: the model must give one logit row per node (model gcn)")
    if getattr(algorithm, "uses_embeddings", False) and not (
            hasattr(model, "stacked_embedding") and hasattr(model, "proxy_input")
            and any(n.rsplit(".", 1)[-1] == "mask" for n in spec.names)):
        raise ConfigError("model.name", f"{cfg.algorithm.name} needs a masked model with a "
                          "functional embedding: gcn with masked: true, or masked_mlp")


def _own_tests(cfg: ExperimentConfig, dataset: Dataset, algorithm: Algorithm) -> list[np.ndarray] | None:
    """The per-client test rows a dataset holds out itself (graph data: a client's test nodes
    in the same subgraph), for synchronous FL; refusals name the field."""
    if cfg.partition.name != "natural":
        raise ConfigError("partition.name", f"dataset {dataset.name} is split into client "
                          "subgraphs: set partition.name: natural")
    if cfg.partition.test_fraction:
        raise ConfigError("partition.test_fraction", f"dataset {dataset.name} holds out each "
                          "client's test nodes itself: set data.params.test_fraction instead")
    return dataset.local_tests if algorithm.pattern == "sync_fl" else None


def _pretrain_and_wrap(cfg: ExperimentConfig, algorithm: Algorithm, dataset: Dataset,
                       model: torch.nn.Module, spec: ParamSpec, public: np.ndarray | None
                       ) -> tuple[torch.nn.Module, ParamSpec]:
    """``model.pretrain`` on the public rows, then (FedIns) the algorithm's model around the
    pre-trained one, which it freezes; returns the model the run trains and its spec."""
    wraps = getattr(algorithm, "wraps_model", False)
    if wraps and cfg.model.pretrain is None:
        raise ConfigError("model.pretrain", f"{cfg.algorithm.name} adapts a pre-trained backbone: "
                          "set model.pretrain and partition.public_fraction")
    if cfg.model.pretrain is None:
        return model, spec
    if public is None:
        raise ConfigError("model.pretrain", "pre-training needs public rows no client holds: set "
                          "partition.public_fraction")
    if cfg.model.init == "independent":
        raise ConfigError("model.init", "model.pretrain trains one initial model: use init: same")
    p = cfg.model.pretrain
    pretrain(model, dataset.x_train[public], dataset.y_train[public], p.steps, p.lr, p.batch_size, cfg.seed)
    if not wraps:
        return model, spec
    with _user_error("model.name"):
        model = algorithm.wrap_model(model, cfg.seed, dataset.x_train[public])
    return model, ParamSpec.from_module(model)


def _local_training(cfg: ExperimentConfig, algorithm: Algorithm, model: torch.nn.Module):
    """The ``local`` section as the trainer's schedule, optimizer and fused kernel (if any)."""
    local = cfg.local
    if algorithm.local_optimizer is not None and local.optimizer != algorithm.local_optimizer:
        raise ConfigError("local.optimizer", f"{cfg.algorithm.name} trains with "
                          f"{algorithm.local_optimizer} inside each round; set local.optimizer: "
                          f"{algorithm.local_optimizer}")
    schedule = _schedule(cfg)
    kernel = getattr(model, "stacked_kernel", None) if cfg.model.forward != "vmap" else None
    optimizer = (AdamW(local.lr, local.beta1, local.beta2, local.eps, local.weight_decay)
                 if local.optimizer == "adamw" else
                 SGD(local.lr, local.momentum, local.weight_decay, _sam_rho(cfg, algorithm)))
    return schedule, optimizer, kernel


def _schedule(cfg: ExperimentConfig) -> LocalSchedule:
    local = cfg.local
    return LocalSchedule(local.batch_size, None if local.steps else int(local.epochs or 1), local.steps, local.shuffle)


def features_in_use(cfg: ExperimentConfig) -> dict[str, bool]:
    """Which of the features that change every client's round a config turns on, by field:
    what a registered population and the sharded simulator check before they refuse."""
    return {
        "partition.test_fraction": cfg.partition.test_fraction > 0,
        "data.dataset": cfg.data.dataset == "sbm",       # graph data: each client's own test nodes
        "adversary": cfg.adversary.attack is not None or bool(cfg.adversary.groups),
        "faults": cfg.faults.configured,
        "compression": cfg.compression.uplink is not None or cfg.compression.downlink is not None,
        "privacy": cfg.privacy.dp is not None or cfg.privacy.secure_aggregation is not None,
        "contribution.methods": bool(cfg.contribution.methods),
        "hierarchy.levels": bool(cfg.hierarchy.levels),
        "partition.public_fraction": cfg.partition.public_fraction > 0,
        "model.pretrain": cfg.model.pretrain is not None,
    }


def _check_registered(cfg: ExperimentConfig, algorithm: Algorithm) -> None:
    """One line for what a lazy population cannot run yet (docs/scale.md)."""
    pattern = algorithm.pattern
    if pattern not in ("sync_fl", "async_fl"):
        raise ConfigError("population.lazy", f"a registered population runs FL algorithms "
                          f"(synchronous or asynchronous); {cfg.algorithm.name} is {pattern}")
    if pattern == "async_fl" and (algorithm.trigger not in ("arrival", "buffer") or algorithm.self_dispatch):
        raise ConfigError("population.lazy", f"asynchronous FL over a registered population runs "
                          f"rules the server triggers on arrivals or full buffers (fedasync, "
                          f"fedbuff, ...); {cfg.algorithm.name} keeps per-client timers or groups")
    if pattern == "sync_fl" and (algorithm.personalized or not algorithm.communicates
                                 or algorithm.split_roles):
        raise ConfigError("population.lazy", f"{cfg.algorithm.name} keeps a model per client or "
                          "assigns roles per client: not with a registered population yet")
    features, comp = features_in_use(cfg), cfg.compression
    if pattern == "async_fl" and comp.uplink is not None and comp.downlink is None:
        # compressed uploads keep nothing per client without feedback (Papaya-style FedBuff
        # with quantized uploads); error feedback would keep a model-sized row for each
        if comp.feedback != "none":
            raise ConfigError("compression.feedback", f"{comp.feedback} keeps a model-sized row per "
                              "client, which a registered population (population.lazy) does not "
                              "hold: feedback none")
        features["compression"] = False
    unsupported = {**features, "model.init": cfg.model.init == "independent",
                   "system.availability.model": cfg.system.availability.model != "always"}
    field = next((k for k, bad in unsupported.items() if bad), None)
    if field is not None:
        raise ConfigError(field, "not supported with population.lazy yet: a registered population "
                          "runs without per-node attacks, faults, availability models, "
                          "compression (but asynchronous uploads without feedback), privacy, "
                          "contribution scores, hierarchies or public pre-training rows")


def _build_registered(cfg: ExperimentConfig, algorithm: Algorithm) -> Experiment:
    """The experiment of a registered population (``population.lazy``): data, sample counts and
    test rows come from a per-client source when clients act; nothing of length N is built."""
    from gossamer.data.datasets import Dataset
    from gossamer.population.clients import PartitionedClients, SyntheticClients
    from gossamer.training.cohort import CohortTrainer

    _check_registered(cfg, algorithm)
    if getattr(algorithm, "wraps_model", False):     # (public rows and pre-training: refused above)
        raise ConfigError("algorithm.name", f"{cfg.algorithm.name} adapts a model pre-trained on "
                          "public rows, which a registered population does not hold")
    n, pop = cfg.partition.num_nodes, cfg.population
    dataset = None
    if cfg.data.dataset == "synthetic":
        if cfg.partition.name != "natural":
            raise ConfigError("partition.name", "a registered Synthetic population is partitioned "
                              "by user: set partition.name: natural")
        params = dict(cfg.data.params)
        users = params.pop("num_nodes", n)
        if users != n:
            raise ConfigError("data.params.num_nodes", f"{users} users but partition.num_nodes is {n}")
        with _user_error("data.params"):
            source = SyntheticClients(n, max_samples=pop.max_samples, **params)
    else:
        if cfg.partition.name not in ("iid", "dirichlet"):
            raise ConfigError("partition.name", "a registered population partitions a dataset on "
                              f"demand with iid or dirichlet, not {cfg.partition.name}")
        with _user_error("data.params"):
            dataset = load_dataset(cfg.data.dataset, **cfg.data.params)
        extra = set(cfg.partition.params) - {"alpha"}
        if extra:
            raise ConfigError("partition.params", f"an on-demand partition takes alpha only, got {sorted(extra)}")
        with _user_error("partition.params"):
            source = PartitionedClients(dataset, n, cfg.partition.name, pop.samples, cfg.seed,
                                        cfg.partition.params.get("alpha"), pop.max_samples)
    with _user_error("model.params"):
        model = build_model(cfg.model.name, source.input_shape, source.num_classes, cfg.seed,
                            **cfg.model.params)
    spec = ParamSpec.from_module(model)
    example = source.example()
    try:
        forward = make_stacked_forward(model, spec, example[0], cfg.model.forward, cfg.model.conv,
                                       compile=cfg.model.compile)
    except ModelNotVectorizable as exc:
        raise ConfigError("model", str(exc)) from None
    schedule, optimizer, kernel = _local_training(cfg, algorithm, model)
    cfg = calibrate(cfg, algorithm, None, schedule, population=n)        # privacy.dp.target_epsilon
    inner = BatchedTrainer(forward, spec, example, torch.zeros(1, dtype=torch.int64),
                           [np.zeros(1, dtype=np.int64)], schedule, optimizer, cfg.seed, kernel)
    inner.dense = cfg.model.dense
    trainer = CohortTrainer(source, inner)
    if dataset is None:                     # Synthetic: the test rows of sampled users
        x_test, y_test = source.test(sample_clients(n, pop.eval_clients, cfg.seed))
    else:
        x_test, y_test = dataset.x_test, dataset.y_test
        if cfg.eval.test_subset is not None and cfg.eval.test_subset < len(y_test):
            keep = np.sort(rng.generator(cfg.seed, rng.STREAM_EVAL, 0).permutation(len(y_test))[: cfg.eval.test_subset])
            x_test, y_test = x_test[keep], y_test[keep]
    evaluator = BatchedEvaluator(forward, spec, x_test, y_test, cfg.eval.batch_size)
    record = Dataset(example, torch.zeros(1, dtype=torch.int64), x_test, y_test, source.num_classes,
                     source.input_shape, cfg.data.dataset)
    exp = Experiment(cfg, algorithm, record, [], model, spec, spec.flatten(model), trainer, evaluator,
                     wire.encoded_size(spec.numel))
    exp.population = source
    exp.adversary = Adversary(None, np.zeros(0, dtype=bool), {}, cfg.seed)   # none (refused above)
    _attach_compression(exp)            # asynchronous uploads without feedback (checked above)
    return exp


def sample_clients(n: int, count: int, seed: int) -> np.ndarray:
    """``min(count, n)`` distinct client ids of ``n``, ascending, drawn once per run (evaluation's
    sample of a registered population), without building anything of length ``n``."""
    if count >= n:
        return np.arange(n, dtype=np.int64)
    g, chosen = rng.generator(seed, rng.STREAM_EVAL, 1), np.zeros(0, dtype=np.int64)
    while len(chosen) < count:
        draw = g.integers(0, n, 2 * (count - len(chosen)))
        chosen = np.unique(np.concatenate([chosen, draw]))
    return np.sort(g.permutation(chosen)[:count])


def _attach_hierarchy(exp: Experiment) -> None:
    """``exp.hierarchy``: the aggregator tree of ``hierarchy.levels`` (synchronous FL whose
    aggregate is the uploads' mean; one line for what it cannot carry)."""
    cfg, algo = exp.cfg, exp.algorithm
    h = cfg.hierarchy
    exp.hierarchy = None
    if not h.levels:
        return
    reasons = {
        "hierarchy.levels": algo.pattern != "sync_fl" or not algo.mean_of_models,
        "algorithm.params": algo.deadline_s is not None or algo.over_selection,
        "privacy": cfg.privacy.secure_aggregation is not None
                   or (cfg.privacy.dp is not None and cfg.privacy.dp.level != "sample"),
        "compression": exp.downlink is not None or cfg.compression.feedback == "fetchsgd",
    }
    field = next((k for k, bad in reasons.items() if bad), None)
    if field is not None:
        raise ConfigError(field, f"hierarchical aggregation sums the clients' models up a tree of "
                          f"aggregators: it runs with synchronous FL algorithms whose aggregate is "
                          f"the uploads' weighted mean, without deadlines, over-selection, secure "
                          f"aggregation, client-level DP, compressed broadcasts or FetchSGD "
                          f"({cfg.algorithm.name} here)")
    links = [Link(x.latency_s, x.bandwidth_Bps) for x in h.links] or \
        [Link(0.005, 1.25e8) for _ in h.levels]
    try:
        exp.hierarchy = build_tree(list(h.levels), links, exp.num_nodes, h.assign, cfg.seed,
                                   [(f.aggregator, f.from_round, f.to_round, f.level) for f in h.failures])
    except ValueError as exc:
        field = "hierarchy.failures" if str(exc).startswith("failures") else "hierarchy.levels"
        raise ConfigError(field, str(exc)) from None


def _attach_contribution(exp: Experiment) -> None:
    """``exp.contribution``: the scorer of ``contribution.methods`` (synchronous FL only),
    scoring coalitions on ``validation`` test rows drawn with ``STREAM_CONTRIB``."""
    cfg = exp.cfg
    c = cfg.contribution
    exp.contribution = None
    if not c.methods:
        return
    if exp.algorithm.pattern != "sync_fl":
        raise ConfigError("contribution.methods", f"contribution scores are computed from a "
                          f"synchronous FL round's uploads; {cfg.algorithm.name} is {exp.algorithm.pattern}")
    privacy = cfg.privacy
    if privacy.secure_aggregation is not None or (privacy.dp is not None and privacy.dp.level != "sample"):
        raise ConfigError("contribution.methods", "contribution scores need each client's upload; "
                          "secure aggregation and client-level DP hide them from the server")
    x, y = exp.dataset.x_test, exp.dataset.y_test
    keep = np.sort(rng.generator(cfg.seed, rng.STREAM_CONTRIB, 0).permutation(len(y))[: c.validation])
    judge = BatchedEvaluator(exp.evaluator.forward, exp.spec, x[keep], y[keep], cfg.eval.batch_size)

    def evaluate(models: torch.Tensor) -> torch.Tensor:
        acc, loss = judge.evaluate(models)
        return -loss if c.utility == "loss" else acc

    exp.contribution = Contribution(c.methods, exp.num_nodes, cfg.seed, evaluate,
                                    c.permutations, c.truncation, c.coalition, evaluator=judge)


# Model-sized [N, P] buffers each simulator pattern keeps for the whole population (the fewest
# it allocates: D-PSGD keeps the models and a mixing output buffer; CHOCO adds the public
# copies x-hat; gradient tracking adds the trackers y and the rows before training).
_POPULATION_COPIES = {"sync_dl": 2, "async_gossip": 1, "choco": 3, "gradient_tracking": 3,
                      "islands": 3}
# A rough size per undirected edge while a graph is built and held (networkx's adjacency dicts
# for the random generators, then the edge array, CSR topology and mixing matrices); measured
# peak: ~770 bytes for random_regular on 50,000 nodes, so this errs low.
_GRAPH_BYTES_PER_EDGE = 500


def population_buffers(cfg: ExperimentConfig, algorithm: Algorithm,
                       population: bool = True) -> list[tuple[str, int]]:
    """The model-sized ``[N, P]`` buffers a simulator run keeps for the whole population, by
    what they hold and how many: what :func:`_check_population_memory` refuses on and
    ``gossamer validate`` prints (``population`` False: a runtime process, which holds one
    node's model, keeps only the independent initial models every process builds)."""
    out = []
    if population and _POPULATION_COPIES.get(algorithm.pattern, 0):
        out.append((f"{algorithm.pattern} models", _POPULATION_COPIES[algorithm.pattern]))
    if cfg.model.init == "independent":
        out.append(("independent initial models", 1))
    if population and algorithm.pattern == "sync_fl":
        comp, state = cfg.compression, int(algorithm.client_state_vectors)
        if state:
            out.append(("client state", state))
        if comp.uplink is not None and comp.feedback not in ("none", "fetchsgd"):
            out.append(("error-feedback residuals", 1))
        if comp.uplink is not None and comp.feedback == "dgc":
            out.append(("DGC momentum", 1))
        if comp.downlink is not None:
            out.append(("downlink compression memory", 1))
    return out


def _check_population_memory(cfg: ExperimentConfig, algorithm: Algorithm, numel: int,
                             device: torch.device | None = None, population: bool = True) -> None:
    """Refuse, before any of it is allocated, a population of models (and a graph) that cannot
    fit the memory available now (MemAvailable + SwapFree): ``num_nodes x numel x 4`` bytes per
    [N, P] buffer the pattern keeps, plus a rough size of the graph. Only buffers that every
    run of the pattern allocates are counted (temporaries of training, evaluation and messages
    are not), so the estimate is below what the run needs. With a GPU ``device`` the buffers
    are measured against its free memory and the graph against the host's."""
    from gossamer import checks

    n = cfg.partition.num_nodes
    copies = sum(count for _, count in population_buffers(cfg, algorithm, population))
    edges = _expected_edges(cfg) if cfg.topology is not None and algorithm.family == "dl" else 0
    models, graph = 4 * n * numel * copies, _GRAPH_BYTES_PER_EDGE * edges
    if not models + graph:
        return
    what = [f"{n:,} nodes x {numel:,} parameters x {copies} model copies ({algorithm.pattern}, "
            f"{checks.gb(models)})"] if models else []
    if graph:
        what.append(f"a {cfg.topology.name} graph of ~{edges:,.0f} edges ({checks.gb(graph)})")
    free = None if device is None else devices.spare_bytes(device)   # a GPU's, None on the CPU
    try:
        if free is not None and models:        # the population on the GPU, the graph on the host
            if models > free:
                raise ValueError(f"{what[0]} needs more than the {checks.gb(free)} free on {device}")
            models = 0
        checks.check_memory(models + graph, " + ".join(what))
    except ValueError as exc:
        raise ConfigError("partition.num_nodes", f"{exc}; use fewer nodes or a smaller model") from None


def _expected_edges(cfg: ExperimentConfig) -> float:
    """Expected undirected edges of the configured topology on ``num_nodes`` nodes (0 when
    unknown: an edge list is as large as its file). Parameters were not validated yet, so
    anything odd counts as 0 and the generator reports it."""
    import math

    n, name, params = cfg.partition.num_nodes, cfg.topology.name, cfg.topology.params

    def num(key: str) -> float:
        value = params.get(key)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return max(float(value), 0.0) if ok else 0.0

    window = max(1, (n - 1).bit_length())
    per_node = {"ring": 1, "grid": 2, "torus": 2, "star": 1, "exponential": window,
                "random_regular": num("degree") / 2, "barabasi_albert": num("m"),
                "watts_strogatz": num("k") / 2, "one_peer_exponential": window,
                "peer_sampling": num("view_size") * window}
    if name == "complete":
        return n * (n - 1) / 2
    if name == "erdos_renyi":
        return min(num("p"), 1.0) * n * (n - 1) / 2
    return per_node.get(name, 0) * n


def _check_local_budget(cfg: ExperimentConfig, shards: list[np.ndarray]) -> None:
    """Refuse more than ``MAX_LOCAL_STEPS`` local steps per node per round (a run that would
    not finish, e.g. ``epochs: 1e6`` on large shards); the schema bounds epochs and steps alone."""
    from gossamer.config import MAX_LOCAL_STEPS

    local = cfg.local
    if local.steps is not None:
        return                                  # bounded by the schema
    largest = max((len(s) for s in shards), default=0)
    batches = -(-largest // local.batch_size)
    steps = int(local.epochs or 1) * batches
    if steps > MAX_LOCAL_STEPS:
        raise ConfigError("local.epochs", f"{int(local.epochs or 1):,} epochs x {batches:,} batches "
                          f"of the largest shard ({largest:,} samples, batch_size {local.batch_size}) "
                          f"= {steps:,} local steps per node per round, over the "
                          f"{MAX_LOCAL_STEPS:.0e} that a round may take")


def _check_secagg_threshold(exp: Experiment) -> None:
    """A threshold above the clients a round can have would abort every round: refuse it."""
    import math

    from gossamer.privacy.secagg import threshold_count

    sa, algorithm = exp.cfg.privacy.secure_aggregation, exp.algorithm
    holders = int((exp.trainer.sizes > 0).sum())
    most = algorithm.expected_clients(holders)
    over = float(algorithm.over_selection or 0)
    if over:
        most = min(holders, math.ceil(most * (1 + over)))
    need = threshold_count(sa.threshold, most)
    if need > most:
        raise ConfigError("privacy.secure_aggregation.threshold",
                          f"{need} clients must survive each round, but a round has at most {most} "
                          f"clients ({holders} hold data); every round would abort: lower it, or give "
                          "a fraction such as 0.5")


def _dp_sgd(cfg: ExperimentConfig) -> PrivateSGD | None:
    dp = cfg.privacy.dp
    return PrivateSGD(dp.clip_norm, dp.noise_multiplier) if dp is not None and dp.level == "sample" else None


def _check_privacy(exp: Experiment) -> None:
    """Refuse what differential privacy cannot run with (docs/privacy.md)."""
    cfg, algorithm, dp = exp.cfg, exp.algorithm, exp.cfg.privacy.dp
    if dp is None:
        return
    if algorithm.split_roles:
        raise ConfigError("privacy.dp", "FedAMD's anchors upload full-shard gradients; DP is not "
                          "supported with fedamd")
    if dp.level == "sample":
        if exp.trainer.optimizer.sam_rho:
            raise ConfigError("privacy.dp", "DP-SGD does not combine with SAM (local.sam_rho)")
        return
    buffered = algorithm.pattern == "async_fl" and algorithm.private_sum    # (an AsyncFL rule)
    if algorithm.pattern != "sync_fl" and not buffered:
        raise ConfigError("privacy.dp.level", f"client-level DP runs with synchronous FL and with fedbuff "
                          f"(noise on each buffer's sum of a fixed number of updates); "
                          f"{cfg.algorithm.name} is {algorithm.pattern}")
    if buffered and dp.mechanism != "gaussian":
        raise ConfigError("privacy.dp.mechanism", "asynchronous FL adds Gaussian noise to each buffer's "
                          "sum; rqm runs with synchronous FL")
    if algorithm.upload_vectors != 1:
        raise ConfigError("privacy.dp.level", f"{cfg.algorithm.name} uploads more than the model "
                          "update (e.g. control variates), which client-level DP does not bound")
    if algorithm.aggregator != "mean":
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
        if (algorithm.download_vectors != 1 or algorithm.uses_global_model
                or algorithm.client_state_vectors or algorithm.split_roles):
            raise ConfigError("compression.downlink", f"{cfg.algorithm.name} sends clients more than "
                              "the model, or uses the global model in local training; broadcast "
                              "compression supports FedAvg and the server optimizers")
        with _user_error("compression.downlink.params"):
            exp.downlink = build_compressor(comp.downlink.name, comp.downlink.params, spec=exp.spec)
    if comp.uplink is None:
        if comp.feedback != "none":
            raise ConfigError("compression.feedback", f"{comp.feedback} needs compression.uplink")
        return
    islands = algorithm.pattern == "islands"          # compresses the fragments' outer gradients
    asynchronous = algorithm.pattern == "async_fl"     # compresses each task's update
    if islands and comp.feedback != "none":
        raise ConfigError("compression.feedback", f"{cfg.algorithm.name} compresses each "
                          "exchange on its own: feedback none only")
    if asynchronous and comp.feedback not in ("none", "ef", "ef21", "dgc"):
        raise ConfigError("compression.feedback", f"asynchronous FL compresses each task's update "
                          f"with feedback none, ef, ef21 or dgc; {comp.feedback} needs synchronous rounds")
    if asynchronous and comp.feedback == "dgc" and comp.warmup_rounds:
        raise ConfigError("compression.warmup_rounds", "asynchronous FL has no rounds for DGC's density "
                          "to warm up over (each task is compressed alone): set it to 0")
    if not (islands or asynchronous or algorithm.pattern == "sync_fl"):
        raise ConfigError("compression.uplink", f"upload compression runs with synchronous and "
                          f"asynchronous FL algorithms; {cfg.algorithm.name} is {algorithm.pattern}")
    if algorithm.split_roles:
        raise ConfigError("compression.uplink", "FedAMD's anchors upload full gradients; "
                          "compression is not supported with fedamd")
    if comp.feedback == "fetchsgd" and not algorithm.mean_of_models:
        raise ConfigError("compression.feedback", f"fetchsgd replaces the weighted mean of the "
                          f"clients' updates, and {cfg.algorithm.name} aggregates more than that "
                          "mean (a robust rule, client momentum or further upload vectors)")
    with _user_error("compression.uplink.params"):
        exp.uplink = build_compressor(comp.uplink.name, comp.uplink.params, spec=exp.spec)
    if islands:
        if exp.uplink.needs_spec:
            raise ConfigError("compression.uplink", f"{comp.uplink.name} works on whole models; "
                              f"{cfg.algorithm.name} exchanges fragments")
        return
    variable = exp.uplink.nominal_bytes(exp.spec.numel) is None
    if variable and asynchronous:
        raise ConfigError("compression.uplink", f"{comp.uplink.name} makes upload sizes depend on "
                          "the update, so an upload's arrival time would be known only after "
                          "training; asynchronous FL schedules it at dispatch: use a fixed-size "
                          "compressor (e.g. topk, randk, qsgd, sign, quantize)")
    if variable and (algorithm.deadline_s is not None or algorithm.over_selection):
        raise ConfigError("compression.uplink", f"{comp.uplink.name} makes upload sizes depend on "
                          "the update, so arrival times are known only after training; it cannot "
                          "be combined with a round deadline or over-selection")


def _sam_rho(cfg: ExperimentConfig, algorithm: Algorithm) -> float:
    """SAM's radius for local training: ``local.sam_rho``, or the one a SAM algorithm
    (``dfedsam``: ``algorithm.params.rho``) sets; both set to different values is an error."""
    from gossamer.algorithms.fl.fedamd import FedAMD

    own = float(algorithm.local_sam_rho)
    rho = cfg.local.sam_rho
    if own and rho and own != rho:
        raise ConfigError("local.sam_rho", f"algorithm {cfg.algorithm.name} sets SAM's radius "
                          f"(params.rho = {own}); set it in one place")
    rho = rho or own
    if rho and isinstance(algorithm, FedAMD):
        raise ConfigError("local.sam_rho", "SAM does not combine with FedAMD's recursive "
                          "direction; set it to 0")
    return rho


def _check_aggregator(exp: Experiment) -> None:
    """A robust rule needs enough models wherever it runs (FL: a round's clients; DL: the
    least connected node's own model and its neighbours')."""
    name = exp.algorithm.aggregator
    if name == "mean":
        return
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
    exp.spectral_gap = spectral_gap(w) if exp.num_nodes > 1 else 1.0     # estimated on huge graphs


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


def build_trackers(specs: list) -> list:
    """The trackers ``output.trackers`` names (each ``{name, params}``), built and checked
    (``metrics/trackers.py``; the simulator's runner and the runtime's coordinator use them)."""
    from gossamer.metrics.trackers import TRACKERS

    out = []
    for i, spec in enumerate(specs):
        try:
            out.append(TRACKERS.get(spec.name)(**spec.params))
        except KeyError as exc:
            raise ConfigError(f"output.trackers.{i}.name", str(exc).strip("'\"")) from None
        except TypeError as exc:
            raise ConfigError(f"output.trackers.{i}.params", str(exc)) from None
        except ValueError as exc:
            raise ConfigError(f"output.trackers.{i}", str(exc)) from None
    return out
