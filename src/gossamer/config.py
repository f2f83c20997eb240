"""The experiment schema: one YAML file fully describes a run.

Validation happens in two stages, both reported as one line ``field: what is wrong``:
the schema (types, unknown fields, names of registered parts) when the file is loaded,
and semantic checks that need the data or the graph (more nodes than samples, a
disconnected topology for D-PSGD) when the experiment is built.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# The most local SGD steps one node may take per round (local.epochs x batches of its shard,
# or local.steps): 10^7 steps take minutes per round even for a tiny model, so more is a typo
# (``epochs: 1e12``) that would run for ever rather than an experiment.
MAX_LOCAL_STEPS = 10**7


class ConfigError(ValueError):
    """A user error in the experiment config; ``str()`` is one line naming the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field


class _Strict(BaseModel):
    # No field takes inf or NaN: every number in a config is a finite quantity (an infinite
    # learning rate or latency runs to the end with a NaN model or Infinity in summary.json).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class DataConfig(_Strict):
    dataset: str = "mnist5k"
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("dataset")
    @classmethod
    def _known(cls, v: str) -> str:
        from gossamer.data import DATASETS
        return _check_name(DATASETS, v)


class PartitionConfig(_Strict):
    """``test_fraction`` > 0 holds out that share of every node's rows as its own test split:
    FL runs then also report each client's accuracy there (docs/personalization.md).
    ``public_fraction`` > 0 takes that share of the training rows out before partitioning, as a
    public set no client holds (``model.pretrain`` trains on it; docs/personalization.md)."""

    name: str = "iid"
    num_nodes: int = Field(10, ge=1)
    params: dict[str, Any] = Field(default_factory=dict)
    test_fraction: float = Field(0.0, ge=0, lt=1)
    public_fraction: float = Field(0.0, ge=0, lt=1)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        from gossamer.data import PARTITIONERS
        return _check_name(PARTITIONERS, v)


class PretrainConfig(_Strict):
    """Central pre-training of the model on the public rows (``partition.public_fraction``)
    before round 1: ``steps`` of plain SGD at ``lr`` on mini-batches of ``batch_size``."""

    steps: int = Field(ge=1)
    lr: float = Field(gt=0)
    batch_size: int = Field(32, ge=1)


class ModelConfig(_Strict):
    """``pretrain`` (optional): the initial model is first trained centrally on the public rows
    (FedIns's frozen backbone; any FL algorithm may start from it)."""

    name: str = "mlp"
    params: dict[str, Any] = Field(default_factory=dict)
    init: Literal["same", "independent"] = "same"
    forward: Literal["auto", "vmap", "stacked", "layerwise"] = "auto"
    conv: Literal["auto", "grouped", "channels_last", "per_node"] = "auto"
    dense: Literal["auto", "stacked", "low_rank"] = "auto"
    compile: bool = False
    pretrain: PretrainConfig | None = None

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        from gossamer.models import MODELS
        return _check_name(MODELS, v)


class AlgorithmConfig(_Strict):
    name: str = "fedavg"
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        from gossamer.algorithms import ALGORITHMS
        return _check_name(ALGORITHMS, v)


class LocalConfig(_Strict):
    """Local training of every node: ``epochs`` over its data, or a fixed number of ``steps``.

    ``sam_rho`` > 0 makes every local step sharpness-aware (SAM, as in DFedSAM): the gradient
    is taken at ``w + sam_rho * g / ||g||`` (``g``: the mini-batch gradient at ``w``, one norm
    per node), for every algorithm; 0 is plain SGD. See docs/dpsgd_variants.md.

    ``optimizer: adamw`` trains with AdamW (``lr``, ``beta1``, ``beta2``, ``eps`` and
    ``weight_decay`` as decoupled decay) instead of SGD; its state is fresh per activation
    unless the algorithm keeps it per node (``diloco``).
    """

    optimizer: Literal["sgd", "adamw"] = "sgd"
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.999, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    epochs: float | None = Field(1, gt=0)
    steps: int | None = Field(None, ge=1)
    batch_size: int = Field(10, ge=1)
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    shuffle: bool = True
    sam_rho: float = Field(0.0, ge=0, allow_inf_nan=False)

    @field_validator("epochs", "steps")
    @classmethod
    def _bounded(cls, v: float | int | None, info) -> float | int | None:
        # every epoch is at least one step, so this holds whatever the shards; the build
        # checks epochs x batches of the largest shard (gossamer/experiment.py)
        if v is not None and v > MAX_LOCAL_STEPS:
            raise ValueError(f"{v:g} {info.field_name} means over {MAX_LOCAL_STEPS:.0e} local steps "
                             "per node per round, which would not finish")
        return v

    @model_validator(mode="after")
    def _one_budget(self) -> LocalConfig:
        if self.steps is not None and self.epochs not in (None, 1):
            raise ValueError("set either epochs or steps, not both")
        if self.epochs is not None and self.steps is None and float(self.epochs) != int(self.epochs):
            raise ValueError("epochs must be a whole number (use steps for partial epochs)")
        if self.optimizer == "adamw" and self.momentum:
            raise ValueError("momentum: adamw has no heavy-ball momentum (its first moment is beta1)")
        if self.optimizer == "adamw" and self.sam_rho:
            raise ValueError("sam_rho: SAM is implemented for sgd only, not adamw")
        return self


class TopologyConfig(_Strict):
    """A static generator, ``resample: every_round`` to re-draw a random one every round, or a
    dynamic topology (``one_peer_exponential``, ``peer_sampling``); see docs/topologies.md."""

    name: str = "random_regular"
    params: dict[str, Any] = Field(default_factory=dict)
    mixing: str = "metropolis_hastings"
    resample: Literal["never", "every_round"] = "never"

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        from gossamer.topology import DYNAMIC_TOPOLOGIES, TOPOLOGIES
        if v in DYNAMIC_TOPOLOGIES:
            return v
        if v not in TOPOLOGIES:
            known = ", ".join(sorted([*TOPOLOGIES.names(), *DYNAMIC_TOPOLOGIES.names()]))
            raise ValueError(f"unknown topology {v!r}; known: {known}")
        return v

    @field_validator("resample")
    @classmethod
    def _resample_random(cls, v: str, info) -> str:
        from gossamer.topology import DYNAMIC_TOPOLOGIES, RANDOM_TOPOLOGIES
        name = info.data.get("name")
        if v == "every_round" and name in DYNAMIC_TOPOLOGIES:
            raise ValueError(f"{name} changes every round by itself; leave resample at never")
        if v == "every_round" and name is not None and name not in RANDOM_TOPOLOGIES:
            raise ValueError(f"every_round re-draws a random graph, but {name} does not depend on "
                             f"the seed; random ones: {', '.join(sorted(RANDOM_TOPOLOGIES))}")
        return v

    @field_validator("mixing")
    @classmethod
    def _known_mixing(cls, v: str) -> str:
        from gossamer.topology import MIXING
        return _check_name(MIXING, v)


class Distribution(_Strict):
    """A per-node quantity: a constant, a distribution, or explicit per-node ``values``.

    ``lognormal`` is parameterized by its median and sigma (of the log); ``tiers`` draws
    one of ``values`` with probabilities ``probs``; ``values`` alone lists one per node.
    """

    dist: Literal["constant", "uniform", "lognormal", "exponential", "tiers", "per_node"] = "constant"
    value: float | None = Field(None, ge=0)
    low: float | None = Field(None, ge=0)
    high: float | None = Field(None, ge=0)
    median: float | None = Field(None, gt=0)
    sigma: float | None = Field(None, ge=0)
    mean: float | None = Field(None, gt=0)
    values: list[float] | None = None
    probs: list[float] | None = None

    @model_validator(mode="after")
    def _complete(self) -> Distribution:
        need = {"constant": ["value"], "uniform": ["low", "high"], "lognormal": ["median", "sigma"],
                "exponential": ["mean"], "tiers": ["values"], "per_node": ["values"]}.get(self.dist, [])
        missing = [n for n in need if getattr(self, n) is None]
        if missing:
            raise ValueError(f"dist {self.dist} needs {', '.join(missing)}")
        if self.dist == "uniform" and self.low > self.high:  # type: ignore[operator]
            raise ValueError("uniform needs low <= high")
        if self.values is not None and any(v < 0 for v in self.values):
            raise ValueError("values must be >= 0")
        if self.dist == "tiers" and self.probs is not None:
            if len(self.probs) != len(self.values or []) or abs(sum(self.probs) - 1) > 1e-6:
                raise ValueError("tiers needs probs of the same length as values, summing to 1")
        return self


class NodeDistribution(Distribution):
    """A device or link quantity of ``system``: any :class:`Distribution`, or ``dist: trace``.

    A trace is a CSV file (``path``, relative to the working directory) with one row
    ``node,value`` per node 0..N-1; an optional ``node,value`` header, blank lines and ``#``
    comments are skipped. It is read when the experiment is built, where N is known.
    """

    dist: Literal["constant", "uniform", "lognormal", "exponential", "tiers", "per_node",
                  "trace"] = "constant"
    path: str | None = None

    @model_validator(mode="after")
    def _trace_path(self) -> NodeDistribution:
        if self.dist == "trace" and not self.path:
            raise ValueError("dist trace needs path (a CSV file of node,value rows)")
        if self.dist != "trace" and self.path is not None:
            raise ValueError(f"path is only used by dist trace, not {self.dist}")
        return self


def _const(value: float) -> NodeDistribution:
    return NodeDistribution(dist="constant", value=value)


class AvailabilityConfig(_Strict):
    """Which nodes are online when: ``always``, ``markov``, ``diurnal`` or ``trace``.

    ``markov``: on/off sessions with exponential durations (``mean_on_s``, ``mean_off_s``).
    ``diurnal``: a day of ``period_s`` in ``slots`` equal slots; a node is online in a slot
    with probability ``low + (high - low) * (1 + cos(2 pi (tau - peak_s) / period_s)) / 2`` at
    the slot's local midpoint ``tau``; each node's time-zone offset is uniform in
    ``[0, phase_spread_s)`` (null: a whole period). ``trace``: a CSV file ``path`` of
    ``node,start_s,end_s`` online intervals; nodes without rows are ``unlisted``.
    See docs/heterogeneity.md.
    """

    model: Literal["always", "markov", "diurnal", "trace"] = "always"
    mean_on_s: float = Field(600.0, gt=0)
    mean_off_s: float = Field(60.0, gt=0)
    initial_on_fraction: float | None = Field(None, ge=0, le=1)
    period_s: float = Field(86400.0, gt=0, allow_inf_nan=False)
    slots: int = Field(24, ge=1)
    low: float = Field(0.2, ge=0, le=1)
    high: float = Field(0.9, ge=0, le=1)
    peak_s: float = Field(72000.0, allow_inf_nan=False)
    phase_spread_s: float | None = Field(None, ge=0, allow_inf_nan=False)
    path: str | None = None
    unlisted: Literal["offline", "online"] = "offline"

    @model_validator(mode="after")
    def _consistent(self) -> AvailabilityConfig:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must be <= high ({self.high})")
        if self.model == "trace" and not self.path:
            raise ValueError("model trace needs path (a CSV file of node,start_s,end_s rows)")
        if self.model != "trace" and self.path is not None:
            raise ValueError(f"path is only used by model trace, not {self.model}")
        return self


class SystemConfig(_Strict):
    """Simulated device and network: seconds per training sample, latency, bandwidth (bytes/s).

    ``latency_up_s`` / ``latency_down_s`` (null: ``latency_s``) set the uplink and downlink
    latencies separately.
    """

    sample_time_s: NodeDistribution = Field(default_factory=lambda: _const(0.001))
    latency_s: NodeDistribution = Field(default_factory=lambda: _const(0.05))
    latency_up_s: NodeDistribution | None = None
    latency_down_s: NodeDistribution | None = None
    bandwidth_up_Bps: NodeDistribution = Field(default_factory=lambda: _const(1.25e6))
    bandwidth_down_Bps: NodeDistribution = Field(default_factory=lambda: _const(1.25e7))
    server_bandwidth_Bps: float | None = Field(None, gt=0)
    availability: AvailabilityConfig = Field(default_factory=AvailabilityConfig)


class StopConfig(_Strict):
    """When a run ends. ``target_accuracy`` is also recorded in ``summary.json``
    (``time_to_target_s``); with ``stop_at_target: false`` the run goes on past it."""

    rounds: int = Field(20, ge=1)
    target_accuracy: float | None = Field(None, gt=0, le=1)
    stop_at_target: bool = True
    max_sim_time_s: float | None = Field(None, gt=0)


class EvalConfig(_Strict):
    """Evaluation cadence and cost controls (DL evaluation of every node dominates at scale)."""

    every: int = Field(1, ge=1)
    nodes: int | None = Field(None, ge=1)
    test_subset: int | None = Field(None, ge=1)
    batch_size: int = Field(1000, ge=1)
    average_model: bool = True
    targets: list[float] = Field(default_factory=list)
    personal_finetune_steps: int = Field(0, ge=0)   # FL with test_fraction: fine-tune first

    @field_validator("targets")
    @classmethod
    def _targets(cls, v: list[float]) -> list[float]:
        if any(not 0 < x <= 1 for x in v):
            raise ValueError("every target accuracy must be in (0, 1]")
        return sorted(set(v))


class TrackerConfig(_Strict):
    """An experiment tracker (``gossamer/metrics/trackers.py``): tensorboard, mlflow, wandb."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        from gossamer.metrics.trackers import TRACKERS
        return _check_name(TRACKERS, v)


class OutputConfig(_Strict):
    dir: str = "runs"
    checkpoint_every: int = Field(5, ge=0)
    progress: bool = True
    trackers: list[TrackerConfig] = Field(default_factory=list)


class SecuritySection(_Strict):
    """Transport security of the runtime: TLS (optionally mutual) and tokens.

    ``token``/``token_file``: one bearer token shared by every node (membership only: the
    node ids it claims are not bound). ``node_tokens_dir``: a folder from ``gossamer tokens``;
    the server reads ``node-secret`` there, client ``i`` reads ``node-<i>.token``, and each
    token is valid for its own node id only. Client certificates whose common name is
    ``node-<i>`` bind node ``i`` the same way (docs/runtime.md, threat model). A token
    without TLS needs ``allow_insecure: true``."""

    tls: bool = False
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    require_client_cert: bool = False
    token: str | None = None
    token_file: str | None = None
    node_tokens_dir: str | None = None
    allow_insecure: bool = False

    @model_validator(mode="after")
    def _complete(self) -> SecuritySection:
        if self.tls and (self.cert is None or self.key is None):
            raise ValueError("tls needs cert and key")
        if self.require_client_cert and not self.tls:
            raise ValueError("require_client_cert needs tls")
        if self.token is not None and self.token_file is not None:
            raise ValueError("set token or token_file, not both")
        if self.node_tokens_dir is not None and (self.token is not None or self.token_file is not None):
            raise ValueError("node_tokens_dir replaces the shared token; set one of them")
        tokens = self.token is not None or self.token_file is not None or self.node_tokens_dir is not None
        if tokens and not self.tls and not self.allow_insecure:
            raise ValueError("a token without tls travels in clear text; set tls: true, or "
                             "allow_insecure: true on a trusted network")
        return self


class RuntimeConfig(_Strict):
    """Real deployment (``gossamer server | client | launch``): addresses, timeouts, limits.

    ``min_clients``: joined clients to wait for before the first round (default all).
    ``min_participants``: the fewest accepted uploads a round (or, in asynchronous FL, the
    run) may proceed with; a round short of it is redone, and after ``quorum_timeout_s``
    without enough uploads the run fails (exit code 3). ``upload_timeout_s`` bounds every
    upload and task stream; ``max_inflight_per_client`` bounds a client's concurrent calls;
    ``max_client_samples`` bounds the sample count a client may claim (the server also
    refuses counts above the shard it knows); after ``max_rejections`` rejected messages a
    client is refused for the rest of the run."""

    server: str = "127.0.0.1:50051"
    run_id: str = "gossamer"
    min_clients: int | None = Field(None, ge=1)
    join_timeout_s: float = Field(60.0, gt=0)
    round_timeout_s: float = Field(120.0, gt=0)
    poll_interval_s: float = Field(0.2, gt=0)
    max_message_bytes: int = Field(256 << 20, ge=1024)
    chunk_bytes: int = Field(1 << 20, ge=1024)
    retry_max_s: float = Field(5.0, gt=0)
    threads_per_process: int | None = Field(None, ge=1)
    min_participants: int = Field(1, ge=1)
    quorum_timeout_s: float = Field(300.0, gt=0)
    upload_timeout_s: float = Field(60.0, gt=0)
    max_inflight_per_client: int = Field(2, ge=1)
    max_client_samples: int | None = Field(None, ge=1)
    max_rejections: int = Field(3, ge=1)
    security: SecuritySection = Field(default_factory=SecuritySection)


class CrashConfig(_Strict):
    """Permanent crashes: a ``fraction`` of nodes (drawn at random) dies, each at a time from ``at_s``."""

    fraction: float = Field(ge=0, le=1)
    at_s: Distribution


class ChurnConfig(_Strict):
    """Leave and rejoin: sessions drawn from ``on_s``/``off_s`` for a ``fraction`` of nodes, or a trace.

    The trace is a CSV file with header ``node,leave_s,rejoin_s``, one offline interval per
    row (``rejoin_s`` empty: the node never returns); nodes not in it stay online.
    """

    fraction: float = Field(1.0, ge=0, le=1)
    on_s: Distribution | None = None
    off_s: Distribution | None = None
    start_online: bool = True
    trace: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> ChurnConfig:
        if self.trace is not None:
            extra = sorted(self.model_fields_set - {"trace"})
            if extra:
                raise ValueError(f"a trace replaces {', '.join(extra)}; set trace alone")
            return self
        if self.on_s is None or self.off_s is None:
            raise ValueError("set trace, or on_s and off_s")
        for name in ("on_s", "off_s"):
            spec: Distribution = getattr(self, name)
            values = spec.values or []
            if (spec.dist == "constant" and not spec.value) or (spec.dist == "uniform" and not spec.high) \
                    or (spec.dist in ("tiers", "per_node") and min(values, default=0) <= 0):
                raise ValueError(f"{name} durations must be > 0")
        return self


class FaultEventConfig(_Strict):
    """A scheduled removal or restoration of nodes at ``at_s`` (disasters, recoveries).

    ``remove`` takes ``fraction`` (of the eligible nodes: alive and matching ``select``),
    ``count`` or explicit ``nodes``; ``restore`` brings back removed nodes: all of them when
    none of the three is set, else a fraction, count or list of them.
    """

    at_s: float = Field(ge=0)
    action: Literal["remove", "restore"]
    fraction: float | None = Field(None, ge=0, le=1)
    count: int | None = Field(None, ge=0)
    nodes: list[int] | None = None
    select: Literal["random", "highest_degree", "data_holders", "relay_only"] = "random"

    @model_validator(mode="after")
    def _one_target(self) -> FaultEventConfig:
        given = sum(v is not None for v in (self.fraction, self.count, self.nodes))
        if given > 1 or (given == 0 and self.action == "remove"):
            raise ValueError("set exactly one of fraction, count, nodes")
        return self


class PartitionFaultConfig(_Strict):
    """A network split at ``at_s`` until ``heal_s`` (None: never heals).

    Nodes are split into ``groups`` near-equal random groups, by ``fractions``, or into the
    explicit ``nodes`` lists; in FL only group 0 reaches the server.
    """

    at_s: float = Field(ge=0)
    heal_s: float | None = None
    groups: int | None = Field(None, ge=1)
    fractions: list[float] | None = None
    nodes: list[list[int]] | None = None

    @model_validator(mode="after")
    def _complete(self) -> PartitionFaultConfig:
        if sum(v is not None for v in (self.groups, self.fractions, self.nodes)) != 1:
            raise ValueError("set exactly one of groups, fractions, nodes")
        if self.heal_s is not None and not self.heal_s > self.at_s:
            raise ValueError(f"heal_s ({self.heal_s}) must be after at_s ({self.at_s})")
        if self.fractions is not None and (any(not 0 <= f <= 1 for f in self.fractions)
                                           or abs(sum(self.fractions) - 1) > 1e-6):
            raise ValueError("fractions must lie in [0, 1] and sum to 1")
        return self


class MessageLossConfig(_Strict):
    prob: float = Field(ge=0, le=1)


class DelaySpikeConfig(_Strict):
    prob: float = Field(ge=0, le=1)
    delay_s: float = Field(ge=0)


class StragglerConfig(_Strict):
    """A ``fraction`` of nodes computes ``factor`` times slower: the same nodes, or re-drawn per round."""

    fraction: float = Field(ge=0, le=1)
    factor: float = Field(ge=1)
    mode: Literal["fixed", "per_round"] = "fixed"


class FaultsConfig(_Strict):
    """Fault models (all optional); ``rejoin`` says whether a returning node keeps its state."""

    crash: CrashConfig | None = None
    churn: ChurnConfig | None = None
    events: list[FaultEventConfig] = Field(default_factory=list)
    partitions: list[PartitionFaultConfig] = Field(default_factory=list)
    message_loss: MessageLossConfig | None = None
    delay_spikes: DelaySpikeConfig | None = None
    stragglers: StragglerConfig | None = None
    rejoin: Literal["resume", "fresh"] = "resume"

    @property
    def configured(self) -> bool:
        """Whether any fault model is set (``rejoin`` alone is not one)."""
        return any(getattr(self, k) is not None for k in
                   ("crash", "churn", "message_loss", "delay_spikes", "stragglers")) \
            or bool(self.events) or bool(self.partitions)


class AdversaryGroupConfig(_Strict):
    """A further group of attackers (``adversary.groups``): its attack, who, its params."""

    attack: str
    fraction: float = Field(0.0, ge=0, le=1)
    nodes: list[int] | None = None
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("attack")
    @classmethod
    def _known(cls, v: str) -> str:
        from gossamer.attacks import ATTACKS
        return _check_name(ATTACKS, v)

    @model_validator(mode="after")
    def _who(self) -> AdversaryGroupConfig:
        if (self.nodes is None) == (self.fraction == 0):
            raise ValueError("a group needs fraction > 0 or nodes (not both)")
        return self


class AdversaryConfig(_Strict):
    """Byzantine nodes: which (a random ``fraction`` or explicit ``nodes``) and the ``attack``
    they mount (a name from ``gossamer list``), configured by ``params``; ``groups`` adds
    further, disjoint groups with attacks of their own (synchronous FL; at most one model
    attack in all, any number of data attacks)."""

    attack: str | None = None
    fraction: float = Field(0.0, ge=0, le=1)
    nodes: list[int] | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    groups: list[AdversaryGroupConfig] = Field(default_factory=list)

    @field_validator("attack")
    @classmethod
    def _known(cls, v: str | None) -> str | None:
        from gossamer.attacks import ATTACKS
        return v if v is None else _check_name(ATTACKS, v)

    @model_validator(mode="after")
    def _who(self) -> AdversaryConfig:
        if self.nodes is not None and self.fraction:
            raise ValueError("set fraction or nodes, not both")
        if self.attack is not None and self.nodes is None and self.fraction == 0:
            raise ValueError("an attack needs attackers: set fraction > 0 or nodes")
        return self


class CompressorConfig(_Strict):
    """A registered compressor (``gossamer list``; docs/compression.md) and its params."""

    name: str = "none"
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        from gossamer.compression import COMPRESSORS
        return _check_name(COMPRESSORS, v)


class CompressionConfig(_Strict):
    """What clients upload, compressed: ``uplink`` compresses each client's model update (its
    trained model minus the model it started from) and ``feedback`` keeps what compression
    dropped: ``ef`` (error feedback: the residual is added to the next update), ``ef21``
    (client and server track an estimate of the update and send compressed differences) or
    ``dgc`` (Deep Gradient Compression applied to each round's update: momentum correction,
    optional clipping, momentum factor masking, density warm-up) or ``fetchsgd`` (FetchSGD:
    clients upload count sketches, the server keeps momentum and error as sketches).
    Synchronous FL in the simulator; see docs/compression.md."""

    uplink: CompressorConfig | None = None
    feedback: Literal["none", "ef", "ef21", "dgc", "fetchsgd"] = "none"
    # the server's broadcast: each client keeps an estimate of the global model and receives
    # the compressed difference (EF21-P style); clients train from their estimate
    downlink: CompressorConfig | None = None
    # feedback: dgc (Deep Gradient Compression on each round's update; uplink must be topk),
    # fetchsgd (FetchSGD's server momentum and error in sketch space; uplink countsketch with k):
    momentum: float = Field(0.9, ge=0, lt=1)          # momentum correction factor (both)
    clip_norm: float | None = Field(None, gt=0)       # local clipping of each update's norm
    warmup_rounds: int = Field(0, ge=0)               # density falls from 25% to the target
    reset: Literal["zero_buckets", "subtract"] = "zero_buckets"   # fetchsgd: how S_u, S_e forget

    @model_validator(mode="after")
    def _dgc_needs_topk(self) -> CompressionConfig:
        if self.feedback == "dgc" and (self.uplink is None or self.uplink.name != "topk"
                                       or "density" not in self.uplink.params):
            raise ValueError("feedback dgc sparsifies with top-k: set compression.uplink to "
                             "{name: topk, params: {density: ...}}")
        if self.feedback == "fetchsgd" and (self.uplink is None or self.uplink.name != "countsketch"
                                            or not {"k", "density"} & set(self.uplink.params)):
            raise ValueError("feedback fetchsgd needs the countsketch uplink compressor with its "
                             "heavy hitters: {name: countsketch, params: {ratio: ..., k: ...}}")
        return self


class DPConfig(_Strict):
    """Differential privacy (docs/privacy.md). ``level: client`` is DP-FedAvg (McMahan et al.
    2018, arXiv:1710.06963): each client's update is clipped to ``clip_norm`` and Gaussian noise
    of std ``noise_multiplier * clip_norm`` is added to their sum, by the server (``noise:
    server``) or in shares by the clients (``noise: clients``). ``level: sample`` is DP-SGD in
    local training (Abadi et al. 2016, arXiv:1607.00133). Epsilon at ``delta`` comes from
    opacus' ``accountant``. ``mechanism: rqm`` (client level) replaces clipping and noise by
    the Randomized Quantization Mechanism (Youn et al. 2023, arXiv:2306.11913) on every update
    coordinate: ``clip_norm`` is then the per-coordinate bound ``c``, with ``levels``, ``q`` and
    ``extension`` (the paper's Delta); its epsilon is exact RDP composed over coordinates and
    rounds. ``target_epsilon`` (Gaussian) instead of ``noise_multiplier``: the smallest noise
    whose planned epsilon after ``stop.rounds`` is at most the target
    (:func:`gossamer.privacy.plan.calibrate`; the built experiment's config holds both)."""

    level: Literal["client", "sample"]
    clip_norm: float = Field(gt=0)
    noise_multiplier: float | None = Field(None, ge=0)
    target_epsilon: float | None = Field(None, gt=0)
    noise: Literal["server", "clients"] = "server"
    delta: float = Field(1e-5, gt=0, lt=1)
    accountant: Literal["rdp", "prv"] = "rdp"
    mechanism: Literal["gaussian", "rqm"] = "gaussian"
    levels: int = Field(2, ge=2, le=65536)            # rqm: quantization levels m
    q: float = Field(0.5, gt=0, le=1)                 # rqm: keep probability of interior levels
    extension: float = Field(1.0, gt=0)               # rqm: the paper's Delta (range beyond c)

    @model_validator(mode="after")
    def _noise_is_client_level(self) -> DPConfig:
        if self.level == "sample" and self.noise != "server":
            raise ValueError("noise: clients is for level client (DP-SGD noise is local)")
        if self.mechanism == "gaussian" and (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("mechanism gaussian takes noise_multiplier or target_epsilon (one of them)")
        if self.mechanism != "gaussian" and self.target_epsilon is not None:
            raise ValueError(f"target_epsilon plans Gaussian noise; {self.mechanism}'s epsilon follows "
                             "from its own parameters")
        if self.mechanism == "rqm" and self.level != "client":
            raise ValueError("mechanism rqm is client level (each client quantizes its update)")
        return self


class SecureAggregationConfig(_Strict):
    """Secure aggregation of FL uploads (Bonawitz et al. 2017; docs/privacy.md): the server gets
    only the sum of the clients' masked fixed-point updates. ``threshold``: how many clients
    must survive, as a fraction of the round's clients (``0.5``: ``max(2, ceil(0.5 n))``) or a
    count (``10``); ``bits``: the ring ``Z_{2^bits}``; ``clip``: each update coordinate is
    clipped to ``[-clip, clip]`` before encoding."""

    threshold: int | float = 0.5
    bits: int = Field(32, ge=8, le=62)
    clip: float = Field(1.0, gt=0)

    @field_validator("threshold")
    @classmethod
    def _threshold(cls, v: int | float) -> int | float:
        if isinstance(v, int) and v < 2:
            raise ValueError("a count threshold must be >= 2 (a sum of one client is that client)")
        if isinstance(v, float) and not 0 < v <= 1:
            raise ValueError("a fractional threshold must lie in (0, 1]; give counts as integers")
        return v


class PrivacyConfig(_Strict):
    """Privacy of what clients reveal: differential privacy and secure aggregation."""

    dp: DPConfig | None = None
    secure_aggregation: SecureAggregationConfig | None = None


class HierarchyLinkConfig(_Strict):
    """One level's aggregator link (each direction): latency and bandwidth."""

    latency_s: float = Field(0.005, ge=0)
    bandwidth_Bps: float = Field(1.25e8, gt=0)


class HierarchyFailureConfig(_Strict):
    """Aggregator ``aggregator`` of ``level`` (numbered within its level; 0 is the top level,
    the default the leaves) down from round ``from_round`` to ``to_round`` (both included)."""

    aggregator: int = Field(ge=0)
    from_round: int = Field(ge=1)
    to_round: int = Field(ge=1)
    level: int | None = Field(None, ge=0)


class HierarchyConfig(_Strict):
    """Aggregators between the clients and the server (synchronous FL; docs/hierarchy.md):
    ``levels`` aggregators per level from the top (empty: flat), clients assigned to the
    leaves in ``contiguous`` id ranges or ``random``ly, one ``links`` entry per level (default
    links when empty), aggregators down for some rounds (``failures``), whose clients are cut
    off or, with ``rehome``, reach the next leaf that is up (a down leaf) or reach the server
    through their leaf directly (a down aggregator above the leaves); ``clients_per_instance``
    scales each leaf with the round's load (LIFL), one instance per that many clients."""

    levels: list[int] = Field(default_factory=list)
    assign: Literal["contiguous", "random"] = "contiguous"
    links: list[HierarchyLinkConfig] = Field(default_factory=list)
    failures: list[HierarchyFailureConfig] = Field(default_factory=list)
    rehome: bool = False          # clients and aggregators re-home as real processes do
    # LIFL's scaling with load: a leaf serving more of a round's clients runs more instances
    clients_per_instance: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _shape(self) -> HierarchyConfig:
        if any(n < 1 for n in self.levels):
            raise ValueError("levels: every level needs at least one aggregator")
        if self.links and len(self.links) != len(self.levels):
            raise ValueError(f"links: one per level ({len(self.levels)}), got {len(self.links)}")
        return self


class PopulationConfig(_Strict):
    """Registered populations that cost nothing until they act (docs/scale.md).

    ``lazy``: per-client data, device and link profiles are drawn from counters when a client
    is selected, never stored as arrays of length N; client state lives in a store that holds
    only clients that have participated (``state_budget_mb`` in memory, the rest spilled to
    disk under ``spill_dir``, by default the system's temporary folder). The data: ``data.dataset:
    synthetic`` with ``partition.name: natural`` generates each user of Synthetic(alpha, beta)
    from its id; any other dataset is partitioned on demand (``partition.name`` ``iid`` or
    ``dirichlet`` with ``partition.params.alpha``), each client drawing ``samples`` rows.
    ``max_samples`` caps a client's rows (Synthetic's log-normal sizes have a long tail).
    Evaluation runs on the pooled test rows of ``eval_clients`` clients drawn once
    (Synthetic; other datasets use their test split)."""

    lazy: bool = False
    samples: Distribution = Field(default_factory=lambda: Distribution(dist="constant", value=20))
    max_samples: int | None = Field(None, ge=1)
    eval_clients: int = Field(1000, ge=1)
    state_budget_mb: float = Field(1024.0, gt=0, allow_inf_nan=False)
    spill_dir: str | None = None

    @model_validator(mode="after")
    def _samples(self) -> PopulationConfig:
        if self.samples.dist == "per_node":
            raise ValueError("samples: per_node lists one value per client; a registered "
                             "population draws them (constant, uniform, lognormal, exponential, tiers)")
        return self


class ShardingConfig(_Strict):
    """The simulator sharded over ranks (``gossamer run --ranks K``, torchrun; docs/scale.md).

    ``block``: node ids per reduction block. Whatever crosses ranks is summed block by block,
    the block sums then along a binary tree fixed by block id, and ranks own whole blocks, so a
    run's bits depend on ``block`` and never on the number of ranks. Smaller blocks balance few
    nodes over many ranks (10 cross-silo clients on 4 ranks need ``block`` 2 or 1); larger ones
    add fewer rows per round (a synchronous FL round adds one row of P values per block holding
    a selected client; across machines a rank sends at most one a level of the tree)."""

    block: int = Field(64, ge=1, le=1 << 20)


class ContributionConfig(_Strict):
    """Contribution scores of clients in synchronous FL (docs/contribution.md): ``methods``
    among ``loo``, ``cosine``, ``shapley``; ``permutations`` and ``truncation`` of the Monte
    Carlo Shapley estimate; the coalitions' ``utility`` (minus the loss, or the accuracy) on
    ``validation`` rows drawn from the test split; a ``coalition``'s model (``partial``: the
    round's aggregate with only its updates, ``mean``: its models' weighted mean); scored
    every ``every`` rounds."""

    methods: list[Literal["loo", "cosine", "shapley"]] = Field(default_factory=list)
    permutations: int = Field(10, ge=1, le=10_000)
    truncation: float = Field(0.0, ge=0, lt=1)
    validation: int = Field(500, ge=1)
    utility: Literal["loss", "accuracy"] = "loss"
    coalition: Literal["partial", "mean"] = "partial"
    every: int = Field(1, ge=1)

    @field_validator("methods")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("each method at most once")
        return v


class ExperimentConfig(_Strict):
    name: str = "experiment"
    seed: int = Field(0, ge=0, lt=2**32)
    # where the simulator computes (docs/devices.md): ``auto`` is ``cuda`` when torch sees a
    # GPU, else ``cpu``; ``precision``: ``tf32`` lets CUDA matmuls and convolutions use
    # TensorFloat-32, ``bf16`` trains and evaluates under bfloat16 autocast (fp32 weights)
    device: str = "cpu"
    precision: Literal["fp32", "tf32", "bf16"] = "fp32"
    data: DataConfig = Field(default_factory=DataConfig)
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    local: LocalConfig = Field(default_factory=LocalConfig)
    topology: TopologyConfig | None = None
    system: SystemConfig = Field(default_factory=SystemConfig)
    stop: StopConfig = Field(default_factory=StopConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    adversary: AdversaryConfig = Field(default_factory=AdversaryConfig)
    faults: FaultsConfig = Field(default_factory=FaultsConfig)
    compression: CompressionConfig = Field(default_factory=CompressionConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    contribution: ContributionConfig = Field(default_factory=ContributionConfig)
    hierarchy: HierarchyConfig = Field(default_factory=HierarchyConfig)
    population: PopulationConfig = Field(default_factory=PopulationConfig)
    sharding: ShardingConfig = Field(default_factory=ShardingConfig)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", v) is None:
            raise ValueError(f"{v!r} is not a device: auto, cpu, cuda or cuda:N")
        return v

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=False)


def _check_name(registry: Any, value: str) -> str:
    if value not in registry:
        raise ValueError(f"unknown {registry.kind} {value!r}; known: {', '.join(registry.names())}")
    return value


def _error_loc(exc: ValidationError) -> str:
    return ".".join(str(p) for p in exc.errors()[0]["loc"] if not str(p).startswith("function-after"))


def _format_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = _error_loc(exc)
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown field"
    elif err["type"] == "missing":
        msg = "required field is missing"
    return f"{loc}: {msg}" if loc else msg


def parse_value(text: str) -> Any:
    """A ``--set`` value parsed as YAML (numbers, booleans, lists), or the plain string."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides to a raw config mapping (returns a copy)."""
    result = copy.deepcopy(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError("--set", f"expected key=value, got {item!r}")
        node = result
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(key, f"{part} is not a section")
            node = child
        node[parts[-1]] = parse_value(value)
    return result


def validate(raw: Any) -> ExperimentConfig:
    """Validate a raw mapping; raise :class:`ConfigError` with one line on failure."""
    if not isinstance(raw, dict):
        raise ConfigError("", "config must be a YAML mapping of sections")
    try:
        cfg = ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        loc = _error_loc(exc)          # the field, kept apart so load() can say which file set it
        raise ConfigError(loc, _format_error(exc).removeprefix(f"{loc}: " if loc else "")) from None
    from gossamer.algorithms import ALGORITHMS

    algo = ALGORITHMS.get(cfg.algorithm.name)
    try:
        algo.from_params(cfg.algorithm.params)
    except (TypeError, ValueError, ValidationError) as exc:
        text = _format_error(exc) if isinstance(exc, ValidationError) else str(exc)
        raise ConfigError("algorithm.params", text) from None
    if algo.family == "dl" and cfg.topology is None:
        raise ConfigError("topology", f"algorithm {cfg.algorithm.name} needs a topology section")
    return cfg


MAX_CONFIG_BYTES = 64 << 20     # a config is a small text file; per-node lists fit many times
MAX_EXTENDS_DEPTH = 16          # base of a base of ...: deeper is a mistake, not a family
MAX_EXTENDS_FILES = 256         # files read for one config (a list of bases repeats shared ones)


def load(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read, compose (``extends``), override and validate a YAML experiment file.

    A top-level ``extends: base.yaml`` (or a list of paths, applied in order) names configs,
    relative to the including file, that are loaded first (recursively); the including
    file's mapping is then merged over them field by field: mappings merge recursively,
    anything else (scalars, lists, ``null``) replaces the base's value. ``--set`` overrides
    apply after composition. The result holds no ``extends``.
    """
    path = Path(path)
    sources: dict[str, str] = {}
    files: list[Path] = []
    raw = _load_composed(path, sources, files, chain=())
    composed = len(files) > 1
    for item in overrides or []:
        key = item.partition("=")[0]
        _forget(sources, key)
        sources[key] = "--set"
    raw = apply_overrides(raw, overrides or [])
    if not composed:
        return validate(raw)
    try:
        return validate(raw)
    except ConfigError as exc:
        message = str(exc).removeprefix(f"{exc.field}: " if exc.field else "")
        raise ConfigError(exc.field, f"{message} ({_where(exc.field, sources, path, files)})") from None


def _read_mapping(path: Path) -> dict[str, Any]:
    try:
        if path.is_file() and path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError("", f"{path}: {path.stat().st_size / 2**20:.0f} MiB is not a config "
                              f"file (at most {MAX_CONFIG_BYTES >> 20} MiB of YAML)")
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError("", f"cannot read config {str(path)!r}: {exc.strerror}") from None
    raw = parse_yaml(_decode(data, path), path) or {}
    if not isinstance(raw, dict):
        raise ConfigError("", f"{path}: config must be a YAML mapping of sections")
    return raw


def _load_composed(path: Path, sources: dict[str, str], files: list[Path],
                   chain: tuple[Path, ...]) -> dict[str, Any]:
    """``path``'s mapping over its bases; ``sources`` maps each field set to the file that set it."""
    files.append(path)
    raw = _read_mapping(path)
    if "extends" not in raw:
        _record(raw, "", str(path), sources)
        return raw
    value = raw.pop("extends")
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise ConfigError("extends", f"{path}: expected a config path or a non-empty list of paths, "
                          f"got {value!r}")
    merged: dict[str, Any] = {}
    here = chain + (path,)
    for name in names:
        base = path.parent / Path(name).expanduser()
        key = base.resolve()
        if key in {p.resolve() for p in here}:
            cycle = " -> ".join(str(p) for p in here + (base,))
            raise ConfigError("extends", f"{path}: configs extend each other in a cycle: {cycle}")
        if len(here) >= MAX_EXTENDS_DEPTH:
            raise ConfigError("extends", f"{path}: more than {MAX_EXTENDS_DEPTH} levels of extends "
                              f"({' -> '.join(str(p) for p in here[:3])} -> ...)")
        if len(files) >= MAX_EXTENDS_FILES:
            raise ConfigError("extends", f"{path}: more than {MAX_EXTENDS_FILES} config files in "
                              "one composition")
        try:
            base_raw = _load_composed(base, sources, files, here)
        except ConfigError as exc:
            if exc.field:                    # a field of the base (duplicate key, its own extends)
                raise
            raise ConfigError("extends", f"base {name!r} of {path}: {exc}") from None
        merged = _merge(merged, base_raw)
    _record(raw, "", str(path), sources)
    return _merge(merged, raw)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` merged into a copy of ``base``: mappings recursively, any other value replaces."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _record(raw: dict[str, Any], prefix: str, where: str, sources: dict[str, str]) -> None:
    """Note ``where`` as the source of every field ``raw`` sets (after the bases were noted)."""
    for key, value in raw.items():
        field = f"{prefix}{key}"
        if isinstance(value, dict):
            _record(value, field + ".", where, sources)
        else:                                # replaces the base's whole value, sub-fields too
            _forget(sources, field)
        sources[field] = where


def _forget(sources: dict[str, str], field: str) -> None:
    """Drop what ``sources`` says about fields under ``field`` (a value replaced them)."""
    for name in [n for n in sources if n.startswith(field + ".")]:
        del sources[name]


def _where(field: str, sources: dict[str, str], path: Path, files: list[Path]) -> str:
    parts = field.split(".") if field else []
    for n in range(len(parts), 0, -1):
        source = sources.get(".".join(parts[:n]))
        if source is not None:
            return "set by --set" if source == "--set" else f"set in {source}"
    bases = ", ".join(str(p) for p in files[1:])
    return f"in {path}, composed with {bases}"


def _decode(data: bytes, path: Path) -> str:
    """The file's text: UTF-8 (a BOM is allowed); anything else is one line saying what it is."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ConfigError("", f"{path}: the file is UTF-16 encoded; save the config as UTF-8")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError("", f"{path}: not a UTF-8 text file (byte 0x{data[exc.start]:02x} at "
                          f"offset {exc.start}); a config is YAML text") from None
    if "\x00" in text:
        raise ConfigError("", f"{path}: holds NUL bytes (offset {text.index(chr(0))}), so it is not "
                          "a YAML text file")
    return text


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last)."""


def _check_unique_keys(node: yaml.Node, where: str, path: Path, seen: set[int]) -> None:
    if id(node) in seen:                     # an alias: its mapping was checked where anchored
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict[tuple[str, str], int] = {}
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else "?"
            here = f"{where}.{name}" if where else str(name)
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                if (key.tag, name) in first:
                    raise ConfigError(here, f"duplicate key at line {key.start_mark.line + 1} of "
                                      f"{path} (first at line {first[key.tag, name]}); remove one")
                first[key.tag, name] = key.start_mark.line + 1
            _check_unique_keys(value, here, path, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_unique_keys(item, f"{where}.{i}" if where else str(i), path, seen)


def parse_yaml(text: str, path: str | Path = "<config>") -> Any:
    """``yaml.safe_load(text)`` that also refuses duplicate keys; one-line ConfigError on failure."""
    path = Path(path)
    loader = _UniqueKeyLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_unique_keys(node, "", path, set())
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = str(getattr(exc, "problem", None) or "").strip().splitlines()
        raise ConfigError("", f"{path}: invalid YAML{where}" + (f": {problem[0]}" if problem else "")) from None
    except RecursionError:
        raise ConfigError("", f"{path}: YAML nested too deeply") from None
    finally:
        loader.dispose()


def first_difference(a: Any, b: Any, prefix: str = "") -> str:
    """The dotted path of the first field where two config mappings differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            if a.get(key) != b.get(key):
                return first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
    return prefix.rstrip(".") or "(top level)"


def dump(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
