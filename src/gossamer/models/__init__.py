"""Model zoo and functional helpers for stacked (one row per node) parameters."""

from gossamer.models import graph, sequence, vision  # noqa: F401 (registers their zoo models)
from gossamer.models.functional import (
    ModelNotVectorizable,
    ParamSpec,
    StackedForward,
    make_stacked_forward,
)
from gossamer.models.zoo import MODELS, build_model

__all__ = [
    "MODELS",
    "ModelNotVectorizable",
    "ParamSpec",
    "StackedForward",
    "build_model",
    "make_stacked_forward",
]
