"""Robust aggregation rules over a stacked tensor of client updates, selectable by name."""

from gossamer.aggregators.robust import AGGREGATORS, aggregate

__all__ = ["AGGREGATORS", "aggregate"]
