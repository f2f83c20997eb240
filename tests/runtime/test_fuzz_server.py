"""Fuzzing a live FL server with whole uploads (metadata and tensors, well and badly formed):
it answers every one, never crashes, and files only well-formed uploads.

Each upload is drawn from its own seeded generator (``UPLOADS`` seeds), so a failure names
the seed that reproduces it; drawing is cheap next to the server's work (hypothesis' drawing
took ~3 ms an upload, most of this test's time)."""

import math

import grpc
import numpy as np
import torch

from gossamer import config
from gossamer.runtime import schema
from gossamer.runtime.fl_server import Coordinator, RoundState
from tests.conftest import small_config

UPLOADS = 4_000
DTYPES = {"float32": np.float32, "float16": np.float16, "float64": np.float64}


def _any_int(rng: np.random.Generator, bits: int) -> int:
    return int(rng.integers(0, 1 << bits, dtype=np.uint64)) if bits == 64 else int(rng.integers(0, 1 << bits))


def _bytes(rng: np.random.Generator, most: int) -> bytes:
    return rng.bytes(int(rng.integers(0, most + 1)))


def upload(rng: np.random.Generator, numel: int, counts: list[int]) -> list[bytes]:
    """One PutUpdate stream as raw frames: a header that may lie, then chunks that may too;
    or (one in four) a few frames of garbage."""
    if rng.random() < 0.25:
        return [_bytes(rng, 128) for _ in range(int(rng.integers(0, 5)))]
    pick = lambda options: options[int(rng.integers(len(options)))]      # noqa: E731
    dtype = pick(["float32", "float32", "float16", "float64", "bfloat16", "int8", ""])
    shape = pick([[numel], [2, numel // 2], [numel, 1], None])
    if shape is None:
        shape = [_any_int(rng, 41) for _ in range(int(rng.integers(0, 5)))]
    itemsize = {"float16": 2, "bfloat16": 2, "float64": 8}.get(dtype, 4)
    true_bytes = math.prod(shape) * itemsize if math.prod(shape) < 1 << 20 else 0
    num_bytes = true_bytes if rng.random() < 0.5 else _any_int(rng, 64)
    meta = schema.ModelMeta(
        kind=int(rng.integers(0, 4)), sender=int(rng.integers(0, 6)) if rng.random() < 0.5 else _any_int(rng, 32),
        round=1 if rng.random() < 0.5 else _any_int(rng, 64),
        meta=pick(counts) if rng.random() < 0.5 else _any_int(rng, 64),
        run_id=pick(["gossamer", "other", ""]),
        tensor=schema.TensorSpec(dtype=dtype, shape=shape, num_bytes=num_bytes))
    fill = pick(["zeros", "normal", "nan", "inf", "huge"])
    n = min(true_bytes, 1 << 16) // itemsize
    values = rng.standard_normal(n) if fill != "zeros" else np.zeros(n)
    if n and fill in ("nan", "inf", "huge"):
        values[rng.integers(n)] = {"nan": np.nan, "inf": np.inf, "huge": 3e38}[fill]
    with np.errstate(over="ignore"):                     # 3e38 overflows float16: meant
        payload = values.astype(DTYPES.get(dtype, np.float32)).tobytes()[:true_bytes]
    payload = pick([payload, payload[:-1], payload + b"\0", b""])
    cut = max(1, -(-len(payload) // int(rng.integers(1, 9))))     # 1 to 8 chunks
    frames = [schema.Frame(meta=meta).SerializeToString()]
    frames += [schema.Frame(chunk=payload[i:i + cut]).SerializeToString()
               for i in range(0, len(payload), cut)]
    tail = pick(["", "meta", "garbage"])
    if tail == "meta":
        frames.append(frames[0])
    elif tail == "garbage":
        frames.append(_bytes(rng, 64))
    return frames


def test_the_server_survives_4k_fuzzed_uploads_and_files_only_valid_ones(tmp_path):
    cfg = small_config("fedavg")
    cfg["partition"]["num_nodes"] = 4
    cfg["runtime"] = {"server": "127.0.0.1:0", "upload_timeout_s": 5, "max_message_bytes": 1 << 16}
    coordinator = Coordinator(config.validate(cfg), tmp_path)
    server = coordinator.start_server()
    sizes = [int(n) for n in coordinator.exp.trainer.sizes]
    with coordinator.lock:
        coordinator.clients = {i: sizes[i] for i in range(4)}
        coordinator.current = RoundState(1, {0, 1, 2, 3})
    channel = grpc.insecure_channel(f"127.0.0.1:{coordinator.port}")
    put = channel.stream_unary(schema.method("Coordinator", "PutUpdate"))
    sent = []
    try:
        for seed in range(UPLOADS):
            frames = upload(np.random.default_rng(seed), coordinator.upload_numel, sizes)
            try:
                ack = schema.Ack.FromString(put(iter(frames), timeout=30))
            except grpc.RpcError as exc:                   # gRPC's own limits may refuse first
                assert exc.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                      grpc.StatusCode.INVALID_ARGUMENT), (seed, exc)
                continue
            assert ack.ok or ack.reason, seed
            sent.append(ack.ok)
            if ack.ok or seed % 100 == 0:
                with coordinator.lock:
                    for node, (tensor, samples) in coordinator.current.received.items():
                        assert tensor.dtype == torch.float32 and tensor.shape == (coordinator.upload_numel,)
                        assert bool(torch.isfinite(tensor).all()) and samples == coordinator.clients[node]
    finally:
        channel.close()
        server.stop(grace=None)
    assert len(sent) >= UPLOADS * 0.95
    assert sum(sent) <= 4                                  # at most one accepted per client
    assert coordinator.rejected == len(sent) - sum(sent)
