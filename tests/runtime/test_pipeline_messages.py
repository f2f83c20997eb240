"""The upload pipeline's message paths on a live coordinator, fed hostile uploads: encoded
bytes (compression), DP updates and secure aggregation's messages each refuse a wrong shape,
non-finite values and a lying header, and file the honest message that follows."""

import time

import grpc
import numpy as np
import pytest
import torch

from gossamer import config
from gossamer.compression import build_compressor
from gossamer.protocols.sync_fl import SyncRound
from gossamer.protocols.upload import upload_keys
from gossamer.runtime import schema
from gossamer.runtime.codec import bytes_frames, model_frames
from gossamer.runtime.fl_server import Coordinator, RoundState
from tests.conftest import small_config


@pytest.fixture
def live(tmp_path):
    """``start(**sections)``: a coordinator with round 1 open for clients 0..3, and ``put``."""
    made = []

    def start(**sections):
        cfg = small_config("fedavg", **sections)
        cfg["partition"]["num_nodes"] = 4
        cfg["runtime"] = {"server": "127.0.0.1:0", "upload_timeout_s": 5}
        coordinator = Coordinator(config.validate(cfg), tmp_path / f"run{len(made)}")
        server = coordinator.start_server()
        sizes = [int(n) for n in coordinator.exp.trainer.sizes]
        rnd = SyncRound(coordinator.algorithm, 0, 1, np.arange(4))
        with coordinator.lock:
            coordinator.clients = {i: sizes[i] for i in range(4)}
            coordinator.current = RoundState(1, {0, 1, 2, 3}, protocol=rnd, opened=time.monotonic())
            coordinator.last_round = rnd
        channel = grpc.insecure_channel(f"127.0.0.1:{coordinator.port}")
        made.append((server, channel))
        stub = channel.stream_unary(schema.method("Coordinator", "PutUpdate"))

        def put(message, *, kind, sender=0, round_=1, samples=None, as_bytes=None):
            make = bytes_frames if isinstance(message, bytes) else model_frames
            frames = [f.SerializeToString() for f in make(
                message, kind=kind, sender=sender, round=round_,
                meta=sizes[sender] if samples is None else samples, run_id="gossamer")]
            return schema.Ack.FromString(stub(iter(frames), timeout=30))

        return coordinator, put

    yield start
    for server, channel in made:
        channel.close()
        server.stop(grace=None)


def test_encoded_uploads_refuse_wrong_shapes_non_finite_values_and_lying_headers(live):
    coordinator, put = live(compression={"uplink": {"name": "topk", "params": {"density": 0.05}}})
    numel = coordinator.numel
    topk = build_compressor("topk", {"density": 0.05})
    update = torch.randn(1, numel)

    def encoded(x, client=0):
        return topk.to_bytes(topk.compress(x, keys=upload_keys(np.array([client]), 1)), 0)

    good = encoded(update)
    flat = torch.frombuffer(bytearray(good), dtype=torch.uint8)
    two_d = put(flat[: len(good) // 2 * 2].reshape(2, -1), kind=4)
    assert not two_d.ok and "one flat uint8 row" in two_d.reason
    as_floats = put(update[0], kind=4)                            # a float row where bytes go
    assert not as_floats.ok and "float32 where uint8" in as_floats.reason
    nan = update.clone()
    nan[0, 3] = float("inf")                                      # top-k sends the infinite value
    assert "non-finite" in put(encoded(nan), kind=4).reason
    assert "undecodable" in put(b"\x07" * 13, kind=4).reason      # garbage bytes
    assert "upload kind 1 where 4" in put(good, kind=1).reason    # a lying kind
    assert "samples but joined with" in put(good, kind=4, samples=10**6).reason
    assert "not expected" in put(good, kind=4, round_=2).reason
    with coordinator.lock:
        assert coordinator.current.received == {}
    assert put(good, kind=4).ok                                   # the honest one is filed
    with coordinator.lock:
        row, samples = coordinator.current.received[0]
    start = coordinator.state.params.reshape(-1)
    assert torch.equal(row, start + topk.from_bytes(good, numel))


def test_dp_updates_refuse_wrong_shapes_non_finite_values_and_lying_headers(live):
    dp = {"level": "client", "clip_norm": 0.5, "noise_multiplier": 0.0, "noise": "server"}
    coordinator, put = live(privacy={"dp": dp})
    numel = coordinator.numel
    assert "where the flat" in put(torch.zeros(2, numel // 2), kind=2).reason
    bad = torch.zeros(numel)
    bad[7] = float("nan")
    assert "non-finite" in put(bad, kind=2).reason
    assert "upload kind 1 where 2" in put(torch.zeros(numel), kind=1).reason
    assert "samples but joined with" in put(torch.zeros(numel), kind=2, samples=10**6).reason
    assert put(torch.full((numel,), 10.0), kind=2).ok             # unclipped: the server clips
    with coordinator.lock:
        assert list(coordinator.current.received) == [0]
    rows = coordinator._server_stages(1, coordinator.current.received[0][0][None], np.array([0]))
    step = float((rows[0] - coordinator.state.params.reshape(-1)).norm())
    assert step == pytest.approx(0.5 / 4, rel=1e-5)               # clip_norm over 4 expected


def test_secure_aggregation_messages_refuse_wrong_shapes_and_lying_headers(live):
    from gossamer.privacy.secagg import Client, Randomness, advertise_keys
    from gossamer.runtime.secagg_round import SecAggRound

    coordinator, put = live(privacy={"secure_aggregation": {"threshold": 2}})
    with coordinator.lock:
        coordinator.current.secagg = SecAggRound(coordinator.pipeline.secagg, {0, 1, 2, 3},
                                                 coordinator.numel, 1)
    keys = [advertise_keys(Client.new(u, None, Randomness(u))) for u in range(4)]
    flat = torch.frombuffer(bytearray(keys[0]), dtype=torch.uint8)
    assert "one flat uint8 row" in put(flat.reshape(4, 17), kind=5).reason
    assert "68 bytes starting with the sender's id" in put(keys[1], kind=5, sender=0).reason
    assert "68 bytes" in put(keys[0][:-1], kind=5).reason         # truncated
    assert "stage 1" in put(keys[0], kind=6).reason               # a stage the round is not at
    assert "too large" in put(bytes(1 << 20), kind=5).reason
    assert "secure-aggregation message is expected" in put(keys[0], kind=1).reason
    assert "samples but joined with" in put(keys[0], kind=5, samples=10**6).reason
    assert put(keys[0], kind=5).ok
    assert "duplicate" in put(keys[0], kind=5).reason
    with coordinator.lock:
        assert set(coordinator.current.received) == {0}
        assert coordinator.current.secagg.awaited() == {1, 2, 3}


def test_async_encoded_uploads_refuse_hostile_bytes_and_decode_against_the_task(tmp_path):
    """FedBuff with top-k uploads on a live asynchronous coordinator: a wrong shape, floats
    where bytes go, a non-finite value, garbage, a lying kind and another task's key are each
    refused, and the honest bytes reach the protocol as the decoded update."""
    from gossamer.runtime.async_server import AsyncCoordinator

    cfg = small_config("fedbuff", compression={"uplink": {"name": "topk", "params": {"density": 0.05}},
                                               "feedback": "ef"})
    cfg["partition"]["num_nodes"] = 4
    cfg["algorithm"]["params"] = {"buffer_size": 3, "concurrency": 2}
    cfg["runtime"] = {"server": "127.0.0.1:0", "upload_timeout_s": 5, "round_timeout_s": 1e6}
    coordinator = AsyncCoordinator(config.validate(cfg), tmp_path / "run")
    server = coordinator.start_server()
    channel = grpc.insecure_channel(f"127.0.0.1:{coordinator.port}")
    stub = channel.stream_unary(schema.method("Coordinator", "PutUpdate"))
    try:
        with coordinator.lock:
            coordinator.clients = {i: int(n) for i, n in enumerate(coordinator.exp.trainer.sizes)}
            coordinator.protocol.restart(0.0)
            coordinator.running = True
            header, _ = coordinator._task(0)
        key, numel = int(header.round), coordinator.numel
        topk = build_compressor("topk", {"density": 0.05})
        update = torch.randn(1, numel, generator=torch.Generator().manual_seed(0))

        def encoded(x):
            return topk.to_bytes(topk.compress(x, keys=upload_keys(np.array([0]), key)), 0)

        def put(message, *, kind=4, round_=key):
            make = bytes_frames if isinstance(message, bytes) else model_frames
            frames = [f.SerializeToString() for f in make(message, kind=kind, sender=0, round=round_,
                                                            meta=10, run_id="gossamer")]
            return schema.Ack.FromString(stub(iter(frames), timeout=30))

        good = encoded(update)
        flat = torch.frombuffer(bytearray(good), dtype=torch.uint8)
        assert "one flat row" in put(flat[: len(good) // 2 * 2].reshape(2, -1)).reason
        assert "float32 where uint8" in put(update[0]).reason
        bad = update.clone()
        bad[0, 3] = float("inf")
        assert "non-finite" in put(encoded(bad)).reason
        assert "undecodable" in put(b"\x07" * 13).reason
        assert "upload kind 1" in put(good, kind=1).reason
        assert "not expected" in put(good, round_=key + 1).reason
        with coordinator.lock:
            assert coordinator.protocol.accepted == 0 and 0 in coordinator.tasks
        assert put(good).ok
        with coordinator.lock:
            assert coordinator.protocol.accepted == 1
            entry = coordinator.protocol.buffer[0]
        assert torch.equal(entry.message, topk.from_bytes(good, numel))   # FedBuff's base is zero
    finally:
        channel.close()
        server.stop(grace=None)
