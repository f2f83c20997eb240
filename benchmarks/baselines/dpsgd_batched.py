"""D-PSGD hand-vectorized: every node's MLP as stacked weights, bmm, the backward written out,
in-place updates, and one sparse product per layer for the mixing, into reused buffers.

Usage: python benchmarks/baselines/dpsgd_batched.py [--nodes 1000] [--rounds 20]
The setup comes from Gossamer's experiment builder, outside the timed loop, so both run the
same computation: `examples/dpsgd_1000.yaml`'s data, shards, graph and Metropolis-Hastings
weights, initial model, every round's mini-batches and the evaluated nodes. The loop itself is
plain PyTorch: per round one local epoch on every node (batches as wide as the node's data),
then X <- W X layer by layer; every `eval.every` rounds the evaluated nodes' and the average
model's test accuracy. Prints one JSON line: loop seconds, the final mean accuracy of the
evaluated nodes, peak memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()

    from gossamer import config
    from gossamer.sim.drivers.sync_dl import SyncDLDriver
    from gossamer.sim.experiment import build_experiment

    cfg = config.load("examples/dpsgd_1000.yaml", [f"partition.num_nodes={args.nodes}",
                                                   f"stop.rounds={args.rounds}"])
    exp = build_experiment(cfg)
    eval_nodes = torch.from_numpy(SyncDLDriver(exp).eval_nodes)
    trainer, n, lr = exp.trainer, exp.num_nodes, cfg.local.lr
    mixing = exp.mixing                                              # sparse CSR [N, N]
    views = exp.spec.views(exp.init_params.reshape(1, -1).expand(n, -1))
    w1, b1, w2, b2 = (views[k].contiguous() for k in ("net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"))
    layers = [w1, b1, w2, b2]
    spare = [torch.empty_like(p) for p in layers]
    x, y, x_test, y_test = trainer.x, trainer.y, exp.dataset.x_test, exp.dataset.y_test
    nodes = np.arange(n)
    accuracy = None

    start = time.perf_counter()
    with torch.no_grad():
        for r in range(1, args.rounds + 1):
            idx, valid = trainer.batches(nodes, np.full(n, r))
            weight_all = torch.from_numpy(valid).float()
            weight_all /= weight_all.sum(2, keepdim=True).clamp(min=1)
            for t in range(idx.shape[1]):
                take = torch.from_numpy(np.ascontiguousarray(idx[:, t]))
                xb, yb, weight = x[take], y[take], weight_all[:, t]              # [N, b, 784]
                hidden = torch.baddbmm(b1.unsqueeze(1), xb, w1.transpose(1, 2))
                act = hidden.clamp_min(0.0)
                logits = torch.baddbmm(b2.unsqueeze(1), act, w2.transpose(1, 2))
                grad = torch.softmax(logits, dim=-1)
                grad.scatter_add_(2, yb.unsqueeze(2), torch.full_like(grad[..., :1], -1.0))
                grad.mul_(weight.unsqueeze(2))
                grad_act = torch.bmm(grad, w2).mul_(hidden > 0)
                w2.baddbmm_(grad.transpose(1, 2), act, alpha=-lr)
                b2.sub_(grad.sum(1), alpha=lr)
                w1.baddbmm_(grad_act.transpose(1, 2), xb, alpha=-lr)
                b1.sub_(grad_act.sum(1), alpha=lr)
            for k, p in enumerate(layers):                                  # X <- W X, per layer
                torch.mm(mixing, p.view(n, -1), out=spare[k].view(n, -1))
                layers[k], spare[k] = spare[k], p
            w1, b1, w2, b2 = layers
            if r % cfg.eval.every == 0 or r == args.rounds:
                models = [(w1[i], b1[i], w2[i], b2[i]) for i in eval_nodes.tolist()]
                models.append(tuple(p.mean(0) for p in layers))
                accs = [((torch.addmm(c, torch.addmm(a, x_test, w.t()).clamp_min_(0), v.t())).argmax(1) == y_test)
                        .float().mean().item() for w, a, v, c in models]
                accuracy = float(np.mean(accs[:-1]))
    loop_s = time.perf_counter() - start
    print(json.dumps({"way": "batched", "nodes": n, "rounds": args.rounds, "loop_s": loop_s,
                      "mean_node_acc": accuracy,
                      "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


if __name__ == "__main__":
    main()
