"""CNN FedAvg on the CPU: Gossamer's loop against a sequential PyTorch loop (and pfl), same run.

Usage: python benchmarks/cnn_fedavg.py [--models cnn,cnn_fedavg] [--data mnist,cifar]
                                       [--clients 100] [--rounds 3] [--repeats 1] [--json]

Workloads (issue 15): each model on MNIST-5k images (1x28x28) and on CIFAR-shaped data
(3x32x32, the `random` dataset: no download here), K clients, 50% of them per round, one local
epoch of batch 10, lr 0.05. Ways, each in its own fresh process, interleaved per repeat:
  gossamer    `gossamer.api.run` of the config, as a user runs it (its loop time from summary.json)
  sequential  plain PyTorch: one nn.Module, each selected client in turn with torch.optim.SGD,
              then the sample-weighted average; the same init, client selection and mini-batches
              (taken from Gossamer's experiment builder, outside the timed loop), so the test
              losses must agree to float rounding
  pfl         Apple's pfl-research (`SimulatedBackend`, `FederatedAveraging`, a central SGD
              step of 1, `WeightByDatapoints`), when installed; skipped with a note otherwise.
              Its user sampler yields Gossamer's selection and each user's dataset holds the
              rows of Gossamer's mini-batches in order, so its losses must agree too
Every way runs with the same glibc allocator settings (BASELINES.md): with ``--allocator tuned``
(the default) each child process raises glibc's mmap and trim thresholds as Gossamer does
(``gossamer.sim.allocator``; without it every large activation is fresh pages, which made
small convolutions 2-3x slower here), with ``--allocator default`` none does.
Every way evaluates the global model on the test set before the first round (Gossamer's
round-0 row of metrics.csv) and after every round; the loop times count those evaluations. With --json the last
stdout line is one JSON object: per workload the loop times, final test loss and accuracy of
each way, `<workload>_<way>_speedup` = that way's median loop time / Gossamer's, and
`<workload>_<way>_speedup_runs` the same ratio repeat by repeat (each run against the Gossamer
run beside it).

The hardware bound, measured in the same run (in a child of its own): the workload's
floating-point work (`<workload>_gflop`: torch's FlopCounterMode over one training step of each
mini-batch size the run takes, times how often it takes it, plus the test set's forward pass
before the first round and after each; convolutions and matrix products, which are nearly all of it), and this machine's
peak (`peak_gflops`: the better rate of two float32 kernels with the threads the ways use,
each the best of five: a 2048x2048 matrix product, `matmul_gflops`, and the FedAvg CNN's
second convolution (5x5, 32 -> 64 channels, 14x14) on 64, 256 or 1,000 images, the best of
the three, `conv_gflops`, which can run faster than the product on this CPU). Each way's rate is `<workload>_<way>_gflops` = work / loop time; a way `s` times
faster than the sequential loop would need `s` x its rate, which the table compares with the
peak: a speed-up that needs more than the peak is above what this CPU can do. A tighter bound,
`<workload>_bound_s`: the loop time if each convolution's training ran per client at the fastest
exact form measured here (the layer-by-layer executor's strategies, timed forward and backward
on a round's cohort at the run's batch size) and all other work at the peak;
`<workload>_<way>_bound_speedup` = that way's loop time / the bound, the most any loop of
exact per-client convolutions could reach against it in this run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = {
    "mnist": {"dataset": "mnist5k", "params": {"image": True}},
    "cifar": {"dataset": "random", "params": {"shape": [3, 32, 32], "train": 4000, "test": 1000}},
}


def config(model: str, data: str, clients: int, rounds: int) -> dict:
    return {
        "name": f"cnn-{model}-{data}", "seed": 0,
        "data": DATA[data],
        "partition": {"name": "iid", "num_nodes": clients},
        "model": {"name": model},
        "algorithm": {"name": "fedavg", "params": {"client_fraction": 0.5, "weighting": "samples"}},
        "local": {"epochs": 1, "batch_size": 10, "lr": 0.05},
        "stop": {"rounds": rounds},
        "eval": {"every": 1},
        "output": {"progress": False, "checkpoint_every": 0},
    }


# ------------------------------------------------------------------------------ the children
def run_gossamer(cfg: dict) -> dict:
    from gossamer.api import run

    with tempfile.TemporaryDirectory() as tmp:
        summary = run(cfg, out=Path(tmp) / "run").summary
    return {"loop_s": summary["loop_time_s"], "test_loss": summary["final_test_loss"],
            "test_accuracy": summary["final_test_accuracy"],
            "forward": {**summary["forward"], **({"low_rank": "+".join(summary["low_rank_layers"])}
                                                 if summary.get("low_rank_layers") else {})}}


def run_sequential(cfg: dict, evaluate_every_round: bool = True) -> dict:
    """Plain PyTorch on the config's ``device`` (the CPU by default): one nn.Module, each
    selected client in turn with torch.optim.SGD, then the weighted average; the same init,
    selection and mini-batches as Gossamer's run. The test set before the first round (as
    Gossamer's round-0 row) and, with ``evaluate_every_round``, after every round (else after
    the last only; benchmarks/gpu.py)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from gossamer import config as config_mod
    from gossamer.experiment import build
    from gossamer.models import build_model
    from gossamer.protocols.sync_fl import SyncRound

    c = config_mod.validate(cfg)
    exp = build(c)
    device = exp.device
    trainer, spec, algo = exp.trainer, exp.spec, exp.algorithm
    model = build_model(c.model.name, exp.dataset.input_shape, exp.dataset.num_classes, c.seed,
                        **c.model.params).to(device)
    x, y = trainer.x, trainer.y
    x_test, y_test = exp.dataset.x_test.to(device), exp.dataset.y_test.to(device)
    params = list(model.parameters())
    global_row = exp.init_params.reshape(-1).clone()
    candidates = np.flatnonzero(trainer.sizes > 0)
    opt = torch.optim.SGD(params, lr=c.local.lr)        # plain SGD keeps no state: one for all
    loss = acc = None

    def evaluate() -> tuple[float, float]:
        logits = model(x_test)
        return (F.cross_entropy(logits, y_test).item(),              # .item() synchronizes a GPU
                (logits.argmax(1) == y_test).float().mean().item())

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with torch.no_grad():
        loss, acc = evaluate()           # the initial model, as Gossamer's round 0 row
    for r in range(1, c.stop.rounds + 1):
        ids = SyncRound(algo, c.seed, r, candidates).selected
        idx, valid = trainer.batches(ids, np.full(len(ids), r))
        weights = algo.mean_weights(trainer.sizes[ids]).tolist()
        summed = [torch.zeros_like(p) for p in params]
        for b in range(len(ids)):
            spec.load_into(model, global_row)
            for t in range(idx.shape[1]):
                take = torch.from_numpy(idx[b, t][valid[b, t]]).to(device)
                if len(take) == 0:
                    continue
                opt.zero_grad()
                F.cross_entropy(model(x[take]), y[take]).backward()
                opt.step()
            with torch.no_grad():
                for s, p in zip(summed, params, strict=True):
                    s.add_(p, alpha=weights[b])
        with torch.no_grad():
            for p, s in zip(params, summed, strict=True):
                p.copy_(s)
            global_row = spec.flatten(model).to(device)
            if evaluate_every_round or r == c.stop.rounds:
                loss, acc = evaluate()
    return {"loop_s": time.perf_counter() - start, "test_loss": loss, "test_accuracy": acc}


def run_pfl(cfg: dict) -> dict:
    from collections import deque

    import numpy as np
    import torch
    import torch.nn.functional as F
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.aggregate.weighting import WeightByDatapoints
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.callback.base import TrainingProcessCallback
    from pfl.data.dataset import Dataset
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
    from pfl.metrics import Metrics, Weighted
    from pfl.model.pytorch import PyTorchModel

    from gossamer import config as config_mod
    from gossamer.experiment import build
    from gossamer.models import build_model
    from gossamer.protocols.sync_fl import SyncRound

    c = config_mod.validate(cfg)
    exp = build(c)
    trainer, algo = exp.trainer, exp.algorithm
    x, y = trainer.x, trainer.y
    x_test, y_test = exp.dataset.x_test, exp.dataset.y_test
    candidates = np.flatnonzero(trainer.sizes > 0)
    if len(set(trainer.sizes[candidates].tolist())) != 1:
        raise SystemExit("pfl way: needs equal shards (pfl weights by rows, Gossamer's plan here too)")
    order, rows = [], {}                # Gossamer's selection, and each (round, user)'s batch rows
    for r in range(1, c.stop.rounds + 1):
        ids = SyncRound(algo, c.seed, r, candidates).selected
        idx, valid = trainer.batches(ids, np.full(len(ids), r))
        for b, node in enumerate(ids.tolist()):
            order.append(node)
            rows.setdefault(node, deque()).append(torch.from_numpy(idx[b][valid[b]].reshape(-1)))
    cohort = len(order) // c.stop.rounds
    queue = iter(order)

    def make_dataset(user_id):
        take = rows[user_id].popleft()
        return Dataset(raw_data=[x[take], y[take]], user_id=str(user_id))

    class Module(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, inputs):
            return self.net(inputs)

        def loss(self, inputs, targets, eval=False):  # noqa: A002
            self.eval() if eval else self.train()
            return F.cross_entropy(self(inputs), targets)

        @torch.no_grad()
        def metrics(self, inputs, targets, eval=True):  # noqa: A002
            self.eval() if eval else self.train()
            return {"loss": Weighted(F.cross_entropy(self(inputs), targets, reduction="sum").item(),
                                     len(targets))}

    module = Module(build_model(c.model.name, exp.dataset.input_shape, exp.dataset.num_classes,
                                c.seed, **c.model.params))
    model = PyTorchModel(module, local_optimizer_create=torch.optim.SGD,
                         central_optimizer=torch.optim.SGD(module.parameters(), lr=1.0))
    federated = FederatedDataset(make_dataset, lambda: next(queue),
                                 user_id_to_weight={int(n): int(trainer.sizes[n]) for n in candidates})
    result: dict = {}

    def evaluate() -> None:
        with torch.no_grad():
            module.eval()
            logits = module(x_test)
            result["test_loss"] = F.cross_entropy(logits, y_test).item()
            result["test_accuracy"] = (logits.argmax(1) == y_test).float().mean().item()

    class Evaluate(TrainingProcessCallback):
        def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
            evaluate()
            return False, Metrics()

    backend = SimulatedBackend(training_data=federated, val_data=federated,
                               postprocessors=[WeightByDatapoints()])
    params = NNAlgorithmParams(central_num_iterations=c.stop.rounds,
                               evaluation_frequency=c.stop.rounds + 1,
                               train_cohort_size=cohort, val_cohort_size=0)
    train = NNTrainHyperParams(local_num_epochs=1, local_learning_rate=c.local.lr,
                               local_batch_size=c.local.batch_size)
    torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=1.0).step()   # one-time costs first
    start = time.perf_counter()
    evaluate()                                   # the initial model, as Gossamer's round 0 row
    FederatedAveraging().run(algorithm_params=params, backend=backend, model=model,
                             model_train_params=train,
                             model_eval_params=NNEvalHyperParams(local_batch_size=None),
                             callbacks=[Evaluate()], send_metrics_to_platform=False)
    return {"loop_s": time.perf_counter() - start, **result}


def run_flops(cfg: dict) -> dict:
    """The workload's floating-point operations (see the module) and this machine's peak."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from gossamer import config as config_mod
    from gossamer.experiment import build
    from gossamer.models import build_model
    from gossamer.models.layerwise import CONV_STRATEGIES, _time_conv
    from gossamer.protocols.sync_fl import SyncRound

    c = config_mod.validate(cfg)
    exp = build(c)
    trainer, algo = exp.trainer, exp.algorithm
    model = build_model(c.model.name, exp.dataset.input_shape, exp.dataset.num_classes, c.seed,
                        **c.model.params)
    x, y = trainer.x, trainer.y
    candidates = np.flatnonzero(trainer.sizes > 0)

    def counted(fn) -> int:
        with FlopCounterMode(display=False) as counter:
            fn()
        return int(counter.get_total_flops())

    steps: dict[int, int] = {}                 # mini-batch size -> steps of that size
    for r in range(1, c.stop.rounds + 1):
        ids = SyncRound(algo, c.seed, r, candidates).selected
        _, valid = trainer.batches(ids, np.full(len(ids), r))
        for size in valid.sum(axis=2).reshape(-1).tolist():
            if size:
                steps[int(size)] = steps.get(int(size), 0) + 1
    train = sum(count * counted(lambda b=b: F.cross_entropy(model(x[:b]), y[:b]).backward())
                for b, count in steps.items())
    with torch.no_grad():
        test = counted(lambda: model(exp.dataset.x_test))
    def best_of(fn, flop: float) -> float:
        fn()
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        return flop / best / 1e9

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    matmul = best_of(lambda: a @ b, 2 * 2048 ** 3)
    # oneDNN's convolutions can run faster than its matrix product here: a 5x5, 32 -> 64
    # channel convolution of 14x14 images, forward (the FedAvg CNN's second layer), the best
    # over batches of 64, 256 and 1,000 images (the rate depends on what stays in the caches)
    ws, images = torch.randn(64, 32, 5, 5), {n: torch.randn(n, 32, 14, 14) for n in (64, 256, 1000)}
    with torch.no_grad():
        conv = max(best_of(lambda xs=xs: F.conv2d(xs, ws, padding=2), 2 * n * 14 * 14 * 64 * 32 * 25)
                   for n, xs in images.items())
    tests = c.stop.rounds + 1                              # the initial model's, then each round's
    peak = max(matmul, conv)
    work = (train + tests * test) / 1e9
    # the bound: each convolution trained per client at the fastest exact form measured here
    # (the layer-by-layer executor's strategies on a round's cohort: one grouped convolution,
    # channels-last or one per client), everything else at the peak
    cohort = len(SyncRound(algo, c.seed, 1, candidates).selected)
    node_steps, batch = sum(steps.values()), max(steps)
    conv_s = conv_flop = 0.0
    layers = []
    for name, mod, shape, input_grad in _conv_layers(model, x[:2]):
        best = min(CONV_STRATEGIES, key=lambda s, mod=mod, shape=shape: _time_conv(
            mod, shape, cohort, batch, s, input_grad))
        seconds = min(_time_conv(mod, shape, cohort, batch, best, input_grad) for _ in range(2))
        flop = _conv_flop(mod, shape, cohort * batch, input_grad)
        calls = node_steps / cohort
        conv_s, conv_flop = conv_s + calls * seconds, conv_flop + calls * flop
        layers.append(f"{name} {best} {flop / seconds / 1e9:.0f} GFLOP/s")
    bound = conv_s + (work - conv_flop / 1e9) / peak
    return {"gflop": work, "train_gflop": train / 1e9,
            "peak_gflops": peak, "matmul_gflops": matmul, "conv_gflops": conv,
            "threads": torch.get_num_threads(), "bound_s": bound,
            "bound_conv_gflop": conv_flop / 1e9, "bound_layers": layers}


def _conv_layers(model, sample):
    """(name, module, input shape, whether training needs the input's gradient) of each 2-d
    convolution, in the order the layer-by-layer executor runs them."""
    import torch.fx
    from torch import nn
    from torch.fx.passes.shape_prop import ShapeProp

    gm = torch.fx.symbolic_trace(model)
    ShapeProp(gm).propagate(sample)
    modules = dict(gm.named_modules())
    return [(n.target, modules[n.target], n.args[0].meta["tensor_meta"].shape, n.args[0].op != "placeholder")
            for n in gm.graph.nodes if n.op == "call_module" and isinstance(modules[n.target], nn.Conv2d)]


def _conv_flop(mod, shape, samples, input_grad) -> float:
    """Multiply-adds x 2 of ``mod``'s forward on ``samples`` inputs of ``shape[1:]``, and of its
    backward: the weight's gradient, and the input's where training needs it. (torch's
    FlopCounterMode counts a grouped convolution as if it were not grouped.)"""
    import torch

    with torch.no_grad():
        out = mod(torch.zeros(1, *shape[1:]))
    forward = 2 * samples * out[0].numel() * mod.weight[0].numel()
    return forward * (3 if input_grad else 2)


# ------------------------------------------------------------------------------ the parent
def child(way: str, cfg: dict, timeout: float, allocator: str = "tuned", script: str = __file__) -> dict:
    """``script --child way`` in a fresh process (this file's, or benchmarks/gpu.py's), with
    glibc's settings ``allocator``; its last stdout line, or ``{"error": ...}``."""
    env = dict(os.environ)
    if allocator == "default":
        env["GOSSAMER_NO_MALLOC_TUNING"] = "1"
    else:
        env.pop("GOSSAMER_NO_MALLOC_TUNING", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "src"), env.get("PYTHONPATH")) if p)
    try:
        proc = subprocess.run([sys.executable, script, "--child", way, "--config-json", json.dumps(cfg)],
                              capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="cnn,cnn_fedavg")
    parser.add_argument("--data", default="mnist,cifar")
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--allocator", choices=("tuned", "default"), default="tuned",
                        help="glibc's settings in every way's process: Gossamer's tuning "
                             "(gossamer.sim.allocator) or glibc's defaults")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--config-json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        cfg = json.loads(args.config_json)
        from gossamer.sim.allocator import tune_allocator

        tune_allocator()              # every way alike (a no-op under GOSSAMER_NO_MALLOC_TUNING=1)
        out = {"gossamer": run_gossamer, "sequential": run_sequential, "pfl": run_pfl,
               "flops": run_flops}[args.child](cfg)
        print(json.dumps(out), flush=True)
        return 0

    from gossamer.models import MODELS

    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in MODELS.names()]
    if unknown:
        parser.error(f"--models: unknown {unknown}; registered: {', '.join(MODELS.names())}")
    ways = ["gossamer", "sequential"]
    pfl_note = None
    if importlib.util.find_spec("pfl") is None:
        pfl_note = "pfl: skipped (pfl-research is not installed; pip install 'pfl[pytorch]' beside torch==2.13.0)"
    else:
        ways.append("pfl")
    out: dict[str, object] = {"clients": args.clients, "rounds": args.rounds, "repeats": args.repeats,
                              "cpus": os.cpu_count(), "allocator": args.allocator, "pfl": pfl_note}
    print(f"CNN FedAvg, K={args.clients}, 50% per round, {args.rounds} rounds, {args.repeats} repeat(s), "
          f"allocator: {args.allocator} in every way")
    print(f"{'workload':<22} {'way':<11} {'loop s':>8} {'test loss':>11} {'acc':>7}  path")
    for model in models:
        for data in [d for d in args.data.split(",") if d]:
            cfg = config(model, data, args.clients, args.rounds)
            key = f"{model}_{data}"
            runs: dict[str, list[dict]] = {w: [] for w in ways}
            for _ in range(args.repeats):
                for way in ways:
                    runs[way].append(child(way, cfg, args.timeout, args.allocator))
            loops = {}
            for way in ways:
                ok = [r for r in runs[way] if "error" not in r]
                if not ok:
                    print(f"{key:<22} {way:<11} FAILED: {runs[way][-1]['error']}")
                    out[f"{key}_{way}_error"] = runs[way][-1]["error"]
                    continue
                loops[way] = statistics.median(r["loop_s"] for r in ok)
                last = ok[-1]
                out[f"{key}_{way}_loop_s"] = loops[way]
                out[f"{key}_{way}_loop_runs_s"] = [r["loop_s"] for r in ok]
                out[f"{key}_{way}_test_loss"] = last["test_loss"]
                out[f"{key}_{way}_test_accuracy"] = last["test_accuracy"]
                path = ", ".join(f"{k}={v}" for k, v in last.get("forward", {}).items())
                print(f"{key:<22} {way:<11} {loops[way]:8.2f} {last['test_loss']:11.7f} "
                      f"{last['test_accuracy']:7.4f}  {path}")
            for way in ways[1:]:
                if "gossamer" in loops and way in loops:
                    out[f"{key}_{way}_speedup"] = loops[way] / loops["gossamer"]
                    # and repeat by repeat (BASELINES.md): each run against the Gossamer run
                    # interleaved with it
                    pairs = [p["loop_s"] / g["loop_s"] for g, p in zip(runs["gossamer"], runs[way], strict=True)
                             if "error" not in g and "error" not in p]
                    out[f"{key}_{way}_speedup_runs"] = pairs
                    print(f"{key:<22} {way} / gossamer loop: {out[f'{key}_{way}_speedup']:.2f}x "
                          f"(each repeat: {', '.join(f'{x:.2f}x' for x in pairs)})")
            work = child("flops", cfg, args.timeout, args.allocator)
            if "error" in work:
                print(f"{key:<22} flops FAILED: {work['error']}")
                continue
            peak = work["peak_gflops"]
            out[f"{key}_gflop"], out["peak_gflops"] = work["gflop"], peak
            out["matmul_gflops"], out["conv_gflops"] = work["matmul_gflops"], work["conv_gflops"]
            print(f"{key:<22} work {work['gflop']:.1f} GFLOP ({work['train_gflop']:.1f} training); "
                  f"peak {peak:.0f} GFLOP/s ({work['threads']} threads; the better of a 2048x2048 "
                  f"matmul, {work['matmul_gflops']:.0f}, and a 5x5 convolution, {work['conv_gflops']:.0f})")
            for way, loop in loops.items():
                rate = work["gflop"] / loop
                out[f"{key}_{way}_gflops"] = rate
                print(f"{key:<22} {way:<11} {rate:6.1f} GFLOP/s = {rate / peak:5.1%} of peak")
            if "sequential" in loops:
                need = 2 * work["gflop"] / loops["sequential"]
                print(f"{key:<22} 2x the sequential loop needs {need:.0f} GFLOP/s = "
                      f"{need / peak:.2f}x peak")
            out[f"{key}_bound_s"] = work["bound_s"]
            print(f"{key:<22} bound {work['bound_s']:.2f} s: the convolutions' training "
                  f"({work['bound_conv_gflop']:.0f} GFLOP) per client at the fastest exact form "
                  f"measured ({'; '.join(work['bound_layers'])}), the rest at peak")
            for way, loop in loops.items():
                if way != "gossamer":
                    out[f"{key}_{way}_bound_speedup"] = loop / work["bound_s"]
                    print(f"{key:<22} {way} / bound: {loop / work['bound_s']:.2f}x (the most any "
                          f"loop of exact per-client convolutions reaches against this run's {way} loop)")
    if pfl_note:
        print(pfl_note)
    if args.json:
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
