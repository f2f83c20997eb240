"""Reading graphs from plain-text edge lists: one `u v` pair per line, `#` comments."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def read_edge_list(path: Path, num_nodes: int) -> np.ndarray:
    """Parse a text edge list into int64 [E, 2]; user errors raise ValueError naming file and line."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ValueError(f"topology 'edge_list': file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"topology 'edge_list': cannot read {path}: {exc}") from None
    pairs = []
    for number, raw in enumerate(text.splitlines(), start=1):
        fields = raw.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) != 2 or not all(_is_int(f) for f in fields):
            raise ValueError(
                f"{path}:{number}: expected two integer node ids 'u v', got {raw.strip()!r}"
            )
        u, v = int(fields[0]), int(fields[1])
        for node in (u, v):
            if not 0 <= node < num_nodes:
                raise ValueError(f"{path}:{number}: node id {node} is outside 0..{num_nodes - 1}")
        if u == v:
            raise ValueError(f"{path}:{number}: self-loop on node {u}")
        pairs.append((u, v))
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


def _is_int(field: str) -> bool:
    try:
        int(field)
    except ValueError:
        return False
    return True
