"""How much of a client's training data a count-sketched gradient still reveals (issue 18).

Song et al., "Sketching for First Order Method: Efficient Algorithm for Low-Bandwidth Channel
and Vulnerability", ICML 2023 (arXiv:2210.08371), point out that sketching a gradient does not
hide the data it was computed on. This measures it for the simplest attack: a client's
gradient on one MNIST-5k image at the initial 784-64-10 MLP (4,000 clients of one training image each), count-sketched as FetchSGD's
clients upload it (`countsketch`, 5 rows, --ratio of the model's size). The server unsketches
the estimate of every coordinate and reads the image off the first layer: for one sample the
gradient of a first-layer unit ``j`` is ``delta_j x`` for its weights and ``delta_j`` for its bias,
so ``x = grad W[j] / grad b[j]`` for the unit whose bias estimate is largest. Printed per
sketch size: the mean cosine similarity of the recovered image to the true one over
--samples images, against two guesses made without the gradient (the data set's mean image,
and another image of the same data set), and the same with FetchSGD's heavy hitters only
(``density``: the receiver keeps the largest 1% of the estimates).

Usage: python benchmarks/sketch_leakage.py [--samples 50] [--ratios 1,0.3,0.1,0.03,0.01] [--json]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of ``[N, D]`` tensors (0 where a row is zero)."""
    num = (a * b).sum(1)
    den = a.norm(dim=1) * b.norm(dim=1)
    return torch.where(den > 0, num / den.clamp_min(1e-30), torch.zeros_like(num))


def recover(grads: torch.Tensor, spec) -> torch.Tensor:
    """The input each row of ``grads`` ``[N, P]`` was computed on, read off the first layer."""
    views = spec.views(grads)
    weight, bias = views[spec.names[0]], views[spec.names[1]]      # [N, H, D], [N, H]
    unit = bias.abs().argmax(dim=1)
    rows = torch.arange(len(grads))
    scale = bias[rows, unit]
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    return torch.where((scale == 0)[:, None], torch.zeros_like(weight[:, 0]),
                       weight[rows, unit] / safe[:, None])


def recover_rank_one(grads: torch.Tensor, spec) -> torch.Tensor:
    """The same, using that the first layer's gradient for one sample is the outer product
    ``delta x^T``: the top singular pair of the (noisy) weight gradient ``[H, D]``, signed and
    scaled by the bias gradient ``delta``. Averages the sketch's noise over the layer's units."""
    views = spec.views(grads)
    weight, bias = views[spec.names[0]], views[spec.names[1]]
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)        # [N, H, K], [N, K], [N, K, D]
    left = u[:, :, 0] * s[:, :1]                                     # ~ delta * |x|
    sign = torch.sign((left * bias).sum(1, keepdim=True))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    scale = (left * bias).sum(1, keepdim=True).abs() / (bias * bias).sum(1, keepdim=True).clamp_min(1e-30)
    return sign * scale * vh[:, 0]


def measure(samples: int, ratios: list[float], seed: int = 0, dataset: str = "mnist5k",
            clients: int = 4000, hidden: int = 64) -> dict:
    """The table below for ``samples`` clients of one image each (of ``clients``)."""
    from gossamer import config
    from gossamer.compression import build_compressor
    from gossamer.experiment import build
    from gossamer.protocols.upload import upload_keys

    cfg = config.validate({"name": "leakage", "seed": seed, "data": {"dataset": dataset},
                           "partition": {"name": "iid", "num_nodes": clients},   # one image each
                           "model": {"name": "mlp", "params": {"hidden": [hidden]}}})
    exp = build(cfg, population=False)
    trainer, spec = exp.trainer, exp.spec
    nodes = np.arange(samples)
    grads, _ = trainer.full_gradient(exp.init_params.reshape(1, -1).expand(samples, -1).contiguous(), nodes)
    x = trainer.x[torch.from_numpy(trainer.shards[nodes, 0])].reshape(samples, -1).float()
    everything = trainer.x.reshape(len(trainer.x), -1).float()
    baseline = {
        "mean_image": float(cosine(everything.mean(0).expand(samples, -1), x).mean()),
        "another_image": float(cosine(x.roll(1, dims=0), x).mean()),
        "exact_gradient": float(cosine(recover(grads, spec), x).mean()),
        "exact_gradient_rank_one": float(cosine(recover_rank_one(grads, spec), x).mean()),
    }
    rows = []
    keys = upload_keys(nodes, 1)
    for ratio in ratios:
        row = {"ratio": ratio}
        for label, params in (("all", {}), ("heavy_hitters_1pct", {"density": 0.01})):
            sketch = build_compressor("countsketch", {"rows": 5, "ratio": ratio, **params})
            enc = sketch.compress(grads, seed=seed, keys=keys)
            estimate = sketch.decompress(enc)
            row[label] = float(cosine(recover(estimate, spec), x).mean())
            row[label + "_rank_one"] = float(cosine(recover_rank_one(estimate, spec), x).mean())
            row["bytes"] = int(enc.nbytes[0])
        rows.append(row)
    return {"samples": samples, "numel": spec.numel, "gradient_bytes": 4 * spec.numel,
            "baseline": baseline, "sketches": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--ratios", default="1,0.3,0.1,0.03,0.01")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    report = measure(args.samples, [float(r) for r in args.ratios.split(",")], args.seed)
    b = report["baseline"]
    print(f"{report['samples']} MNIST-5k images, one gradient each ({report['gradient_bytes']:,} bytes); "
          f"cosine similarity of the recovered image to the true one")
    print(f"  from the exact gradient {b['exact_gradient']:.3f}; guesses without it: the mean "
          f"image {b['mean_image']:.3f}, another image {b['another_image']:.3f}")
    print("  sketch ratio   bytes   every estimate (one unit / rank one)   heavy hitters 1% (one unit / rank one)")
    for r in report["sketches"]:
        print(f"  {r['ratio']:11g}  {r['bytes']:7,}   {r['all']:6.3f} / {r['all_rank_one']:.3f}"
              f"                    {r['heavy_hitters_1pct']:6.3f} / {r['heavy_hitters_1pct_rank_one']:.3f}")
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
