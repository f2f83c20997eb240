"""What every algorithm is: a frozen dataclass of hyper-parameters and pure tensor functions.

An algorithm never imports the engine. It names the execution ``pattern`` it follows
(synchronous FL rounds, synchronous DL rounds, asynchronous gossip); an executor (the
simulator, vectorized over nodes, or the runtime, one node per process) drives that
pattern and calls the algorithm's functions on stacked tensors with a leading node axis.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar, Literal

from pydantic import ConfigDict, TypeAdapter

Family = Literal["fl", "dl"]
Pattern = Literal["sync_fl", "sync_dl", "async_gossip", "sampled_dl", "async_fl",
                  "random_walk", "gradient_tracking", "choco", "zo_fl", "coded", "islands",
                  "experts", "grank"]


@dataclass(frozen=True)
class Algorithm:
    """Base of all algorithms: hyper-parameters validated from a config mapping."""

    family: ClassVar[Family]
    pattern: ClassVar[Pattern]
    # no hyper-parameter is infinite or NaN (a NaN server_lr would run to a NaN model)
    __pydantic_config__ = ConfigDict(extra="forbid", allow_inf_nan=False)

    # Declared capabilities: what executors and checks may ask of every algorithm, with the
    # defaults of the plainest one (an algorithm overrides them with its own fields or
    # properties), so no executor probes an algorithm with hasattr/getattr.
    aggregator = "mean"                         # the rule that merges models or updates
    aggregator_params = MappingProxyType({})
    download_names = ()                         # server vectors a client receives beside the
                                                # model (SCAFFOLD: control; FL's Payload) ...
    upload_vectors = 1                          # ... model-sized vectors it sends (SCAFFOLD: 2)
    client_state_vectors = 0                    # model-sized vectors a client keeps
    uses_global_model = False                   # local training reads the global model beyond
                                                # its start (FedProx's term, client momentum)
    split_roles = False                         # clients take roles per round (FedAMD's anchors)
    local_sam_rho = 0.0                         # SAM's radius the algorithm itself sets
    local_optimizer = None                      # the local optimizer it requires (DiLoCo: adamw)
    final_merge = False                         # DL: one all-to-all average after the last round
    deadline_s = None                           # FL: a round's deadline, in seconds
    over_selection = 0.0                        # FL: extra fraction selected (rounds close early)
    gossip_steps = 1                            # DL: mixing steps per round
    mean_of_models = False                      # sync FL: aggregation needs only the uploads'
                                                # weighted mean (FedAvg.aggregate_mean)
    personalized = False                        # FL: every client keeps a personal model, trained
                                                # after the global round (personal_objective)
    communicates = True                         # False: clients never exchange (local-only)
    personal_first = False                      # the personal step precedes the global one (FedRep)
    local_entries = False                       # clients keep some entries local (FedBN's norms)
    personal_training = True                    # personal models take their own local steps
    server_personalizes = False                 # the server sets them after aggregating (FedCAC)
    uses_embeddings = False                     # the server reads trained models' embeddings (FED-PUB)
    evaluates_with_global = False               # a personal model is evaluated with the global one
    runs_on_processes = False                   # a personalized algorithm real processes run

    @property
    def download_vectors(self) -> int:
        """Model-sized vectors a client receives: the model and the ``download_names``."""
        return 1 + len(self.download_names)

    def expected_clients(self, candidates: int) -> int:
        """The clients a synchronous round expects among ``candidates`` (FL)."""
        return candidates

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> Algorithm:
        """Build from ``algorithm.params``; unknown or ill-typed fields raise a one-line error."""
        return TypeAdapter(cls).validate_python(dict(params))
