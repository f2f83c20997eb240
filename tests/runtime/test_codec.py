"""Model messages on the wire: exact round trips and clean rejection of every bad input."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gossamer.runtime import schema
from gossamer.runtime.codec import (
    Limits,
    WireError,
    frames_size,
    model_frames,
    read_model,
    read_raw_model,
)

ROOT = Path(__file__).resolve().parents[2]


def _raw(frames):
    return [f.SerializeToString() for f in frames]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("chunk", [1, 7, 1 << 20])
def test_round_trip(dtype, chunk):
    x = torch.randn(3, 50).to(dtype)
    frames = list(model_frames(x, sender=4, round=9, meta=11, run_id="r1", chunk_bytes=chunk))
    meta, y = read_raw_model(_raw(frames), run_id="r1")
    assert torch.equal(x, y) and y.dtype == dtype and (meta.sender, meta.round, meta.meta) == (4, 9, 11)
    flat = list(model_frames(x.reshape(-1), run_id="r1", chunk_bytes=chunk))
    _, y = read_raw_model(_raw(flat), expected_numel=150, run_id="r1", dtype=dtype)
    assert torch.equal(x.reshape(-1), y)
    assert frames_size(frames) == sum(len(b) for b in _raw(frames))
    assert frames_size(frames) >= x.numel() * x.element_size()


def _meta_frame(shape, num_bytes, dtype="float32", run_id=""):
    spec = schema.TensorSpec(dtype=dtype, shape=shape, num_bytes=num_bytes)
    return schema.Frame(meta=schema.ModelMeta(tensor=spec, run_id=run_id))


@pytest.mark.parametrize("frames,reason", [
    ([], "must start with its metadata"),
    ([schema.Frame(chunk=b"1234")], "must start with its metadata"),
    ([_meta_frame([4], 20), schema.Frame(chunk=b"\0" * 20)], "header says 20"),   # shape vs bytes
    ([_meta_frame([4], 16, dtype="int8")], "unknown dtype"),
    ([_meta_frame([-4], 16)], "invalid shape"),
    ([_meta_frame([4], 16), schema.Frame(chunk=b"\0" * 20)], "exceeds its declared"),
    ([_meta_frame([4], 16), schema.Frame(chunk=b"\0" * 8)], "payload has 8 bytes"),
    ([_meta_frame([4], 16), _meta_frame([4], 16)], "unexpected frame"),
    ([_meta_frame([5], 20), schema.Frame(chunk=b"\0" * 20)], "expected 4"),
    ([_meta_frame([4], 16, run_id="other"), schema.Frame(chunk=b"\0" * 16)], "another run"),
])
def test_rejections_say_why(frames, reason):
    with pytest.raises(WireError, match=reason):
        read_model(frames, expected_numel=4, run_id="")


def test_size_cap_rejects_before_reading_payload():
    frames = model_frames(torch.zeros(1000), chunk_bytes=100)
    with pytest.raises(WireError, match="exceeds the cap"):
        read_model(frames, limits=Limits(max_message_bytes=3999))


def test_malformed_bytes_are_rejected_cleanly():
    with pytest.raises(WireError, match="malformed Frame"):
        read_raw_model([b"\xff\xff\xff\xff"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=64), max_size=6))
def test_random_bytes_never_escape_as_other_errors(chunks):
    try:
        read_raw_model(chunks, expected_numel=4, limits=Limits(max_message_bytes=1 << 16))
    except WireError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-3, 1 << 40), max_size=9), st.integers(0, 1 << 62),
       st.sampled_from(["float32", "float16", "bfloat16", "float64", "int8", ""]),
       st.lists(st.binary(max_size=32), max_size=4))
def test_random_headers_never_escape_as_other_errors(shape, num_bytes, dtype, payload):
    frames = [_meta_frame(shape, num_bytes, dtype)] + [schema.Frame(chunk=c) for c in payload]
    try:
        meta, tensor = read_model(frames, limits=Limits(max_message_bytes=1 << 16))
    except WireError:
        return
    assert tensor.numel() * tensor.element_size() == num_bytes


def test_descriptor_set_matches_the_proto():
    pytest.importorskip("grpc_tools")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--check"])
    assert proc.returncode == 0, "run: python scripts/gen_proto.py"


def test_a_model_must_be_the_flat_row_of_the_expected_dtype_with_finite_values():
    # the right element count in another shape ([10, 65] for a 650-element model) is refused
    wrong_shape = _raw(model_frames(torch.zeros(10, 65)))
    with pytest.raises(WireError, match=r"shape \[10, 65\] where the flat \[650\]"):
        read_raw_model(wrong_shape, expected_numel=650)
    with pytest.raises(WireError, match="float64 where float32 is expected"):
        read_raw_model(_raw(model_frames(torch.zeros(650, dtype=torch.float64))),
                       expected_numel=650, dtype=torch.float32)
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.zeros(650)
        x[17] = bad
        with pytest.raises(WireError, match="non-finite"):
            read_raw_model(_raw(model_frames(x)), expected_numel=650)
        with pytest.raises(WireError, match="non-finite"):     # in every dtype, bfloat16 too
            read_raw_model(_raw(model_frames(x.to(torch.bfloat16))), expected_numel=650)
