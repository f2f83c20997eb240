"""Can a rule run on ``n`` inputs with these parameters? Asked once, at config-build time."""

from __future__ import annotations

import inspect

from gossamer.aggregators.base import AGGREGATORS


def rule_params(name: str) -> list[str]:
    """The keyword parameters rule ``name`` accepts (``f``, ``m``, ``tau``, ...)."""
    sig = inspect.signature(AGGREGATORS.get(name))
    return [p.name for p in sig.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]


def check_aggregator(name: str, n: int, **params) -> None:
    """Raise a one-line ``ValueError`` if rule ``name`` cannot run on ``n`` inputs with
    ``params``: unknown rule or parameter, a bad value, or a size requirement not met
    (Krum and Multi-Krum ``n > 2f + 2``, Multi-Krum ``m <= n - f``, Bulyan ``n >= 4f + 3``,
    trimmed mean ``n > 2f`` with ``f = floor(beta * n)`` in its ``beta`` form, Bristle
    ``keep <= n`` or ``f < n``, ...).

    The simulator calls it with the smallest group a rule will see (clients per round in FL,
    the least connected node's own model plus its neighbours' in DL). Rules that ignore ``f``
    (mean, median, geometric median, centered clipping, flag) only check its type: they run
    on any ``n``, whatever their breakdown point.

    >>> check_aggregator("krum", 6, f=2)
    Traceback (most recent call last):
    ...
    ValueError: krum requires n > 2f + 2; got n=6, f=2
    """
    if name not in AGGREGATORS:
        raise ValueError(f"unknown aggregator {name!r}; known: {', '.join(AGGREGATORS.names())}")
    allowed = rule_params(name)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"aggregator {name!r} has no parameter "
                         f"{', '.join(map(repr, unknown))}; it takes {', '.join(allowed)}")
    check = AGGREGATORS.get(name).check  # type: ignore[attr-defined]
    takes = inspect.signature(check).parameters
    check(n, **{k: v for k, v in params.items() if k in takes})
