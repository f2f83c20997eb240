"""Random-walk (token) learning: the decisions, once, for the simulator and the walk peers.

A token starts at :func:`start_nodes`; at hop ``r`` it trains at its node with data-order key
``(r - 1) T + t`` (:func:`train_visits`, the visit's displacement importance-weighted when
the walk's target is not the data distribution), then :func:`draw` gives the next node:
the walk's kernel over the node's candidates and the uniform ``(seed, t, r)``. A candidate
that cannot take the token (offline, cut off, unreachable) is dropped and the same uniform
redrawn over the rest (:func:`choose`); with none left the token stays. Tokens never
interact, so running them together (the simulator) or one by one (a peer) gives the same
paths. Pure functions: a token's hop is synchronous, there is no state to keep between
events but the token itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gossamer import rng
from gossamer.algorithms.dl.random_walk import Candidates
from gossamer.config import ConfigError


def check(algorithm: Any, topology: Any, adversary: Any, dynamic: Any) -> None:
    """What random-walk learning cannot run, as one-line errors naming the field."""
    if adversary is not None and adversary.model_attack:
        raise ConfigError("adversary.attack", "random-walk learning does not support model "
                          "attacks yet (data attacks such as label_flip work)")
    if dynamic is not None:
        raise ConfigError("topology", "random-walk learning needs a static graph (a graph "
                          "per round is not supported yet)")
    try:
        algorithm.check_degrees(topology.degrees())
    except ValueError as exc:
        raise ConfigError("topology", str(exc)) from None


def start_nodes(seed: int, num_nodes: int, tokens: int) -> np.ndarray:
    """Where the tokens start ``[T]``: distinct random nodes when there are enough of them."""
    g = rng.generator(seed, rng.STREAM_RANDOM_WALK, 0)
    start = g.permutation(num_nodes)[:tokens] if tokens <= num_nodes else g.integers(0, num_nodes, tokens)
    return np.asarray(start, dtype=np.int64)


def visit_weights(algorithm: Any, sizes: np.ndarray, mu: np.ndarray) -> np.ndarray | None:
    """Importance weight of a visit per node ``[N]``, or None when every node with data has
    weight 1 (nothing to reweight)."""
    weights = algorithm.step_weights(sizes, mu)
    return None if np.allclose(weights[sizes > 0], 1.0) else weights


def visit_keys(r: int, num_tokens: int, tokens: np.ndarray) -> np.ndarray:
    """Data-order keys (and message ids) of hop ``r`` of ``tokens``: one per (hop, token)."""
    return (r - 1) * num_tokens + np.asarray(tokens)


def train_visits(trainer: Any, rows: torch.Tensor, nodes: np.ndarray, keys: np.ndarray,
                 weights: np.ndarray | None) -> tuple[torch.Tensor, Any]:
    """Train the tokens ``rows`` ``[B, P]`` visiting ``nodes`` with data-order ``keys``; with
    ``weights`` ``[N]`` each visit's displacement is scaled by its node's weight."""
    before = rows.clone() if weights is not None else None
    result = trainer.train(rows, nodes, keys, inplace=True)
    if before is not None:                     # importance weight on the visit's displacement
        w = torch.from_numpy(weights[nodes]).to(rows.device, rows.dtype).unsqueeze(1)
        rows = torch.lerp(before, rows, w)
    return rows, result


@dataclass(frozen=True)
class Draw:
    """Where tokens may go after hop ``r``: candidates, the kernel over them, one uniform each."""

    cand: Candidates
    probs: np.ndarray
    uniforms: np.ndarray


def draw(algorithm: Any, topology: Any, seed: int, tokens: np.ndarray, nodes: np.ndarray,
         visits: np.ndarray, mu: np.ndarray, r: int) -> Draw:
    """The next-hop draw of ``tokens`` at ``nodes`` with visit counts ``visits`` ``[T, N]``."""
    cand = algorithm.candidates(topology.indptr, topology.indices, nodes)
    return Draw(cand, algorithm.kernel(cand, visits, mu),
                rng.uniform(seed, rng.STREAM_RANDOM_WALK, np.asarray(tokens), r))


def choose(algorithm: Any, d: Draw, allowed: np.ndarray) -> np.ndarray:
    """Next node per token among the ``allowed`` ``[T, D]`` candidates; ``-1``: none can."""
    return algorithm.choose(d.cand, d.probs, allowed & (d.cand.nodes >= 0), d.uniforms)
