"""Sums along the tree of block ids: one definition, the same bits however the blocks are split
over ranks, and at most one row each way a rank per level of the tree."""

import queue
import threading
from collections import Counter

import numpy as np
import pytest
import torch

from gossamer.sim.sharded import Shard
from gossamer.sim.sharded.tree import merges, population_mean, tree_reduce, tree_sum


def _rows(seed: int, n: int = 40, width: int = 300, span: int = 1000):
    rng = np.random.default_rng(seed)
    ids = np.sort(rng.choice(span, n, replace=False))
    g = torch.Generator().manual_seed(seed)
    # magnitudes over six decades: a different order of additions rounds differently
    rows = torch.randn(n, width, generator=g) * torch.logspace(-3, 3, n)[:, None]
    return ids, rows


def _by_definition(rows: torch.Tensor, ids: np.ndarray) -> torch.Tensor:
    """The module's definition, recursively: a node is its left child plus its right child, or
    the one child holding a row."""
    held = {int(b): rows[j] for j, b in enumerate(ids)}

    def node(lo: int, size: int):
        if size == 1:
            return held.get(lo)
        left, right = node(lo, size // 2), node(lo + size // 2, size // 2)
        return right if left is None else left if right is None else left + right

    return node(0, 1 << int(ids.max()).bit_length())


@pytest.mark.parametrize("seed", range(4))
def test_the_tree_sum_is_its_definition_bit_for_bit(seed):
    ids, rows = _rows(seed)
    want = _by_definition(rows.clone(), ids)
    assert torch.equal(tree_sum(rows.clone(), ids), want)
    # the rows tell orders apart: adding them one after another (IEEE additions, the same on
    # any machine) rounds differently from the tree
    running = rows[0].clone()
    for row in rows[1:]:
        running = running + row
    assert not torch.equal(running, want)


def test_tree_sum_edge_cases():
    assert torch.equal(tree_sum(torch.zeros(0, 3), np.zeros(0, dtype=np.int64)), torch.zeros(3))
    one = torch.arange(3.0)[None]
    assert torch.equal(tree_sum(one.clone(), np.array([7])), one[0])
    with pytest.raises(ValueError, match="sorted"):
        tree_sum(torch.zeros(2, 3), np.array([5, 2]))


class _Wire:
    """torch.distributed's point-to-point calls for ranks run as threads of this process: each
    message a copy through a queue; counts every row a rank sends."""

    def __init__(self) -> None:
        self.boxes: dict = {}
        self.lock = threading.Lock()
        self.me = threading.local()
        self.sent: Counter = Counter()

    def _box(self, key) -> queue.Queue:
        with self.lock:
            return self.boxes.setdefault(key, queue.Queue())

    def isend(self, tensor, dst, tag=0):
        self.sent[self.me.rank] += 1
        self._box((self.me.rank, dst, tag)).put(tensor.clone())
        return _Done(lambda: None)

    def irecv(self, tensor, src, tag=0):
        box = self._box((src, self.me.rank, tag))
        return _Done(lambda: tensor.copy_(box.get(timeout=20)))

    @staticmethod
    def P2POp(op, tensor, peer, tag=0):           # noqa: N802  (torch's name)
        return (op, tensor, peer, tag)

    def batch_isend_irecv(self, ops):
        return [op(tensor, peer, tag=tag) for op, tensor, peer, tag in ops]

    def broadcast(self, tensor, src):
        if self.me.rank == src:
            for k in range(self.me.world):
                if k != src:
                    self._box((src, k, "root")).put(tensor.clone())
        else:
            tensor.copy_(self._box((src, self.me.rank, "root")).get(timeout=20))


class _Done:
    def __init__(self, finish) -> None:
        self.finish = finish

    def wait(self) -> None:
        self.finish()


def _on_ranks(monkeypatch, edges: list[int], work):
    """``work(shard)`` on one thread a rank (ranks own ``[edges[k], edges[k+1])``); the results
    in rank order, and the rows each rank sent."""
    import torch.distributed as dist

    wire = _Wire()
    for name in ("isend", "irecv", "broadcast", "P2POp", "batch_isend_irecv"):
        monkeypatch.setattr(dist, name, getattr(wire, name))
    world = len(edges) - 1
    out: list = [None] * world
    errors: list = []

    def rank(k: int) -> None:
        wire.me.rank, wire.me.world = k, world
        try:
            out[k] = work(Shard(k, world, edges[k], edges[k + 1], tuple(edges)))
        except Exception as exc:         # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=rank, args=(k,)) for k in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return out, wire.sent


@pytest.mark.parametrize("edges", [[0, 1000], [0, 500, 1000], [0, 37, 38, 900, 1000],
                                   [0, 0, 1000, 1000], [0, 100, 200, 300, 400, 500, 600, 700, 1000]],
                         ids=["1", "2", "4-uneven", "3-empty", "8"])
def test_every_split_over_ranks_gives_one_process_bits_sending_a_row_a_level(monkeypatch, edges):
    ids, rows = _rows(3)
    want = tree_sum(rows.clone(), ids)
    holders = np.searchsorted(np.asarray(edges), ids, side="right") - 1

    def work(shard):
        return tree_reduce(shard, rows[torch.from_numpy(holders == shard.rank)].clone(), ids, holders, "a test")

    totals, sent = _on_ranks(monkeypatch, edges, work)
    assert all(torch.equal(total, want) for total in totals)
    levels = len(merges(ids))
    assert levels <= int(ids.max()).bit_length()
    assert all(count <= levels for count in sent.values())      # at most one row a level a rank


def test_the_population_mean_of_block_sums_is_the_same_on_any_ranks(monkeypatch):
    n, block = 700, 64
    rows = torch.randn(n, 50, generator=torch.Generator().manual_seed(5))
    one, _ = _on_ranks(monkeypatch, [0, n], lambda s: population_mean(s, rows, n, "a test"))

    def split(edges):
        def work(shard):
            shard = Shard(shard.rank, shard.world, shard.lo, shard.hi, shard.edges, block)
            return population_mean(shard, rows[shard.lo:shard.hi], n, "a test")
        return _on_ranks(monkeypatch, edges, work)[0]

    for edges in ([0, 320, n], [0, 64, 128, 640, n]):        # cuts on blocks of 64 ids
        assert all(torch.equal(mean, one[0]) for mean in split(edges))
    assert torch.allclose(one[0], rows.double().mean(dim=0).float(), atol=1e-6)
