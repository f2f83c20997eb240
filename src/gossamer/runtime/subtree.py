"""The server side of hierarchical aggregation on real processes: what a coordinator or an
aggregator does for the aggregators directly under it.

A child aggregator (node ``num_clients + g`` on the wire, ``protocols/hierarchy.py`` numbers
them) joins like a client; every ``GetTask`` it sends lists the clients it reaches now (its
subtree's, each with its shard size), and the answer is the round's model with the clients
under it that the round still awaits. Its uploads are partial aggregates (``KIND_PARTIAL``):
the weighted sum of the models of the clients ``ModelMeta.nodes`` names, which must be
awaited clients it reaches. Uploads are summed on arrival (eager aggregation, LIFL): a round
holds one running sum, never a row per client. A client reached through an aggregator that
stops reporting it is unreachable (not selected) until it is heard again, through any
aggregator or directly.

An aggregator is trusted with its clients' models (it sums them), as the coordinator is; what
it sends is checked like any upload (shape, dtype, finite values, round, which clients, and
each client's shard size as it joined), but the sum itself cannot be checked.
"""

from __future__ import annotations

import numpy as np
import torch

from gossamer.runtime import schema
from gossamer.runtime.codec import KIND_PARTIAL, WireError
from gossamer.runtime.guard import Refused


class Subtrees:
    """Mixed into the synchronous coordinator (``runtime/fl_server.py``); ``me`` is -1 for the
    coordinator and the aggregator's number in an aggregator."""

    me = -1

    def _init_subtrees(self) -> None:
        self.tree = self.exp.hierarchy
        self.subs: dict[int, set[int]] = {}         # joined child aggregator -> clients it reaches
        self.via: dict[int, int] = {}               # client -> the child aggregator reaching it
        self.partials = 0                           # partial aggregates accepted

    def _is_aggregator(self, node: int) -> bool:
        return self.tree is not None and self.exp.num_nodes <= node < self.exp.num_nodes + self.tree.count

    def _join_aggregator(self, node: int) -> bytes:
        """An aggregator's ``Join``: only aggregators below this process (directly, or
        re-homed from a parent that died)."""
        g = above = node - self.exp.num_nodes
        while above >= 0 and above != self.me:
            above = self.tree.parent(above)
        if above != self.me or g == self.me:
            above = "the coordinator" if self.me < 0 else f"aggregator {self.me}"
            return schema.JoinReply(ok=False, reason=f"aggregator {g} is not under {above}").SerializeToString()
        with self.lock:
            self.subs.setdefault(node, set())
            self.lock.notify_all()
        return schema.JoinReply(ok=True, num_params=self.numel, dtype="float32").SerializeToString()

    def _heard_aggregator(self, node: int, req: object) -> None:
        """Take a child aggregator's report of the clients it reaches (lock held), or Refused."""
        members, samples = list(req.members), list(req.member_samples)
        if len(members) != len(samples) or len(set(members)) != len(members):
            raise Refused(f"aggregator {node - self.exp.num_nodes} lists {len(members)} clients "
                          f"with {len(samples)} shard sizes", node)
        n = self.exp.num_nodes
        if members and (max(members) >= n or np.any(np.asarray(samples) > self.max_samples[np.asarray(members)])):
            raise Refused(f"aggregator {node - n} lists a client outside 0..{n - 1} or an "
                          "implausible shard size", node)
        reach = set(members)
        for m in self.subs.get(node, set()) - reach:
            if self.via.get(m) == node:                   # no longer reached there
                self.stale.add(m)
                del self.via[m]
        for m, s in zip(members, samples, strict=True):
            self.clients[m] = int(s)
            self.via[m] = node
            self.stale.discard(m)
        self.subs[node] = reach
        self.lock.notify_all()

    def _aggregator_task(self, node: int, last_round: int) -> tuple[object, list[bytes]]:
        """A child aggregator's task (lock held): the round's awaited clients under it, with
        the model unless it already holds this round's; WAIT when none is awaited."""
        if node not in self.subs:
            return schema.TaskHeader(kind=schema.TaskHeader.JOIN), []
        cur = self.current
        nodes = sorted(m for m in cur.open() if self.via.get(m) == node)
        if not nodes:
            return self._wait()
        header = schema.TaskHeader(kind=schema.TaskHeader.TRAIN, round=cur.number, nodes=nodes,
                                   state_hash=cur.model_hash)
        return header, [] if last_round == cur.number else cur.model_frames

    def _weight(self, samples: int) -> float:
        """A client's weight in the mean (its shard size, or 1: the algorithm's weighting)."""
        return float(self.algorithm.weights(np.array([samples]), torch.float64)[0])

    def _file(self, node: int, row: torch.Tensor, samples: int) -> None:
        """Add a client's model to the round's running sum (lock held)."""
        cur = self.current
        w = self._weight(samples)
        cur.total = row.double() * w if cur.total is None else cur.total.add_(row.double(), alpha=w)
        cur.weight += w
        cur.received[node] = (None, samples)

    def _accept_partial(self, node: int, bound: int | None, meta: object, tensor: torch.Tensor,
                        size: int) -> None:
        """File a child aggregator's partial aggregate of the current round (lock held), or
        raise :class:`Refused`."""
        g, cur = node - self.exp.num_nodes, self.current
        if node not in self.subs:
            raise Refused(f"aggregator {g} has not joined", bound, strike=False)
        nodes = list(meta.nodes)
        if not nodes or len(set(nodes)) != len(nodes):
            raise Refused(f"aggregator {g}'s partial aggregate names no clients or one twice", bound)
        if meta.round != cur.number:
            raise Refused(f"partial aggregate from aggregator {g} for round {meta.round} is not "
                          "expected", bound, strike=False)
        awaited = cur.open()
        stray = [m for m in nodes if m not in awaited or self.via.get(m) != node]
        if stray:
            raise Refused(f"aggregator {g} sums clients {stray[:8]} that round {cur.number} does not "
                          "await from it", bound, strike=False)
        cur.total = tensor.double() if cur.total is None else cur.total.add_(tensor.double())
        for m in nodes:
            cur.received[m] = (None, self.clients[m])
            cur.weight += self._weight(self.clients[m])
        self.partials += 1
        self.bytes_up += size
        self.lock.notify_all()

    def _check_partial(self, meta: object) -> None:
        """A partial aggregate may come from an aggregator only (WireError)."""
        if meta.kind == KIND_PARTIAL and not self._is_aggregator(int(meta.sender)):
            raise WireError("a partial aggregate from a node that is not an aggregator")
