"""Compressed uploads in asynchronous FL on a slow uplink (docs/compression.md, "Asynchronous FL").

Usage: python benchmarks/async_compression.py [--config examples/heterogeneous/fedbuff.yaml]
                                              [--uplink-Bps 1.25e5] [--json]

Runs the config (by default FedBuff on the heterogeneous MNIST-5k setting, 150 simulated
seconds) once per way: float32 uploads, top-k 1% with and without error feedback, DGC at 1%
(momentum correction 0.9, no warm-up), QSGD with 16 levels, and sign with error feedback, each
with the clients' uplink set to ``--uplink-Bps``.
Prints, per way, the bytes of one upload, the server updates made, the simulated seconds to
each accuracy target of ``eval.targets`` and the accuracy at the end (and the best). Results
are deterministic given the config's seed (simulated time), so one run each suffices.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

WAYS = {
    "float32": None,
    "top-k 1% + EF": {"uplink": {"name": "topk", "params": {"density": 0.01}}, "feedback": "ef"},
    "top-k 1%, no feedback": {"uplink": {"name": "topk", "params": {"density": 0.01}}, "feedback": "none"},
    "DGC, top-k 1%": {"uplink": {"name": "topk", "params": {"density": 0.01}}, "feedback": "dgc"},
    "QSGD, 16 levels": {"uplink": {"name": "qsgd", "params": {"levels": 16}}, "feedback": "none"},
    "sign + EF": {"uplink": {"name": "sign"}, "feedback": "ef"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="examples/heterogeneous/fedbuff.yaml")
    parser.add_argument("--uplink-Bps", type=float, default=1.25e5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import gossamer
    from gossamer import wire
    from gossamer.api import load_config
    from gossamer.compression import build_compressor

    results = {}
    for name, compression in WAYS.items():
        cfg = load_config(args.config, [f"system.bandwidth_up_Bps.value={args.uplink_Bps}"])
        raw = cfg.model_dump(mode="json", exclude_none=True)
        if compression is not None:
            raw["compression"] = compression
        with tempfile.TemporaryDirectory() as tmp:
            summary = gossamer.run(raw, out=Path(tmp) / "run").summary
        numel = int(summary["num_params"])
        upload = wire.encoded_size(numel) if compression is None else wire.HEADER_BYTES + build_compressor(
            compression["uplink"]["name"], compression["uplink"].get("params", {})).nominal_bytes(numel)
        targets = summary.get("time_to_targets") or {}
        results[name] = {
            "upload_bytes": int(upload), "updates": int(summary["rounds"]),
            "time_to_targets_s": {k: (v or {}).get("time_s") for k, v in targets.items()},
            "final_accuracy": summary["final_test_accuracy"], "best_accuracy": summary["best_test_accuracy"]}
        r = results[name]
        times = ", ".join(f"{k}: {'-' if v is None else f'{v:.1f} s'}" for k, v in r["time_to_targets_s"].items())
        print(f"{name:22s} {r['upload_bytes']:>9,} B an upload  {r['updates']:>5} updates  to targets {times}  "
              f"accuracy {r['final_accuracy']:.4f} (best {r['best_accuracy']:.4f})", flush=True)
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
