"""Synchronous decentralized rounds (D-PSGD and its variants): the decisions, once.

Round ``r``: every node that is up trains, then takes the round's gossip steps
(``algorithm.gossip_steps_at``): it sends to its out-neighbours of round ``r``'s graph and
merges what it received with its row of round ``r``'s mixing matrix. A message that did not
arrive (sender down, link cut, lost, or silent past the timeout) is skipped and its weight
folded onto the receiver's own. After the last round, ``final_merge`` replaces every model
that is up by the exact mean of them all.

The pattern is synchronous, so these are plain pure functions rather than a state machine:
the simulator applies them to the whole population at once (the matrix forms), a runtime
peer to its own row (the row forms); a test checks that both forms agree.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from gossamer.config import ConfigError
from gossamer.topology import mixing_matrix, renormalize_for_available, without_links


@dataclass(frozen=True)
class RoundGraph:
    """One round's directed links ``src[e] -> dst[e]`` and mixing matrix (scipy CSR)."""

    src: np.ndarray
    dst: np.ndarray
    mixing: sp.csr_matrix


@dataclass(frozen=True)
class PeerView:
    """One node's part of a round graph: whom it sends to, whom it hears, its row of ``W``."""

    receivers: list[int]
    senders: list[int]
    weights: dict[int, float]


def static_graph(topology: Any, mixing: sp.csr_matrix) -> RoundGraph:
    """The links of a fixed topology: ``j -> i`` for every neighbour ``j`` of ``i``."""
    dst = np.repeat(np.arange(len(topology.indptr) - 1), np.diff(topology.indptr))
    return RoundGraph(topology.indices.astype(np.int64), dst, mixing)


def round_graph(static: RoundGraph, dynamic: Any, rule: str, r: int) -> RoundGraph:
    """Round ``r``'s graph: the static one, or a dynamic topology's (a pure function of
    (seed, r), so every peer computes the same graph alone)."""
    if dynamic is None:
        return static
    links = dynamic.links(r)
    return RoundGraph(links.src, links.dst, mixing_matrix(rule, dynamic.graph(r)))


def peer_view(graph: RoundGraph, node: int) -> PeerView:
    row = graph.mixing.getrow(node)
    return PeerView(graph.dst[graph.src == node].tolist(), graph.src[graph.dst == node].tolist(),
                    dict(zip(row.indices.tolist(), row.data.tolist(), strict=True)))


# --- how a node merges what it received: the matrix form and the row form ---------------------
def round_mixing(graph: RoundGraph, online: np.ndarray, delivered: np.ndarray) -> sp.csr_matrix | None:
    """The round's effective mixing matrix: offline nodes keep their model, and a receiver
    folds the weight of every message that did not arrive onto its own (None: the graph's own
    matrix applies unchanged)."""
    if online.all() and delivered.all():
        return None
    w = renormalize_for_available(graph.mixing, online)
    missing = online[graph.src] & online[graph.dst] & ~delivered
    if missing.any():
        w = without_links(w, graph.dst[missing], graph.src[missing])
    return w


def held_weights(view: PeerView, node: int, got: Iterable[int]) -> tuple[list[int], torch.Tensor]:
    """One receiver's merge weights: (the senders it merges, in id order, and the weights
    ``[1 + k]``, its own first with the weight of every silent sender folded onto it)."""
    got = {j for j in got if j in view.weights}
    missing = [j for j in view.senders if j not in got]
    own = view.weights[node] + sum(view.weights[j] for j in missing)
    ids = sorted(got)
    return ids, torch.tensor([own] + [view.weights[j] for j in ids], dtype=torch.float64)


def gathered(algorithm: Any, adversary: Any) -> bool:
    """Whether each node merges over the stack of models it holds (a robust rule, or
    Byzantine senders crafting per-receiver models) instead of one weighted average."""
    return algorithm.aggregator != "mean" or bool(
        adversary is not None and adversary.model_attack)


# --- a peer that fell behind (it was down) -------------------------------------------------------
def round_receivers(static: RoundGraph, dynamic: Any, node: int, r: int) -> set[int]:
    """Whom ``node`` sends to in round ``r`` (its receivers in the round's graph)."""
    links = static if dynamic is None else dynamic.links(r)
    return set(links.dst[links.src == node].tolist())


def gave_up(latest: Mapping[int, int], r: int, receivers_at: Callable[[int], set[int]]) -> set[int]:
    """The peers that went on without this node: a peer whose latest message is of round ``m``
    finished rounds up to ``m - 1``; if one of them, past ``r``, was a round in which it waited
    for this node's message (this node, in round ``r``, has not sent it yet), it gave up on this
    node, which is behind (it was down). ``receivers_at(k)``: this node's receivers in round
    ``k``. On a static graph every neighbour waits every round, so these are the neighbours two
    rounds ahead; on a dynamic one a peer that never needed this node since ``r`` may be
    several rounds ahead in a healthy run (one round ahead is normal on any graph: its message
    for ``r`` may still be in flight)."""
    out, cache = set(), {}
    for j, m in latest.items():
        for k in range(r + 1, m):
            if k not in cache:
                cache[k] = receivers_at(k)
            if j in cache[k]:
                out.add(j)
                break
    return out


def next_round(r: int, latest: Mapping[int, int], total: int, behind_of: set[int]) -> int:
    """The round to run after ``r``: ``r + 1``, or, if peers gave up on this node
    (``behind_of``, from :func:`gave_up`), the furthest of their rounds (it continues from its
    own model at their pace), never past ``total``."""
    furthest = max((latest[j] for j in behind_of), default=0)
    return min(furthest, total) if furthest > r + 1 else r + 1


# --- the single final merge ----------------------------------------------------------------------
def final_merge_due(algorithm: Any, r: int, total: int) -> bool:
    return bool(algorithm.final_merge) and r == total


def check_final_merge(algorithm: Any, cfg: Any, gathered: bool) -> None:
    """``final_merge`` averages every model after round ``stop.rounds``: refuse set-ups where
    that run end may not come or one exact average cannot be formed."""
    if not algorithm.final_merge:
        return
    stop = cfg.stop
    if stop.max_sim_time_s is not None:
        raise ConfigError("stop.max_sim_time_s", "final_merge merges after round stop.rounds; a run "
                          "that may stop earlier would never merge: unset max_sim_time_s")
    if stop.target_accuracy is not None and stop.stop_at_target:
        raise ConfigError("stop.stop_at_target", "final_merge merges after round stop.rounds; a run "
                          "that stops at the target would never merge: set stop_at_target: false")
    if gathered:
        raise ConfigError("algorithm.params.final_merge", "the global merge is a plain average: it "
                          "does not combine with a robust aggregator or model attacks")
    if cfg.faults.partitions:
        raise ConfigError("faults.partitions", "final_merge's all-reduce needs every online node to "
                          "reach every other: not supported with network partitions")


def check_gradient_tracking(sizes: np.ndarray, gathered: bool) -> None:
    """Gradient tracking's refusals: a robust merge or model attacks would break the
    tracker's invariant, and a node without data has no gradient to track."""
    if gathered:
        raise ConfigError("adversary.attack", "gradient tracking does not support model attacks "
                          "yet (data attacks such as label_flip work)")
    empty = int((np.asarray(sizes) == 0).sum())
    if empty:
        raise ConfigError("partition", f"gradient tracking needs data at every node; {empty} "
                          "nodes hold none (relay-only nodes have no gradient to track)")


def merge_all(models: Mapping[int, torch.Tensor]) -> torch.Tensor:
    """The final merge over the models a node holds ``{id: [P]}``: their exact mean, stacked
    in node-id order as the all-reduce over the population's rows averages them."""
    return torch.stack([models[j] for j in sorted(models)]).mean(0, keepdim=True)
