"""Robust aggregation rules over stacked updates, selectable by name.

A rule maps ``updates [B, P]`` (``weights [B]``) to ``[P]``, or ``G`` groups at once,
``[G, B, P]`` (``weights [G, B]``) to ``[G, P]``; see :mod:`gossamer.aggregators.base`.
:func:`check_aggregator` says, before a run, whether a rule can run on ``n`` inputs.
"""

from gossamer.aggregators import bristle, coordinate, flag, iterative, krum  # noqa: F401 (register)
from gossamer.aggregators.base import AGGREGATORS, aggregate
from gossamer.aggregators.check import check_aggregator
from gossamer.aggregators.merge import can_merge, merge_held, needs_losses

__all__ = ["AGGREGATORS", "aggregate", "can_merge", "check_aggregator", "merge_held", "needs_losses"]
