"""Fuzzing a live FL server with whole uploads (metadata and tensors, well and badly formed):
it answers every one, never crashes, and files only well-formed uploads."""

import math

import grpc
import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gossamer import config
from gossamer.runtime import schema
from gossamer.runtime.fl_server import Coordinator, RoundState
from tests.conftest import small_config

MESSAGES_PER_EXAMPLE = 10
EXAMPLES = 1000                        # 10^4 uploads


DTYPES = {"float32": np.float32, "float16": np.float16, "float64": np.float64}


@st.composite
def upload(draw, numel, counts):
    """One PutUpdate stream as raw frames: a header that may lie, then chunks that may too."""
    dtype = draw(st.sampled_from(["float32", "float32", "float16", "float64", "bfloat16", "int8", ""]))
    shape = draw(st.one_of(st.just([numel]), st.just([2, numel // 2]), st.just([numel, 1]),
                           st.lists(st.integers(0, 1 << 41), max_size=4)))
    itemsize = {"float16": 2, "bfloat16": 2, "float64": 8}.get(dtype, 4)
    true_bytes = math.prod(shape) * itemsize if math.prod(shape) < 1 << 20 else 0
    num_bytes = draw(st.one_of(st.just(true_bytes), st.integers(0, (1 << 64) - 1)))
    meta = schema.ModelMeta(
        kind=draw(st.integers(0, 3)), sender=draw(st.one_of(st.integers(0, 5), st.integers(0, 2**32 - 1))),
        round=draw(st.one_of(st.just(1), st.integers(0, 2**64 - 1))),
        meta=draw(st.one_of(st.sampled_from(counts), st.integers(0, 2**64 - 1))),
        run_id=draw(st.sampled_from(["gossamer", "other", ""])),
        tensor=schema.TensorSpec(dtype=dtype, shape=shape, num_bytes=num_bytes))
    fill = draw(st.sampled_from(["zeros", "normal", "nan", "inf", "huge"]))
    n = min(true_bytes, 1 << 16) // itemsize
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    values = rng.standard_normal(n) if fill != "zeros" else np.zeros(n)
    if n and fill in ("nan", "inf", "huge"):
        values[rng.integers(n)] = {"nan": np.nan, "inf": np.inf, "huge": 3e38}[fill]
    with np.errstate(over="ignore"):                     # 3e38 overflows float16: meant
        payload = values.astype(DTYPES.get(dtype, np.float32)).tobytes()[:true_bytes]
    payload = draw(st.sampled_from([payload, payload[:-1], payload + b"\0", b""]))
    cut = max(1, -(-len(payload) // draw(st.integers(1, 8))))     # 1 to 8 chunks
    frames = [schema.Frame(meta=meta).SerializeToString()]
    frames += [schema.Frame(chunk=payload[i:i + cut]).SerializeToString()
               for i in range(0, len(payload), cut)]
    tail = draw(st.sampled_from(["", "meta", "garbage"]))
    if tail == "meta":
        frames.append(frames[0])
    elif tail == "garbage":
        frames.append(draw(st.binary(max_size=64)))
    return frames


def test_the_server_survives_10k_fuzzed_uploads_and_files_only_valid_ones(tmp_path):
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
    messages = st.lists(st.one_of(upload(coordinator.upload_numel, sizes),
                                  st.lists(st.binary(max_size=128), max_size=4)),
                        min_size=MESSAGES_PER_EXAMPLE, max_size=MESSAGES_PER_EXAMPLE)

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(batch=messages)
    def fuzz(batch):
        for frames in batch:
            try:
                ack = schema.Ack.FromString(put(iter(frames), timeout=30))
            except grpc.RpcError as exc:                   # gRPC's own limits may refuse first
                assert exc.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                      grpc.StatusCode.INVALID_ARGUMENT), exc
                continue
            assert ack.ok or ack.reason
            sent.append(ack.ok)
        with coordinator.lock:
            for node, (tensor, samples) in coordinator.current.received.items():
                assert tensor.dtype == torch.float32 and tensor.shape == (coordinator.upload_numel,)
                assert bool(torch.isfinite(tensor).all()) and samples == coordinator.clients[node]

    try:
        fuzz()
    finally:
        channel.close()
        server.stop(grace=None)
    assert len(sent) >= EXAMPLES * MESSAGES_PER_EXAMPLE * 0.95
    assert sum(sent) <= 4                                  # at most one accepted per client
    assert coordinator.rejected == len(sent) - sum(sent)
