"""Layer-wise adaptive top-k densities chosen by dynamic programming, after L-GreCo.

Markov, Alimohammadi, Frantar, et al. 2024, "L-GreCo: Layerwise-adaptive gradient
compression for efficient data-parallel deep learning", MLSys 2024, arXiv:2210.17357. Given
per-layer options (here top-k densities), pick one per layer minimizing total bytes subject
to total squared error <= the error of a uniform reference density, by a knapsack DP over
discretized errors.

Differences from the paper: the choice is made per row (each sender from its own vector, so a
row's bytes never depend on the batch) and at every call, not periodically from accumulated
gradients shared by all workers; it is written into each payload's header.
"""

from __future__ import annotations

import numpy as np
import torch

import gossamer.compression._bits as _bits
from gossamer.compression.base import (
    COMPRESSORS,
    Compressor,
    Encoded,
    as_density,
    as_int,
    check_batch,
    k_of,
    row_keys,
)


def choose_assignment(errors: torch.Tensor, costs: torch.Tensor, budget: torch.Tensor,
                      bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, one option per layer minimizing total cost with total error <= budget.

    ``errors [N, L, C]`` (>= 0), ``costs [L, C]``, ``budget [N]``. Errors are discretized in
    units of ``budget / bins`` rounded *up*, so every assignment the DP accepts truly meets the
    budget, and every assignment with error <= ``budget - L * unit`` is considered (the DP is
    exact when errors are multiples of the unit). A zero budget admits only zero-error options.
    Returns ``(choice [N, L] long, feasible [N] bool)``; cost ties go to the smaller error.
    Cost O(L C N bins) in tensor ops; the loops run over layers and options, not rows.
    """
    n, layers, options = errors.shape
    budget = budget.double()
    unit = torch.where(budget > 0, budget / bins, torch.ones_like(budget))
    units = torch.ceil(errors.double().clamp_min(0) / unit[:, None, None])
    units = units.clamp_(max=bins + 1).long()
    limit = torch.where(budget > 0, bins, 0)
    cols = torch.arange(bins + 1, device=errors.device).expand(n, bins + 1)
    inf = torch.tensor(float("inf"), dtype=torch.float64, device=errors.device)
    dp = torch.where(cols == 0, 0.0, inf)
    choice = torch.zeros(layers, n, bins + 1, dtype=torch.uint8, device=errors.device)
    costs = costs.double()
    for layer in range(layers):
        best = torch.full_like(dp, float("inf"))
        arg = torch.zeros(n, bins + 1, dtype=torch.uint8, device=errors.device)
        for c in range(options):
            src = cols - units[:, layer, c:c + 1]
            cand = torch.where(src >= 0, dp.gather(1, src.clamp_min(0)), inf) + costs[layer, c]
            better = cand < best
            best, arg = torch.where(better, cand, best), torch.where(better, c, arg)
        dp, choice[layer] = best, arg
    total = torch.where(cols <= limit[:, None], dp, inf)
    best_cost, j = total.min(dim=1)  # first minimum: the smallest error among equal costs
    out = torch.zeros(n, layers, dtype=torch.long, device=errors.device)
    for layer in reversed(range(layers)):
        c = choice[layer].gather(1, j[:, None]).long()[:, 0]
        out[:, layer] = c
        j = (j - units[:, layer].gather(1, c[:, None])[:, 0]).clamp_min(0)
    return out, torch.isfinite(best_cost)


@COMPRESSORS.register("lgreco")
class LGreCo(Compressor):
    """Per-layer top-k whose densities are chosen per row and call by :func:`choose_assignment`.

    Params: ``spec`` (the model's ``ParamSpec``; each parameter is a layer), ``density`` (the
    uniform reference whose total error is the budget), ``candidates`` (densities; the option
    list is ``sorted(set(candidates) | {density})``, at most 255), ``bins`` (DP resolution).
    Per row: layer ``l`` at density ``d`` keeps its ``k_of(d, n_l)`` largest ``|x|`` (stable
    sort: ties to the lower index); error = squared norm of what is dropped; the DP result is
    used when it is feasible, truly within the budget and strictly cheaper than the uniform
    reference, else the reference. Wire: one ``u8`` option index per layer, then per layer a
    sparse block (bitmap or int32 indices, the smaller, then float32 values); counts are
    implied by the options.
    """

    name = "lgreco"
    needs_spec = True

    def __init__(self, spec, density: float = 0.01, candidates=None, bins: int = 1000) -> None:
        self.spec = spec
        self.density = as_density("density", density)
        if candidates is None:
            candidates = [min(1.0, self.density * 2.0**e) for e in range(-3, 4)]
        cands = [as_density("candidates", c) for c in candidates]
        self.options = sorted(set(cands) | {self.density})
        if len(self.options) > 255:
            raise ValueError(f"lgreco takes at most 255 options, got {len(self.options)}")
        self.reference = self.options.index(self.density)
        self.bins = as_int("bins", bins, lo=1, hi=100_000)
        self.sizes = [int(np.prod(s)) for s in spec.shapes]
        self.ks = [[k_of(d, n) if n else 0 for d in self.options] for n in self.sizes]
        self.costs = torch.tensor([[_bits.block_bytes(k, n) for k in ks]
                                   for ks, n in zip(self.ks, self.sizes, strict=True)],
                                  dtype=torch.float64)

    def _check_numel(self, numel: int) -> None:
        if numel != self.spec.numel:
            raise ValueError(f"lgreco was built for {self.spec.numel} parameters, got {numel}")

    def compress(self, x, *, seed=0, keys=None):
        check_batch(x)
        self._check_numel(x.shape[1])
        row_keys(x, keys)
        n = x.shape[0]
        errors = torch.zeros(n, len(self.sizes), len(self.options), dtype=torch.float64,
                             device=x.device)
        orders = []
        for layer, (off, size) in enumerate(zip(self.spec.offsets, self.sizes, strict=True)):
            sq, order = x[:, off:off + size].double().square().sort(dim=1, descending=True,
                                                                    stable=True)
            orders.append(order)
            if not size:
                continue
            cums = sq.cumsum(dim=1)
            kept = cums[:, torch.tensor(self.ks[layer], device=x.device) - 1]
            errors[:, layer] = (cums[:, -1:] - kept).clamp_min(0)
        costs = self.costs.to(x.device)
        budget = errors[:, :, self.reference].sum(dim=1)
        choice, feasible = choose_assignment(errors, costs, budget, self.bins)
        layer_ix = torch.arange(len(self.sizes), device=x.device)
        chosen_err = errors.gather(2, choice[:, :, None])[:, :, 0].sum(dim=1)
        use = feasible & (chosen_err <= budget) & (
            costs[layer_ix, choice].sum(dim=1) < costs[:, self.reference].sum())
        choice = torch.where(use[:, None], choice, self.reference)
        mask = torch.zeros_like(x, dtype=torch.bool)
        for layer, (off, size) in enumerate(zip(self.spec.offsets, self.sizes, strict=True)):
            k = torch.tensor(self.ks[layer], device=x.device)[choice[:, layer]]
            ranked = torch.arange(size, device=x.device)[None, :] < k[:, None]
            mask[:, off:off + size] = torch.zeros_like(ranked).scatter_(1, orders[layer], ranked)
        nbytes = len(self.sizes) + costs[layer_ix, choice].sum(dim=1)
        err = errors.gather(2, choice[:, :, None])[:, :, 0].sum(dim=1)
        return Encoded({"values": torch.where(mask, x, 0.0), "mask": mask, "choice": choice,
                        "error": err, "budget": budget},
                       nbytes.cpu().numpy().astype(np.int64), x.shape[1])

    def decompress(self, enc):
        return enc.parts["values"].clone()

    def to_bytes(self, enc, row):
        choice = enc.parts["choice"][row].cpu().numpy()
        mask, values = enc.parts["mask"][row].cpu().numpy(), enc.parts["values"][row].cpu().numpy()
        chunks = [choice.astype(np.uint8).tobytes()]
        for off, size in zip(self.spec.offsets, self.sizes, strict=True):
            idx = np.flatnonzero(mask[off:off + size])
            chunks.append(_bits.pack_block(idx, values[off:off + size][idx], size))
        return b"".join(chunks)

    def from_bytes(self, data, numel, *, seed=0, key=0):
        self._check_numel(numel)
        layers = len(self.sizes)
        if len(data) < layers:
            raise ValueError(f"lgreco payload of {len(data)} bytes is shorter than its header")
        choice = np.frombuffer(data[:layers], dtype=np.uint8).astype(np.int64)
        if choice.size and choice.max() >= len(self.options):
            raise ValueError(f"lgreco payload chooses option {choice.max()} of "
                             f"{len(self.options)}")
        expected = layers + int(sum(self.costs[i, c] for i, c in enumerate(choice)))
        if len(data) != expected:
            raise ValueError(f"lgreco payload has {len(data)} bytes, its header implies "
                             f"{expected}")
        out = torch.zeros(numel, dtype=torch.float32)
        at, view = layers, memoryview(data)
        for i, (off, size) in enumerate(zip(self.spec.offsets, self.sizes, strict=True)):
            k = self.ks[i][choice[i]]
            end = at + _bits.block_bytes(k, size)
            idx, vals = _bits.unpack_block(view[at:end], k, size)
            out[off + torch.from_numpy(idx)] = torch.from_numpy(vals)
            at = end
        return out
