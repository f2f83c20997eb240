"""Checks of user-given parameters shared by the registered parts (aggregators, compressors),
and the memory estimates that refuse a config before it allocates what the machine lacks."""

from __future__ import annotations

import operator
import os
from typing import Any


def as_int(name: str, value: Any, lo: int | None = None, hi: int | None = None) -> int:
    """``value`` as an int in ``[lo, hi]`` (bools refused); one-line ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an int, got {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an int, got {value!r}") from None
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be an int {bound}, got {value!r}")
    return v


def available_memory_bytes() -> int | None:
    """Memory a new allocation can get now: ``MemAvailable`` plus ``SwapFree`` from
    /proc/meminfo (Linux), else the free physical pages from ``os.sysconf``; None when unknown
    (then no estimate refuses anything). Container limits (cgroups) are not read, so on a
    limited container this errs towards letting a config through."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            fields = {k: v for k, _, v in (line.partition(":") for line in f)}
        kib = int(fields["MemAvailable"].split()[0]) + int(fields.get("SwapFree", "0 kB").split()[0])
        return kib * 1024
    except (OSError, KeyError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def gb(num_bytes: float) -> str:
    """``num_bytes`` as decimal gigabytes for messages: ``203.6 GB``."""
    return f"{num_bytes / 1e9:,.1f} GB"


def check_memory(need: float, what: str) -> None:
    """One-line ValueError when ``need`` bytes exceed the memory available now (see
    :func:`available_memory_bytes`); ``what`` says what needs them."""
    have = available_memory_bytes()
    if have is not None and need > have:
        raise ValueError(f"{what} needs about {gb(need)}, more than the {gb(have)} of memory "
                         "available")
