"""The attack registry, parameter checks, ``apply_attack`` and shared honest statistics.

A registered model attack is a pure function

    attack(updates [G, B, P], byzantine [G, B] bool, *, generator, **params) -> [K, P]

that returns the K malicious rows, one per ``True`` entry of ``byzantine`` in row-major order
(the order of ``updates[byzantine]``). ``apply_attack`` validates, calls it only when K > 0,
and writes the rows into a copy of ``updates``; honest rows are copied bit for bit.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch

from gossamer.registry import Registry

Attack = Callable[..., torch.Tensor]
ATTACKS: Registry[Attack] = Registry("attack")

# A check is (predicate on the value, what the value must be, for the error message).
Check = tuple[Callable[[object], bool], str]
_CHECKS: dict[str, dict[str, Check]] = {}


def _is_real(v: object) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


POSITIVE: Check = (lambda v: _is_real(v) and v > 0, "a finite number > 0")
NON_NEGATIVE: Check = (lambda v: _is_real(v) and v >= 0, "a finite number >= 0")
PROBABILITY: Check = (lambda v: _is_real(v) and 0 <= v <= 1, "a number in [0, 1]")
OPTIONAL_REAL: Check = (lambda v: v is None or _is_real(v), "null or a finite number")
POSITIVE_INT: Check = (
    lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1,
    "an int >= 1",
)


def one_of(*choices: str) -> Check:
    return (lambda v: v in choices, "one of " + ", ".join(repr(c) for c in choices))


_DRAWS: set[str] = set()     # attacks that draw from their generator (registered with draws=True)


def register(name: str, *, replace: bool = False, draws: bool = False,
             **checks: Check) -> Callable[[Attack], Attack]:
    """Register an attack under ``name``; ``checks`` maps each parameter to its check;
    ``draws``: it draws from its ``generator`` (see :func:`draws`); ``replace``: an existing
    ``name`` may be replaced (a plugin's, :func:`gossamer.register_attack`)."""

    def decorator(fn: Attack) -> Attack:
        ATTACKS.register(name, replace=replace)(fn)
        _CHECKS[name] = checks
        _DRAWS.discard(name)
        if draws:
            _DRAWS.add(name)
        return fn

    return decorator


def draws(name: str) -> bool:
    """Whether attack ``name`` draws from its generator: then a DL receiver's crafted models
    come from a stream of its own (``Adversary.corrupt``'s ``keys``), whatever receivers share a
    call, as on any number of ranks."""
    return name in _DRAWS


def _show(v: object) -> str:
    """A short one-line repr for error messages."""
    text = " ".join(repr(v).split())
    return text if len(text) <= 60 else text[:57] + "..."


def check_attack_params(name: str, **params) -> None:
    """Raise ``ValueError`` (one line) for an unknown attack, unknown parameter or bad value."""
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; known: {', '.join(ATTACKS.names())}")
    checks = _CHECKS[name]
    for key, value in params.items():
        if key not in checks:
            known = ", ".join(sorted(checks)) or "none"
            raise ValueError(f"attack {name!r} has no parameter {key!r}; known: {known}")
        ok, what = checks[key]
        if not ok(value):
            raise ValueError(f"attack {name!r}: {key} must be {what}, got {_show(value)}")


def apply_attack(
    name: str,
    updates: torch.Tensor,
    byzantine: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    **params,
) -> torch.Tensor:
    """Replace the Byzantine rows of ``updates`` by the malicious updates of attack ``name``.

    Args:
        updates: ``[G, B, P]`` (or ``[B, P]``, treated as ``G = 1``), floating point. On input
            the Byzantine rows hold what each attacker would honestly have sent. Group ``g`` is
            what one receiver gets (DL: one node's neighbours; FL: one group, the selected
            clients); groups are attacked independently.
        byzantine: ``[G, B]`` (or ``[B]``) bool, True for the rows an attacker sends.
        generator: source of randomness for random attacks (``gaussian``).
        params: the attack's parameters (see ``check_attack_params``).

    Returns:
        A new tensor, shape and dtype of ``updates``: honest rows equal, Byzantine rows replaced.
    """
    check_attack_params(name, **params)
    x, byz = _as_groups(updates, byzantine)
    out = x.clone()
    if bool(byz.any()):
        rows = ATTACKS.get(name)(x, byz, generator=generator, **params)
        out[byz] = rows.to(x.dtype)
    return out.squeeze(0) if updates.dim() == 2 else out


def _as_groups(updates: torch.Tensor, byzantine: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate shapes; return ``updates`` as ``[G, B, P]`` and ``byzantine`` as ``[G, B]``."""
    if updates.dim() not in (2, 3) or not updates.is_floating_point():
        raise ValueError(
            f"updates must be a floating [G, B, P] or [B, P] tensor, got {updates.dtype} "
            f"{tuple(updates.shape)}"
        )
    x = updates if updates.dim() == 3 else updates.unsqueeze(0)
    byz = byzantine if byzantine.dim() == 2 else byzantine.unsqueeze(0)
    if byzantine.dtype != torch.bool or byz.shape != x.shape[:2]:
        raise ValueError(
            f"byzantine must be a bool tensor of shape {tuple(updates.shape[:-1])}, "
            f"got {byzantine.dtype} {tuple(byzantine.shape)}"
        )
    return x, byz.to(x.device)


# ---------------------------------------------------------------- shared statistics


def group_of(byzantine: torch.Tensor) -> torch.Tensor:
    """``[K]`` group index of each Byzantine row, in the row-major order of ``byzantine``."""
    return byzantine.nonzero()[:, 0]


def reference_rows(byzantine: torch.Tensor) -> torch.Tensor:
    """``[G, B]`` rows an omniscient attacker takes statistics over: the honest rows, or every
    row of a group that has none (then the attackers use their own honest updates)."""
    honest = ~byzantine
    return honest | ~honest.any(dim=1, keepdim=True)


def masked_mean(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``[G, P]`` float64 mean of the rows of ``x [G, B, P]`` where ``ref [G, B]``."""
    w = ref.to(torch.float64)
    total = torch.bmm(w.unsqueeze(1), x.to(torch.float64)).squeeze(1)
    return total / w.sum(dim=1, keepdim=True)


def centered(x: torch.Tensor, ref: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """``[G, B, P]`` float64 rows minus the group mean, zero on rows outside ``ref``."""
    c = x.to(torch.float64) - mean.unsqueeze(1)
    return c * ref.unsqueeze(-1)


def masked_std(c: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``[G, P]`` coordinate-wise sample std (ddof = 1) from centred rows ``c``; 0 when a group
    has fewer than two reference rows."""
    count = ref.sum(dim=1, keepdim=True).to(torch.float64)
    var = (c * c).sum(dim=1) / (count - 1).clamp_min(1.0)
    return var.sqrt() * (count >= 2)
