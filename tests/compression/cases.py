"""Shared fixtures of the compression tests: a small layered spec and one config per case."""

import math

from gossamer.models.functional import ParamSpec


def make_spec(shapes) -> ParamSpec:
    names = tuple(f"p{i}" for i in range(len(shapes)))
    offsets, total = [], 0
    for shape in shapes:
        offsets.append(total)
        total += math.prod(shape)
    return ParamSpec(names, tuple(tuple(s) for s in shapes), tuple(offsets), total)


# A conv-like 4-D weight, a bias, a dense weight, a bias, a scalar: 83 + 1 + 54 = 138.
SPEC = make_spec([(8, 6), (8,), (3, 8), (3,), (), (3, 2, 3, 3)])
P = SPEC.numel

# (name, params) for every registered compressor, several settings each.
CASES = [
    ("none", {}),
    ("topk", {"density": 0.05}),             # int32 indices
    ("topk", {"density": 0.5}),              # bitmap
    ("topk", {"k": 3}),
    ("randk", {"density": 0.1}),
    ("randk", {"density": 0.3, "scale": False}),
    ("threshold", {"tau": 1.0}),
    ("qsgd", {"levels": 4}),
    ("qsgd", {"levels": 1}),
    ("qsgd", {"levels": 7, "coding": "elias"}),
    ("quantize", {"bits": 3}),
    ("quantize", {"bits": 8, "stochastic": False}),
    ("quantize", {"bits": 16}),
    ("quantize", {"bits": 1}),
    ("sign", {}),
    ("powersgd", {"rank": 1}),
    ("powersgd", {"rank": 2}),
    ("lgreco", {"density": 0.1}),
    ("lgreco", {"density": 0.3, "candidates": [0.05, 0.6, 1.0], "bins": 50}),
    ("rqm", {"c": 1.0, "levels": 5, "q": 0.4, "extension": 0.5}),   # 3-bit indices
    ("rqm", {"c": 0.5, "levels": 2, "q": 1.0}),                       # endpoints only, 1 bit
    ("rqm", {"c": 2.0, "levels": 256, "q": 0.1, "extension": 0.0}),   # 8-bit indices
    ("countsketch", {"rows": 5, "columns": 16}),                      # every estimate
    ("countsketch", {"rows": 4, "ratio": 0.5, "k": 10}),              # even rows, heavy hitters
    ("countsketch", {"rows": 1, "columns": 200, "density": 0.1}),     # one row: ties in a bucket
]
