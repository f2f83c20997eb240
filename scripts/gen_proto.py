"""Compile src/gossamer/runtime/proto/gossamer.proto into its descriptor set (needs grpcio-tools).

Usage: python scripts/gen_proto.py [--check]
--check exits 1 when the committed gossamer.binpb differs from a fresh compile.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parents[1] / "src" / "gossamer" / "runtime" / "proto"


def compile_descriptor() -> bytes:
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "gossamer.binpb"
        code = protoc.main(["protoc", f"-I{PROTO_DIR}", f"--descriptor_set_out={out}",
                            str(PROTO_DIR / "gossamer.proto")])
        if code != 0:
            raise SystemExit(f"protoc failed with code {code}")
        return out.read_bytes()


def main() -> int:
    fresh = compile_descriptor()
    target = PROTO_DIR / "gossamer.binpb"
    if "--check" in sys.argv:
        return 0 if target.exists() and target.read_bytes() == fresh else 1
    target.write_bytes(fresh)
    print(f"wrote {target} ({len(fresh)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
