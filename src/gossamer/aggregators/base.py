"""Registry, calling convention and shared tensor helpers of the aggregation rules.

Every rule is a pure function ``rule(updates, weights=None, **params)`` that takes either

- ``updates [B, P]`` (one row per client or held model) with ``weights [B] | None`` and
  returns ``[P]``, or
- ``updates [G, B, P]`` with ``weights [G, B] | None`` and returns ``[G, P]``: ``G``
  independent groups of the same size, e.g. what each of ``G`` receiving nodes holds in
  decentralized learning (its own model and its neighbours'). Group ``g`` of the result
  equals a call on group ``g`` alone; the work is vectorized over ``G``.

Rules compute in float64 and return ``updates.dtype``. Every rule accepts ``f`` (the number
of Byzantine inputs) so that one config drives any rule. Each rule carries a ``check(n,
**params)`` attribute that raises a one-line ``ValueError`` when it cannot run on ``n``
inputs; :func:`gossamer.aggregators.check_aggregator` calls it at config-build time.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

from gossamer.checks import as_int  # noqa: F401  (re-exported for the parts)
from gossamer.registry import Registry

Aggregator = Callable[..., torch.Tensor]
AGGREGATORS: Registry[Aggregator] = Registry("aggregator")


def rule(name: str, check: Callable[..., None]) -> Callable[[Aggregator], Aggregator]:
    """Register ``fn`` under ``name`` with its requirements check ``check(n, **params)``."""

    def decorator(fn: Aggregator) -> Aggregator:
        fn.check = check  # type: ignore[attr-defined]
        return AGGREGATORS.register(name)(fn)

    return decorator


def aggregate(
    name: str, updates: torch.Tensor, weights: torch.Tensor | None = None, **params
) -> torch.Tensor:
    """Aggregate ``updates [B, P]`` (``weights [B]``) into ``[P]``, or ``[G, B, P]``
    (``weights [G, B]``) into ``[G, P]``, with the rule registered as ``name``."""
    return AGGREGATORS.get(name)(updates, weights, **params)


# ---------------------------------------------------------------- parameter checks


def as_float(name: str, value, *, positive: bool = False) -> float:
    """``value`` as a finite float that is >= 0 (> 0 when ``positive``); bools refused."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v < 0 or (positive and v == 0):
        raise ValueError(f"{name} must be a finite number {'>' if positive else '>='} 0, "
                         f"got {value!r}")
    return v


def check_n(n) -> int:
    return as_int("n (number of inputs)", n, lo=1)


def need(ok: bool, rule_name: str, cond: str, n: int, **shown) -> None:
    """Raise ``'<rule> requires <cond>; got n=.., f=..'`` unless ``ok``."""
    if not ok:
        got = ", ".join([f"n={n}"] + [f"{k}={v}" for k, v in shown.items()])
        raise ValueError(f"{rule_name} requires {cond}; got {got}")


def check_f_only(n, *, f: int = 0) -> None:
    """Check of the rules whose only parameter is the (unused) ``f``."""
    check_n(n)
    as_int("f", f, lo=0)


# ---------------------------------------------------------------- tensors


def prepare(
    updates: torch.Tensor, weights: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Validate; return (updates ``[G, B, P]`` float64, weights ``[G, B]`` float64 summing to
    1 per group, whether the input was batched)."""
    if not isinstance(updates, torch.Tensor) or updates.dim() not in (2, 3) \
            or updates.shape[-2] < 1:
        shape = tuple(updates.shape) if isinstance(updates, torch.Tensor) else type(updates)
        raise ValueError(f"updates must have shape [B, P] or [G, B, P] with B >= 1, got {shape}")
    batched = updates.dim() == 3
    x = updates.to(torch.float64)
    if not batched:
        x = x.unsqueeze(0)
    g, b, _ = x.shape
    if weights is None:
        return x, torch.full((g, b), 1.0 / b, dtype=torch.float64, device=x.device), batched
    w = torch.as_tensor(weights, dtype=torch.float64, device=x.device)
    want = (g, b) if batched else (b,)
    if tuple(w.shape) != want:
        raise ValueError(f"weights must have shape {list(want)}, got {tuple(w.shape)}")
    w = w.reshape(g, b)
    total = w.sum(dim=1, keepdim=True)
    if not torch.isfinite(w).all() or (w < 0).any() or (total <= 0).any():
        raise ValueError("weights must be finite, non-negative and not all zero in a group")
    return x, w / total, batched


def finish(out: torch.Tensor, batched: bool, dtype: torch.dtype) -> torch.Tensor:
    """``[G, P]`` result back to the caller's shape (``[P]`` when not batched) and dtype."""
    return (out if batched else out[0]).to(dtype)


def group_vector(name: str, value, x: torch.Tensor, batched: bool) -> torch.Tensor:
    """A per-group vector argument (``[P]``, or ``[G, P]`` when batched) as float64 ``[G, P]``."""
    g, _, p = x.shape
    v = torch.as_tensor(value, dtype=torch.float64, device=x.device)
    if tuple(v.shape) == (p,):
        return v.expand(g, p)
    if batched and tuple(v.shape) == (g, p):
        return v
    want = f"[{p}]" + (f" or [{g}, {p}]" if batched else "")
    raise ValueError(f"{name} must have shape {want}, got {tuple(v.shape)}")


def median(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Median along ``dim``; the mean of the two middle values for an even count."""
    return median_of_sorted(torch.sort(x, dim=dim).values, dim)


def median_of_sorted(s: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """:func:`median` of values already sorted along ``dim``."""
    b = s.shape[dim]
    if b % 2:
        return s.select(dim, b // 2)
    return (s.select(dim, b // 2 - 1) + s.select(dim, b // 2)) / 2


def sq_dists(x: torch.Tensor) -> torch.Tensor:
    """Pairwise squared distances ``[G, B, B]`` of rows ``[G, B, P]``: exactly symmetric,
    zero diagonal. Rows are centred first so that close rows far from the origin (full
    models) keep their precision."""
    c = x - x.mean(dim=1, keepdim=True)
    sq = (c * c).sum(dim=2)
    d = sq[:, :, None] + sq[:, None, :] - 2.0 * torch.bmm(c, c.transpose(1, 2))
    d = ((d + d.transpose(1, 2)) / 2).clamp_min(0.0)
    d.diagonal(dim1=1, dim2=2).zero_()
    return d


@functools.lru_cache(maxsize=8)
def _tie_direction(p: int) -> torch.Tensor:
    return torch.randn(p, generator=torch.Generator().manual_seed(0x6055A), dtype=torch.float64, device="cpu")


def tie_keys(x: torch.Tensor) -> torch.Tensor:
    """A fixed projection ``[G, B]`` of the rows ``x [G, B, P]``: a tie-breaking key that does
    not depend on the rows' positions."""
    return x @ _tie_direction(x.shape[2]).to(x.device)


def rank(scores: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Indices ``[G, B]`` that sort ``scores [G, B]`` ascending. Exact ties are broken by
    ``keys`` (from :func:`tie_keys`), then by index, so selections are invariant to the order
    of the rows."""
    first = torch.argsort(keys, dim=1, stable=True)
    second = torch.argsort(scores.gather(1, first), dim=1, stable=True)
    return first.gather(1, second)


def take_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx [G, k]`` of every group of ``x [G, B, P]`` -> ``[G, k, P]``."""
    return x.gather(1, idx.unsqueeze(2).expand(-1, -1, x.shape[2]))


def weighted_sum(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``sum_b w[g, b] x[g, b]`` -> ``[G, P]``."""
    return torch.bmm(w.unsqueeze(1), x).squeeze(1)
