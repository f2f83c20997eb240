"""What every sharded executor shares: the shard a rank owns, how ids are cut into shards,
joining the process group, the exchanges, and the sums fixed by node id (docs/scale.md)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch

from gossamer.config import ConfigError
from gossamer.errors import RankLost

BLOCK = 64              # node ids per reduction block: the unit of exact, rank-free sums
TIMEOUT_S = 120         # a collective waiting this long for a dead rank fails the run
TRANSPORT_ENV = "GOSSAMER_SHARDED_TRANSPORT"   # auto (default), shared or p2p


@dataclass(frozen=True)
class Shard:
    """Rank ``rank`` of ``world`` owns node ids ``[lo, hi)``."""

    rank: int
    world: int
    lo: int
    hi: int
    edges: tuple[int, ...] = ()      # every rank's first id, then N: rank k owns [edges[k], edges[k+1])
    block: int = BLOCK               # node ids per reduction block (``sharding.block``); cuts fall on them
    device: torch.device = torch.device("cpu")     # where this rank's rows live and are exchanged

    @property
    def on_host(self) -> bool:
        """Whether this rank computes on the CPU (then ranks on one machine share memory; on a
        GPU, rows go rank to rank through NCCL)."""
        return self.device.type == "cpu"

    @property
    def primary(self) -> bool:
        return self.rank == 0

    @property
    def counts(self) -> list[int]:
        """How many node ids each rank owns, in rank order."""
        return [b - a for a, b in zip(self.edges[:-1], self.edges[1:], strict=True)]

    def owner(self, ids: np.ndarray) -> np.ndarray:
        """The rank that owns each of ``ids``."""
        return np.searchsorted(np.asarray(self.edges), ids, side="right") - 1


def world_from_env() -> tuple[int, int]:
    """``(rank, world)`` from torchrun's environment (``RANK``, ``WORLD_SIZE``); (0, 1) alone."""
    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ConfigError("WORLD_SIZE", "RANK and WORLD_SIZE must be integers") from None


def ranges(work: np.ndarray, world: int, block: int = BLOCK) -> list[tuple[int, int]]:
    """Contiguous id ranges, one per rank, cut at multiples of ``block`` so that the ranks'
    summed ``work`` (e.g. samples per node) is as equal as whole blocks allow."""
    n = len(work)
    starts = np.arange(0, n, block)
    per_block = np.add.reduceat(np.asarray(work, dtype=np.float64), starts) if n else np.zeros(0)
    cum = np.cumsum(per_block)
    total = cum[-1] if len(cum) else 0.0
    cuts = [0]
    for k in range(1, world):
        if total > 0:                    # the block boundary nearest rank k's share of the work
            target = total * k / world
            b = int(np.searchsorted(cum, target, side="left"))      # cum[b] >= target
            under = target - (cum[b - 1] if b > 0 else 0.0)
            b = b + 1 if b < len(cum) and cum[b] - target <= under else b
        else:
            b = (len(starts) * k) // world
        cuts.append(min(max(b, cuts[-1]), len(starts)))
    cuts.append(len(starts))
    edges = [min(c * block, n) for c in cuts]
    return [(edges[k], edges[k + 1]) for k in range(world)]


def even_ranges(n: int, world: int, block: int = BLOCK) -> list[tuple[int, int]]:
    """Contiguous id ranges of about ``n / world`` ids each, cut at multiples of ``block``
    (a registered population: no per-node array is made)."""
    blocks = -(-n // block)
    edges = [min(blocks * k // world * block, n) for k in range(world + 1)]
    return [(edges[k], edges[k + 1]) for k in range(world)]


def start(work: np.ndarray | int, block: int = BLOCK, device: torch.device | None = None) -> Shard:
    """This process's shard of nodes whose expected work is ``work`` (e.g. their samples; an
    int N: N nodes of equal work), cut at multiples of ``block`` ids, computing on ``device``
    (default the CPU): joins the process group when ``WORLD_SIZE`` > 1, gloo for host tensors
    and, on a GPU, NCCL for the device's (:func:`backend`)."""
    import torch.distributed as dist

    device = torch.device("cpu") if device is None else device
    rank, world = world_from_env()
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)        # NCCL's communicators bind to the current GPU
        dist.init_process_group(backend(device), rank=rank, world_size=world, timeout=timedelta(seconds=TIMEOUT_S))
        if device.type == "cuda":            # NCCL's communicator made by every rank at once (a batch of
            dist.all_reduce(torch.zeros(1, device=device))     # sends that opens it must have every rank)
    cuts = even_ranges(work, world, block) if isinstance(work, int) else ranges(work, world, block)
    lo, hi = cuts[rank]
    return Shard(rank, world, lo, hi, tuple(a for a, _ in cuts) + (cuts[-1][1],), block, device)


def backend(device: torch.device) -> str:
    """The process group's backend for ranks computing on ``device``: gloo on the CPU; on a GPU
    gloo for the host tensors (counts, losses, object broadcasts) and NCCL for the device's
    (rows, block sums), each collective going to the backend of its tensors' device."""
    return "gloo" if device.type == "cpu" else f"cpu:gloo,{device.type}:nccl"


def one_host(shard: Shard) -> bool:
    """Whether every rank runs on this machine (torchrun and ``--ranks`` set
    ``LOCAL_WORLD_SIZE``): they can then share memory."""
    try:
        return int(os.environ.get("LOCAL_WORLD_SIZE", "0")) == shard.world
    except ValueError:
        return False


def shared_tensor(shard: Shard, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
    """A tensor every rank on this machine maps (a file in ``/dev/shm``, removed as soon as
    every rank has mapped it, so nothing is left behind however the run ends); None where it
    cannot be made (not enough room there): the caller then sends rows instead."""
    import tempfile

    import torch.distributed as dist

    nbytes = int(np.prod(shape)) * dtype.itemsize
    folder = "/dev/shm"
    path = [None]
    if shard.primary:
        try:
            room = os.statvfs(folder)
            if room.f_bavail * room.f_frsize >= nbytes + (256 << 20):     # keep a margin
                fd, name = tempfile.mkstemp(prefix="gossamer-shard-", dir=folder)
                os.ftruncate(fd, nbytes)
                os.close(fd)
                path = [name]
        except OSError:
            path = [None]
    try:
        dist.broadcast_object_list(path, src=0)
        tensor = None
        if path[0] is not None:
            tensor = torch.from_file(path[0], shared=True, size=int(np.prod(shape)), dtype=dtype,
                                     device="cpu").view(shape)
        dist.barrier()
    except (RuntimeError, dist.DistBackendError) as exc:
        raise rank_lost(shard, exc, "setting up shared memory") from None
    finally:
        if shard.primary and path[0] is not None:
            os.unlink(path[0])
    return tensor


def transport() -> str:
    """``TRANSPORT_ENV``, checked: ``auto`` (default), ``shared`` or ``p2p``."""
    want = os.environ.get(TRANSPORT_ENV, "auto")
    if want not in ("auto", "shared", "p2p"):
        raise ConfigError(TRANSPORT_ENV, f"auto, shared or p2p, not {want!r}")
    return want


def shared_if_possible(shard: Shard, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
    """:func:`shared_tensor` where the ranks share this machine and ``TRANSPORT_ENV`` allows it
    (``p2p``: never; ``shared``: always, or one line why not; ``auto``: where there is room)."""
    want = transport()
    if shard.world == 1 or want == "p2p" or not shard.on_host:    # GPU rows: rank to rank (NCCL)
        return None
    tensor = shared_tensor(shard, shape, dtype) if one_host(shard) else None
    if tensor is None and want == "shared":
        raise ConfigError(TRANSPORT_ENV, "shared: the ranks do not all run on this machine, or "
                          "/dev/shm has no room for what they would share")
    return tensor


def rank_lost(shard: Shard, exc: Exception, during: str) -> RankLost:
    reason = str(exc).split("] ", 1)[-1].split(". ")[0]
    return RankLost(f"rank {shard.rank} of {shard.world}: another rank stopped during {during} ({reason})")


def gather(shard: Shard, send: torch.Tensor, during: str) -> list[torch.Tensor]:
    """Every rank's ``send`` (equal shapes), in rank order; one line if a rank is gone."""
    if shard.world == 1:
        return [send]
    import torch.distributed as dist

    out = [torch.empty_like(send) for _ in range(shard.world)]
    try:
        dist.all_gather(out, send)
    except (RuntimeError, dist.DistBackendError) as exc:
        raise rank_lost(shard, exc, during) from None
    return out


def gather_rows(shard: Shard, rows: torch.Tensor, counts: list[int], during: str) -> torch.Tensor:
    """Every rank's ``rows`` (rank k sends ``counts[k]`` rows of the same width), stacked in
    rank order: one ``all_gather`` of equal, padded shapes."""
    width = max(max(counts), 1)
    send = rows.contiguous()
    if len(rows) < width:                # equal shapes: pad (the padding is never read)
        send = torch.empty((width, *rows.shape[1:]), dtype=rows.dtype, device=rows.device)
        send[: len(rows)] = rows
    got = gather(shard, send, during)
    return torch.cat([g[:c] for g, c in zip(got, counts, strict=True)])


def gather_uneven(shard: Shard, parts: list[torch.Tensor], during: str) -> list[torch.Tensor]:
    """Every rank's ``parts`` (tensors with as many rows each on one rank, any number across
    ranks), each stacked in rank order: the counts first, then :func:`gather_rows` each."""
    counts = [int(c) for c in gather(shard, torch.tensor([len(parts[0])], device="cpu"), during)]
    return [gather_rows(shard, part, counts, during) for part in parts]


def pack_numbers(numbers: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Float64 ``numbers`` ``[m, c]`` as columns of ``dtype`` (their bits, viewed), to travel
    beside rows of that dtype in one exchange; :func:`unpack_numbers` views them back."""
    return numbers.to(torch.float64).contiguous().view(dtype)


def unpack_numbers(columns: torch.Tensor) -> torch.Tensor:
    """The float64 ``[m, c]`` that :func:`pack_numbers` packed into ``columns``."""
    return columns.contiguous().view(torch.float64)


def exchange(shard: Shard, send: torch.Tensor, send_counts: list[int], recv: torch.Tensor,
             recv_counts: list[int], during: str) -> None:
    """Point to point: rank k's next ``send_counts[k]`` rows of ``send`` go to rank k, and
    ``recv`` is filled with what every rank sent here, in rank order (``all_to_all``)."""
    if shard.world == 1:
        recv.copy_(send)
        return
    import torch.distributed as dist

    try:
        dist.all_to_all_single(recv, send, recv_counts, send_counts)
    except (RuntimeError, dist.DistBackendError) as exc:
        raise rank_lost(shard, exc, during) from None


def send_recv(shard: Shard, sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]],
              during: str, tag: int = 0) -> None:
    """Point to point: each ``(tensor, rank)`` of ``sends`` sent to its rank, each of ``recvs``
    filled from its rank, as one batch (NCCL runs a batch's sends and receives together, so two
    ranks sending each other rows cannot wait on each other); one line if a rank is gone."""
    if not sends and not recvs:
        return
    import torch.distributed as dist

    ops = [dist.P2POp(dist.isend, t, k, tag=tag) for t, k in sends]
    ops += [dist.P2POp(dist.irecv, t, k, tag=tag) for t, k in recvs]
    try:
        for request in dist.batch_isend_irecv(ops):
            request.wait()
    except (RuntimeError, dist.DistBackendError) as exc:
        raise rank_lost(shard, exc, during) from None


def block_sums(rows: torch.Tensor, first_id: int, block: int = BLOCK) -> torch.Tensor:
    """Sums of ``rows`` (node ids ``first_id``, ``first_id + 1``, ...; ``first_id`` a multiple
    of ``block``) over each ``block``-id block, ``[ceil(len / block), P]``. Each block is
    summed alone, so a block's sum does not depend on what else a rank holds."""
    n = rows.shape[0]
    if first_id % block and n:           # (a rank that owns nothing starts at N: no sums)
        raise ValueError(f"block sums start at a multiple of {block}, not at node {first_id}")
    out = torch.empty((-(-n // block), *rows.shape[1:]), dtype=rows.dtype, device=rows.device)
    for b, lo in enumerate(range(0, n, block)):
        torch.sum(rows[lo:lo + block], dim=0, out=out[b])
    return out
