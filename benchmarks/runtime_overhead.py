"""What the real runtime costs on top of the simulator, and how fast its transport is.

Usage: python benchmarks/runtime_overhead.py [--nodes 8] [--rounds 10] [--repeats 3]
                                             [--model-mb 10] [--sends 10] [--json]

1. Per-round overhead. FedAvg on MNIST-5k with --nodes clients (a temporary config: IID,
   MLP 784-64-10, every client every round, one local epoch, batch 10, lr 0.05, evaluation
   every round), run two ways, each in its own fresh process, interleaved --repeats times:
     sim      `python -m gossamer run CONFIG --out TMP --quiet`
     runtime  `python -m gossamer launch CONFIG --out TMP`: a coordinator and --nodes client
              processes talking gRPC over 127.0.0.1
   Per-round wall time: sim = summary.json loop_time_s / rounds; runtime = median of the
   differences of consecutive metrics.csv sim_time_s (wall seconds since the coordinator
   started) over rounds 2..R (round 1 carries warm-up: first gRPC calls, lazy imports, the
   first forward/backward in every client). Both include the per-round evaluation. Also:
   runtime start-up (row 0's sim_time_s: until every client has joined, plus the round-0
   evaluation), whole-process times measured here, and the accuracy curves of both ways,
   which must agree.
2. Transport. A --model-mb MiB float32 tensor sent over a loopback gRPC stream-unary call
   `/bench.Sink/Push` to an in-process server whose handler runs the runtime's own
   `read_raw_model` (validation and reassembly), for chunk sizes 256 KiB, 1 MiB, 4 MiB:
   end-to-end send (encode + RPC + decode), RPC of pre-encoded frames, encode only
   (model_frames + SerializeToString) and decode only (read_raw_model on pre-encoded
   frames); serialized bytes against raw payload bytes.

With --json the last stdout line is one JSON object with every number printed.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from proctools import busy_cpu_s, descendants

REPO = Path(__file__).resolve().parent.parent
SRC = REPO / "src"
sys.path.insert(0, str(SRC))  # part 2 imports the codec of this checkout
CHUNKS = (256 << 10, 1 << 20, 4 << 20)
FRAME_OVERHEAD = 64 << 10  # as gossamer.runtime.common: gRPC messages are one chunk + metadata
MiB = float(1 << 20)
BUSY_CORES = 0.2  # other processes using more than this many cores on average spoil the timings


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


# ---------------------------------------------------------------- part 1: whole programs


def write_config(path: Path, nodes: int, rounds: int) -> None:
    cfg = {
        "name": "runtime_overhead",
        "seed": 0,
        "data": {"dataset": "mnist5k"},
        "partition": {"name": "iid", "num_nodes": nodes},
        "model": {"name": "mlp", "params": {"hidden": [64]}},
        "algorithm": {"name": "fedavg", "params": {"client_fraction": 1.0, "weighting": "samples"}},
        "local": {"epochs": 1, "batch_size": 10, "lr": 0.05, "shuffle": False},
        "stop": {"rounds": rounds},
        "eval": {"every": 1},
        "output": {"progress": False, "checkpoint_every": 0},
        "runtime": {"server": "127.0.0.1:50051", "round_timeout_s": 60, "poll_interval_s": 0.05},
    }
    path.write_text(json.dumps(cfg, indent=1))  # JSON is YAML


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGTERM the child (the launcher then stops its own children), then SIGKILL whatever
    of the tree is left: the child's process group and each descendant by pid."""
    below = descendants(proc.pid)[1:]   # the child's own tree, not itself
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=8)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for pid in below:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    proc.wait()


def _children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_child(args: list[str], timeout_s: float, log_path: Path) -> tuple[float, float, str | None]:
    """Run `python -m gossamer ARGS`; returns (whole-process wall seconds, mean cores used by
    processes other than this child's tree meanwhile, error or None). The launcher reaps its
    server and clients, so their CPU time reaches RUSAGE_CHILDREN here."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(SRC) + os.pathsep + env.get("PYTHONPATH", "")
    with log_path.open("wb") as log:
        busy0, own0 = busy_cpu_s(), _children_cpu_s()
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "gossamer", *args], cwd=REPO, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_tree(proc)
            return time.perf_counter() - t0, None, f"timed out after {timeout_s:.0f} s"
        whole = time.perf_counter() - t0
        other = max(0.0, (busy_cpu_s() - busy0) - (_children_cpu_s() - own0)) / whole
    if code != 0:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
        return whole, other, f"exit code {code}: " + " | ".join(tail)
    return whole, other, None


def read_metrics(run_dir: Path) -> list[dict[str, float]]:
    with (run_dir / "metrics.csv").open() as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)}
                for row in csv.DictReader(f)]


def run_sim(cfg: Path, out: Path, rounds: int, timeout_s: float) -> dict:
    whole, other, err = run_child(["run", str(cfg), "--out", str(out), "--quiet"], timeout_s,
                                  out.parent / f"{out.name}.log")
    res: dict = {"whole_s": whole, "other_cores": other, "error": err}
    if err is None:
        summary = json.loads((out / "summary.json").read_text())
        rows = [r for r in read_metrics(out) if r["round"] >= 1]
        res.update(loop_s=summary["loop_time_s"], per_round_s=summary["loop_time_s"] / rounds,
                   curve=[r["test_accuracy"] for r in rows])
    return res


def run_runtime(cfg: Path, out: Path, timeout_s: float) -> dict:
    whole, other, err = run_child(["launch", str(cfg), "--out", str(out)], timeout_s,
                                  out.parent / f"{out.name}.log")
    res: dict = {"whole_s": whole, "other_cores": other, "error": err}
    if err is None:
        summary = json.loads((out / "summary.json").read_text())
        rows = read_metrics(out)
        times = {int(r["round"]): r["sim_time_s"] for r in rows}
        diffs = [times[r] - times[r - 1] for r in sorted(times) if r >= 2 and r - 1 in times]
        last = rows[-1]
        res.update(startup_s=times.get(0), round1_s=times[1] - times[0] if 0 in times and 1 in times
                   else None, per_round_s=median(diffs), server_wall_s=summary["wall_time_s"],
                   bytes_up=int(last["bytes_up"]), bytes_down=int(last["bytes_down"]),
                   curve=[r["test_accuracy"] for r in rows if r["round"] >= 1])
    return res


def _progress(run: dict) -> str:
    if run["error"]:
        return run["error"]
    return (f"{run['whole_s']:.1f} s, {run['per_round_s']:.3f} s/round, "
            f"other processes used {run['other_cores']:.2f} cores")


def part1(nodes: int, rounds: int, repeats: int, timeout_s: float) -> dict:
    sims, rts = [], []
    with tempfile.TemporaryDirectory(prefix="gossamer-overhead-") as tmp:
        tmp_path = Path(tmp)
        cfg = tmp_path / "config.yaml"
        write_config(cfg, nodes, rounds)
        for rep in range(repeats):
            s = run_sim(cfg, tmp_path / f"sim-{rep}", rounds, timeout_s)
            sims.append(s)
            print(f"  repeat {rep + 1}/{repeats} sim: " + _progress(s), file=sys.stderr,
                  flush=True)
            r = run_runtime(cfg, tmp_path / f"runtime-{rep}", timeout_s)
            rts.append(r)
            print(f"  repeat {rep + 1}/{repeats} runtime: " + _progress(r), file=sys.stderr,
                  flush=True)

    def med(runs: list[dict], key: str) -> float | None:
        return median([x.get(key) for x in runs if x["error"] is None])

    sim_ok = [x for x in sims if x["error"] is None]
    rt_ok = [x for x in rts if x["error"] is None]
    res = {
        "sim_per_round_s": med(sims, "per_round_s"), "sim_loop_s": med(sims, "loop_s"),
        "sim_whole_s": med(sims, "whole_s"),
        "runtime_per_round_s": med(rts, "per_round_s"), "runtime_round1_s": med(rts, "round1_s"),
        "runtime_startup_s": med(rts, "startup_s"), "runtime_server_wall_s": med(rts, "server_wall_s"),
        "runtime_whole_s": med(rts, "whole_s"),
        "runtime_bytes_up": rt_ok[0]["bytes_up"] if rt_ok else None,
        "runtime_bytes_down": rt_ok[0]["bytes_down"] if rt_ok else None,
        "sim_per_round_runs": [x.get("per_round_s") for x in sims],
        "runtime_per_round_runs": [x.get("per_round_s") for x in rts],
        "sim_whole_runs": [x["whole_s"] for x in sims],
        "runtime_whole_runs": [x["whole_s"] for x in rts],
        "other_cores_max": max((x["other_cores"] for x in sims + rts
                                if x["other_cores"] is not None), default=None),
        "errors": [x["error"] for x in sims + rts if x["error"]],
        "sim_curve": sim_ok[0]["curve"] if sim_ok else None,
        "runtime_curve": rt_ok[0]["curve"] if rt_ok else None,
    }
    s, r = res["sim_per_round_s"], res["runtime_per_round_s"]
    res["overhead_per_round_s"] = r - s if s is not None and r is not None else None
    res["per_round_ratio"] = r / s if s and r is not None else None
    curves = [x["curve"] for x in sim_ok + rt_ok]
    if sim_ok and rt_ok and all(len(c) == len(curves[0]) for c in curves):
        res["max_acc_diff"] = max(abs(a - b) for c in curves for a, b in zip(c, curves[0], strict=True))
    else:
        res["max_acc_diff"] = None
    return res


# ---------------------------------------------------------------- part 2: transport


def _measure_chunk(grpc, x, numel: int, chunk: int, sends: int, repeats: int) -> dict:
    from gossamer.runtime.codec import Limits, model_frames, read_raw_model

    payload = numel * 4
    limits = Limits(max_message_bytes=64 << 20)
    options = [("grpc.max_receive_message_length", chunk + FRAME_OVERHEAD),
               ("grpc.max_send_message_length", chunk + FRAME_OVERHEAD)]
    received: list = []

    def push(request_iterator, context):
        _meta, tensor = read_raw_model(request_iterator, expected_numel=numel, limits=limits)
        received[:] = [tensor]
        return b"ok"

    def encode() -> list[bytes]:
        return [f.SerializeToString() for f in model_frames(x, chunk_bytes=chunk)]

    server = grpc.server(ThreadPoolExecutor(4), options=options)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "bench.Sink", {"Push": grpc.stream_unary_rpc_method_handler(push)})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=options)
    call = channel.stream_unary("/bench.Sink/Push")

    def send() -> None:
        if call(iter(encode()), timeout=120) != b"ok":
            raise RuntimeError("bad reply")

    times: dict[str, list[float]] = {"send": [], "rpc": [], "encode": [], "decode": []}
    try:
        frames = encode()
        for _ in range(2):  # warm-up; also checks that the bytes arrive intact
            send()
        if not received or not x.equal(received[0]):
            raise RuntimeError("received tensor differs from the one sent")
        jobs = {"send": send,
                "rpc": lambda: call(iter(frames), timeout=120),
                "encode": encode,
                "decode": lambda: read_raw_model(iter(frames), expected_numel=numel,
                                                 limits=limits)}
        for _ in range(repeats):
            for name, job in jobs.items():
                for _ in range(sends):
                    t0 = time.perf_counter()
                    job()
                    times[name].append(time.perf_counter() - t0)
    finally:
        channel.close()
        server.stop(grace=None).wait()
    wire = sum(len(f) for f in frames)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"chunk_bytes": chunk, "frames": len(frames), "wire_bytes": wire,
            "payload_bytes": payload, "overhead_pct": 100 * (wire - payload) / payload,
            **{f"{k}_s": v for k, v in med.items()},
            **{f"{k}_mib_s": payload / MiB / v for k, v in med.items()}}


def part2(model_mb: float, sends: int, repeats: int) -> dict:
    import grpc  # imported only after every child process has been started and reaped
    import torch

    numel = int(model_mb * MiB) // 4
    x = torch.randn(numel, generator=torch.Generator().manual_seed(0))
    rows = [_measure_chunk(grpc, x, numel, chunk, sends, repeats) for chunk in CHUNKS]
    return {"model_mib": numel * 4 / MiB, "numel": numel, "sends": sends, "rows": rows}


# ---------------------------------------------------------------- report


def fmt(v: float | None, spec: str = ".3f", unit: str = "") -> str:
    return "n/a" if v is None else f"{v:{spec}}{unit}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model-mb", type=float, default=10.0, help="transport model size, MiB")
    ap.add_argument("--sends", type=int, default=10, help="timed sends per chunk size and repeat")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per child process")
    ap.add_argument("--skip-fl", action="store_true", help="transport measurement only")
    ap.add_argument("--skip-transport", action="store_true", help="FL measurement only")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.rounds < 2:
        ap.error("--rounds must be at least 2 (round 1 is warm-up)")

    out: dict = {"nodes": a.nodes, "rounds": a.rounds, "repeats": a.repeats}
    if not a.skip_fl:
        print(f"FedAvg, MNIST-5k, {a.nodes} clients, {a.rounds} rounds, {a.repeats} repeats "
              "(sim and runtime interleaved, each a fresh process)", flush=True)
        p1 = part1(a.nodes, a.rounds, a.repeats, a.timeout)
        out["fl"] = p1
        print(f"\n{'':34}{'sim':>10}{'runtime':>10}")
        print(f"{'per round s (median)':34}{fmt(p1['sim_per_round_s']):>10}"
              f"{fmt(p1['runtime_per_round_s']):>10}   runtime: rounds 2..{a.rounds}")
        print(f"{'  each repeat':34}" + "   ".join(
            "/".join(fmt(v) for v in p1[f"{w}_per_round_runs"]) for w in ("sim", "runtime")))
        print(f"{'round 1 s (warm-up)':34}{'':>10}{fmt(p1['runtime_round1_s']):>10}")
        print(f"{'start-up s (all clients joined)':34}{'':>10}{fmt(p1['runtime_startup_s']):>10}")
        print(f"{'FL loop s / server wall s':34}{fmt(p1['sim_loop_s'], '.2f'):>10}"
              f"{fmt(p1['runtime_server_wall_s'], '.2f'):>10}")
        print(f"{'whole process s':34}{fmt(p1['sim_whole_s'], '.2f'):>10}"
              f"{fmt(p1['runtime_whole_s'], '.2f'):>10}")
        sc, rc = p1["sim_curve"], p1["runtime_curve"]
        print(f"{'final accuracy':34}{fmt(sc[-1] if sc else None, '.4f'):>10}"
              f"{fmt(rc[-1] if rc else None, '.4f'):>10}")
        print(f"\noverhead per round: {fmt(p1['overhead_per_round_s'], '.3f', ' s')}  "
              f"(runtime / sim per round: {fmt(p1['per_round_ratio'], '.1f', 'x')})")
        diff = p1["max_acc_diff"]
        verdict = "n/a" if diff is None else ("equal" if diff == 0 else f"DIFFER by {diff:.4g}")
        print(f"accuracy curves (all runs, every round): {verdict}")
        if p1["runtime_bytes_up"] is not None:
            print(f"runtime bytes up / down over the run: {p1['runtime_bytes_up'] / MiB:.1f} / "
                  f"{p1['runtime_bytes_down'] / MiB:.1f} MiB")
        busy = p1["other_cores_max"]
        if busy is not None and busy > BUSY_CORES:
            print(f"warning: other processes used up to {busy:.2f} cores during a run; "
                  "timings are noisy (see the per-repeat lines on stderr)")
        for e in p1["errors"]:
            print(f"error: {e}")
    if not a.skip_transport:
        p2 = part2(a.model_mb, a.sends, a.repeats)
        out["transport"] = p2
        print(f"\nTransport: {p2['model_mib']:.1f} MiB float32 model, loopback gRPC stream-unary, "
              f"median of {a.sends} x {a.repeats} after 2 warm-up sends")
        print(f"{'chunk':>7}{'frames':>7}{'wire overhead':>15}"
              f"{'send':>15}{'rpc only':>15}{'encode':>15}{'decode':>15}")
        for r in p2["rows"]:
            cells = "".join(f"{r[k + '_s'] * 1e3:7.1f}ms{r[k + '_mib_s']:6.0f}"
                            for k in ("send", "rpc", "encode", "decode"))
            print(f"{r['chunk_bytes'] >> 10:>5}Ki{r['frames']:>7}"
                  f"{r['wire_bytes'] - r['payload_bytes']:>8d} B{r['overhead_pct']:6.3f}%" + cells)
        print("(each time column: median ms and MiB/s of model bytes; send = encode + RPC + "
              "server read_raw_model; rpc only = pre-encoded frames; wire = serialized protobuf "
              "frames, gRPC/HTTP-2 framing not counted)")
    if a.json:
        print(json.dumps(out))
    return 1 if out.get("fl", {}).get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
