import itertools

import torch

from gossamer.compression import LGreCo, choose_assignment
from gossamer.compression._bits import block_bytes
from tests.compression.cases import make_spec


def brute_force(errors, costs, budget):
    """Cheapest assignment with total error <= budget: (cost, error) or None."""
    layers, options = costs.shape
    best = None
    for pick in itertools.product(range(options), repeat=layers):
        err = sum(float(errors[i, c]) for i, c in enumerate(pick))
        cost = sum(float(costs[i, c]) for i, c in enumerate(pick))
        if err <= budget and (best is None or cost < best[0]):
            best = (cost, err)
    return best


def totals(errors, costs, choice):
    layers = torch.arange(costs.shape[0])
    return (errors[torch.arange(errors.shape[0])[:, None], layers, choice].sum(dim=1),
            costs[layers, choice].sum(dim=1))


def test_dp_is_optimal_when_errors_are_whole_units():
    gen = torch.Generator().manual_seed(0)
    rows, layers, options = 40, 4, 3
    errors = torch.randint(0, 8, (rows, layers, options), generator=gen).double()
    costs = torch.randint(1, 30, (layers, options), generator=gen).double()
    budget = torch.randint(0, 20, (rows,), generator=gen).double()
    for i in range(rows):
        bins = max(1, int(budget[i]))  # unit = 1: the discretization is exact
        choice, feasible = choose_assignment(errors[i:i + 1], costs, budget[i:i + 1], bins)
        best = brute_force(errors[i], costs, float(budget[i]))
        assert bool(feasible[0]) == (best is not None)
        if best is not None:
            err, cost = totals(errors[i:i + 1], costs, choice)
            assert float(cost[0]) == best[0]
            assert float(err[0]) <= float(budget[i])


def test_dp_with_real_errors_respects_the_budget_and_is_near_optimal():
    gen = torch.Generator().manual_seed(1)
    rows, layers, options, bins = 30, 3, 4, 200
    errors = torch.rand(rows, layers, options, generator=gen, dtype=torch.float64) * 5
    costs = torch.randint(1, 50, (layers, options), generator=gen).double()
    budget = errors[:, :, 1].sum(dim=1)  # a feasible reference: option 1 everywhere
    choice, feasible = choose_assignment(errors, costs, budget, bins)
    err, cost = totals(errors, costs, choice)
    for i in range(rows):
        assert err[i] <= budget[i] * (1 + 1e-12)
        # Every assignment with error <= budget - L * unit was considered.
        slack = brute_force(errors[i], costs, float(budget[i]) * (1 - layers / bins))
        if slack is not None:
            assert feasible[i] and cost[i] <= slack[0]


def test_zero_budget_admits_only_exact_options():
    errors = torch.tensor([[[0.0, 1.0, 0.0], [2.0, 0.0, 0.0]]])
    costs = torch.tensor([[9.0, 1.0, 5.0], [1.0, 7.0, 3.0]])
    choice, feasible = choose_assignment(errors, costs, torch.zeros(1), 100)
    assert feasible[0] and choice[0].tolist() == [2, 2]


def test_lgreco_choices_meet_the_budget_and_beat_uniform():
    spec = make_spec([(16, 8), (16,), (4, 16), (4,)])
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6, spec.numel, generator=gen)
    x[:, :128] *= torch.rand(6, 128, generator=gen) ** 8   # one layer with a few large entries
    c = LGreCo(spec, density=0.25, candidates=[0.05, 0.125, 0.5, 1.0], bins=400)
    enc = c.compress(x)
    out = c.decompress(enc)
    reference = len(spec.names) + int(c.costs[:, c.reference].sum())
    assert (enc.nbytes <= reference).all() and (enc.nbytes < reference).any()
    assert (enc.parts["error"] <= enc.parts["budget"]).all()
    sq = (x - out).double().square().sum(dim=1)
    assert torch.allclose(sq, enc.parts["error"], rtol=1e-5)
    # Each layer keeps exactly its chosen k largest magnitudes.
    for layer, (off, size) in enumerate(zip(spec.offsets, c.sizes, strict=True)):
        for row in range(6):
            k = c.ks[layer][int(enc.parts["choice"][row, layer])]
            block, got = x[row, off:off + size], out[row, off:off + size]
            assert int((got != 0).sum()) == k
            top = block.abs().topk(k).values.min()
            assert (block.abs()[got != 0] >= top).all()
    # Bytes: the header plus each layer's sparse block at its chosen k.
    for row in range(6):
        ks = [c.ks[i][int(enc.parts["choice"][row, i])] for i in range(4)]
        assert enc.nbytes[row] == 4 + sum(block_bytes(k, n) for k, n in zip(ks, c.sizes,
                                                                            strict=True))


def test_lgreco_is_never_worse_than_brute_force_with_slack():
    spec = make_spec([(6, 5), (5,), (2, 7)])
    x = torch.randn(4, spec.numel, generator=torch.Generator().manual_seed(3))
    c = LGreCo(spec, density=0.3, candidates=[0.1, 0.6, 1.0], bins=1000)
    enc = c.compress(x)
    errors = torch.zeros(4, 3, len(c.options), dtype=torch.float64)
    for layer, (off, size) in enumerate(zip(spec.offsets, c.sizes, strict=True)):
        sq = x[:, off:off + size].double().square().sort(dim=1, descending=True).values
        for j, k in enumerate(c.ks[layer]):
            errors[:, layer, j] = sq[:, k:].sum(dim=1)
    for row in range(4):
        budget = float(enc.parts["budget"][row])
        best = brute_force(errors[row], c.costs, budget * (1 - 3 / 1000))
        assert enc.nbytes[row] - 3 <= best[0]
        assert float(enc.parts["error"][row]) <= budget


def test_lgreco_rejects_bad_headers():
    spec = make_spec([(6, 5), (5,)])
    c = LGreCo(spec, density=0.3, candidates=[0.1, 1.0])
    data = c.to_bytes(c.compress(torch.randn(1, spec.numel)), 0)
    for bad in (bytes([7]) + data[1:], data[:1], bytes([2, 2]) + data[2:]):
        try:
            c.from_bytes(bad, spec.numel)
        except ValueError:
            continue
        raise AssertionError(f"accepted {bad!r}")
