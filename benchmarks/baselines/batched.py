"""MNIST-5k FedAvg hand-vectorized: all K client models as stacked weights, one bmm per layer.

Usage: python benchmarks/baselines/batched.py --clients 100 --rounds 20
Weights are [K, ...] tensors; forward is torch.baddbmm, backward is written by hand (the
gradient of the sum over clients of each client's mean cross-entropy), SGD updates every row
at once, and the server's sample-weighted mean over the rows is broadcast back. Same data,
init and evaluation as the sequential loop, so it must give the same accuracy curve.
Prints one JSON line: loop seconds (start of round 1 to end of last evaluation), accuracy per round.
"""

from __future__ import annotations

import time

import torch
from common import BATCH_SIZE, LR, client_indices, load_data, make_model, parse_args, report


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    x_train, y_train, x_test, y_test = load_data()
    parts = torch.from_numpy(client_indices(args.clients))  # [K, n]
    k, n = parts.shape
    client_x = x_train[parts]  # [K, n, 784]
    client_onehot = torch.nn.functional.one_hot(y_train[parts], 10).to(torch.float32)  # [K, n, 10]
    sizes = torch.full((k,), float(n))
    row_weight = (sizes / sizes.sum()).view(1, k)  # sample weights of FedAvg

    init = make_model()
    # Stacked parameters; weights stored transposed ([in, out]) so forward is x @ w.
    w1 = init[0].weight.detach().t().contiguous().expand(k, -1, -1).contiguous()  # [K, 784, 64]
    b1 = init[0].bias.detach().view(1, 1, -1).expand(k, -1, -1).contiguous()  # [K, 1, 64]
    w2 = init[2].weight.detach().t().contiguous().expand(k, -1, -1).contiguous()  # [K, 64, 10]
    b2 = init[2].bias.detach().view(1, 1, -1).expand(k, -1, -1).contiguous()  # [K, 1, 10]
    params = (w1, b1, w2, b2)

    accuracies: list[float] = []
    start = time.perf_counter()
    with torch.no_grad():
        for _ in range(args.rounds):
            for lo in range(0, n, BATCH_SIZE):
                xb = client_x[:, lo : lo + BATCH_SIZE]  # [K, B, 784]
                yb = client_onehot[:, lo : lo + BATCH_SIZE]
                batch = xb.shape[1]
                hidden = torch.baddbmm(b1, xb, w1)  # [K, B, 64]
                act = hidden.clamp_min(0.0)
                logits = torch.baddbmm(b2, act, w2)  # [K, B, 10]
                # d(mean CE)/d(logits) = (softmax - onehot) / B, per client.
                grad_logits = torch.softmax(logits, dim=-1).sub_(yb).div_(batch)
                grad_act = torch.bmm(grad_logits, w2.transpose(1, 2))  # [K, B, 64]
                grad_hidden = grad_act.mul_(hidden > 0)
                # SGD step on every row at once (w -= lr * grad).
                w2.baddbmm_(act.transpose(1, 2), grad_logits, alpha=-LR)
                b2.sub_(grad_logits.sum(dim=1, keepdim=True), alpha=LR)
                w1.baddbmm_(xb.transpose(1, 2), grad_hidden, alpha=-LR)
                b1.sub_(grad_hidden.sum(dim=1, keepdim=True), alpha=LR)
            # Server: sample-weighted mean over the rows, broadcast back to every row.
            # (A [1, K] x [K, numel] product, so no [K, ...]-sized temporary is allocated.)
            for p in params:
                mean = torch.mm(row_weight, p.view(k, -1)).view(1, *p.shape[1:])
                p.copy_(mean.expand_as(p))
            logits = torch.addmm(b2[0], torch.addmm(b1[0], x_test, w1[0]).clamp_min_(0.0), w2[0])
            accuracies.append((logits.argmax(dim=1) == y_test).float().mean().item())
    loop_s = time.perf_counter() - start
    report("batched", loop_s, accuracies, threads=torch.get_num_threads())


if __name__ == "__main__":
    main()
