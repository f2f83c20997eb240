"""Protobuf message classes of the runtime, built from a committed descriptor set.

``proto/gossamer.proto`` is the source of truth; ``proto/gossamer.binpb`` is its compiled
``FileDescriptorSet`` (regenerate with ``python scripts/gen_proto.py``; a test checks that it
is current). Building the classes at import from the descriptor, instead of committing
protoc's generated modules, keeps the package loadable on every protobuf runtime from 4.21
on: generated modules pin the exact runtime version they were made with.
"""

from __future__ import annotations

from pathlib import Path

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

PROTO_DIR = Path(__file__).parent / "proto"
DESCRIPTOR_SET = PROTO_DIR / "gossamer.binpb"
PACKAGE = "gossamer.v1"

_pool = descriptor_pool.DescriptorPool()
for _file in descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR_SET.read_bytes()).file:
    _pool.Add(_file)


def _message(name: str) -> type:
    return message_factory.GetMessageClass(_pool.FindMessageTypeByName(f"{PACKAGE}.{name}"))


TensorSpec = _message("TensorSpec")
ModelMeta = _message("ModelMeta")
Frame = _message("Frame")
Ack = _message("Ack")
JoinRequest = _message("JoinRequest")
JoinReply = _message("JoinReply")
TaskRequest = _message("TaskRequest")
TaskHeader = _message("TaskHeader")
TaskFrame = _message("TaskFrame")
PullRequest = _message("PullRequest")


def method(service: str, name: str) -> str:
    """Full gRPC method path, e.g. ``/gossamer.v1.Coordinator/Join``."""
    service_desc = _pool.FindServiceByName(f"{PACKAGE}.{service}")
    if name not in service_desc.methods_by_name:
        raise KeyError(f"{service} has no method {name}")
    return f"/{PACKAGE}.{service}/{name}"
