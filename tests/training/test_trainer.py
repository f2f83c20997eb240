import numpy as np
import pytest
import torch
from torch import nn

from gossamer.models import ParamSpec, build_model, make_stacked_forward
from gossamer.training.trainer import SGD, BatchedTrainer, LocalSchedule


def _setup(sizes, schedule, opt, seed=0, fused=False):
    g = torch.Generator().manual_seed(0)
    total = sum(sizes)
    x = torch.randn(total, 6, generator=g)
    y = torch.randint(0, 3, (total,), generator=g)
    model = build_model("mlp", (6,), 3, seed=seed, hidden=[5])
    spec = ParamSpec.from_module(model)
    forward = make_stacked_forward(model, spec, x[0])
    bounds = np.cumsum([0, *sizes])
    shards = [np.arange(bounds[i], bounds[i + 1]) for i in range(len(sizes))]
    kernel = model.stacked_kernel if fused else None
    return BatchedTrainer(forward, spec, x, y, shards, schedule, opt, seed=3, kernel=kernel), model, spec, x, y


def _sequential(trainer, model, spec, x, y, rows, nodes, key, opt):
    """Reference: each node on its own with torch.optim.SGD, batches from the trainer's schedule."""
    idx, valid = trainer.batches(nodes, np.full(len(nodes), key))
    out = []
    for b in range(len(nodes)):
        spec.load_into(model, rows[b])
        sgd = torch.optim.SGD(model.parameters(), lr=opt.lr, momentum=opt.momentum,
                              weight_decay=opt.weight_decay)
        for t in range(idx.shape[1]):
            take = idx[b, t][valid[b, t]]
            if len(take) == 0:
                continue
            sgd.zero_grad()
            nn.functional.cross_entropy(model(x[take]), y[take]).backward()
            sgd.step()
        out.append(spec.flatten(model))
    return torch.stack(out)


@pytest.mark.parametrize("schedule", [LocalSchedule(4, epochs=1, shuffle=False),
                                      LocalSchedule(3, epochs=2, shuffle=True),
                                      LocalSchedule(4, epochs=None, steps=5, shuffle=True)])
@pytest.mark.parametrize("opt", [SGD(0.1), SGD(0.05, momentum=0.9, weight_decay=1e-3),
                                 SGD(0.1, weight_decay=1e-2)])
@pytest.mark.parametrize("fused", [False, True], ids=["autograd", "fused"])
def test_batched_training_equals_sequential(schedule, opt, fused):
    sizes = [8, 5, 11, 0, 3]
    trainer, model, spec, x, y = _setup(sizes, schedule, opt, fused=fused)
    assert (trainer.kernel is not None) == (fused and opt.momentum == 0)
    nodes = np.arange(len(sizes))
    rows = torch.randn(len(sizes), spec.numel) * 0.3
    result = trainer.train(rows, nodes, keys=7)
    ref = _sequential(trainer, model, spec, x, y, rows, nodes, 7, opt)
    assert torch.allclose(result.params, ref, atol=1e-5)
    assert torch.equal(result.params[3], rows[3])          # a node without data does not move


def test_epoch_schedule_covers_each_sample_once_per_epoch():
    trainer, *_ = _setup([7, 10, 4], LocalSchedule(3, epochs=2, shuffle=True), SGD(0.1))
    idx, valid = trainer.batches(np.arange(3), np.zeros(3, dtype=np.int64))
    for node, size in enumerate([7, 10, 4]):
        seen = np.sort(idx[node][valid[node]])
        start = sum([7, 10, 4][:node])
        assert np.array_equal(seen, np.repeat(np.arange(start, start + size), 2))
    assert list(valid.any(axis=2).sum(axis=1)) == [6, 8, 4]    # 2 * ceil(size / 3) steps


def test_shuffle_depends_on_key_and_node_not_on_batch_composition():
    trainer, *_ = _setup([9, 9, 9], LocalSchedule(3, epochs=1, shuffle=True), SGD(0.1))
    a, _ = trainer.batches(np.array([0, 1, 2]), np.array([5, 5, 5]))
    b, _ = trainer.batches(np.array([1]), np.array([5]))
    c, _ = trainer.batches(np.array([1]), np.array([6]))
    assert np.array_equal(a[1], b[0])                          # per-node stream
    assert not np.array_equal(b[0], c[0])                      # fresh shuffle per key


def test_unshuffled_order_is_consecutive():
    trainer, *_ = _setup([8], LocalSchedule(4, epochs=1, shuffle=False), SGD(0.1))
    idx, valid = trainer.batches(np.array([0]), np.array([0]))
    assert idx[0].tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]] and valid.all()


@pytest.mark.parametrize("fused", [False, True], ids=["autograd", "fused"])
@pytest.mark.parametrize("schedule", [LocalSchedule(4, epochs=1), LocalSchedule(2, epochs=2)])
def test_inplace_training_equals_copying_training(fused, schedule):
    trainer, _, spec, *_ = _setup([8, 5, 6], schedule, SGD(0.1), fused=fused)
    rows = torch.randn(3, spec.numel) * 0.3
    copied = trainer.train(rows, np.arange(3), keys=2)
    target = rows.clone()
    result = trainer.train(target, np.arange(3), keys=2, inplace=True)
    assert result.params is target and torch.equal(target, copied.params)
    assert not torch.equal(rows, copied.params)                # the input was not modified


def _sequential_objective(trainer, model, spec, x, y, rows, nodes, key, opt, objective, steps=None):
    """Reference for LocalObjective: per node, step w -= lr * (s g + wd w + mu (w - a) + c)."""
    idx, valid = trainer.batches(nodes, np.full(len(nodes), key), steps)
    anchor = objective.anchor.reshape(-1, spec.numel).expand(len(nodes), -1) \
        if objective.anchor is not None else None
    corr = objective.correction.reshape(-1, spec.numel).expand(len(nodes), -1) \
        if objective.correction is not None else None
    out = []
    for b in range(len(nodes)):
        w = rows[b].clone()
        for t in range(idx.shape[1]):
            take = idx[b, t][valid[b, t]]
            if len(take) == 0:
                continue
            spec.load_into(model, w)
            model.zero_grad()
            nn.functional.cross_entropy(model(x[take]), y[take]).backward()
            g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
            d = objective.grad_scale * g + opt.weight_decay * w
            if objective.prox_mu:
                d = d + objective.prox_mu * (w - anchor[b])
            if corr is not None:
                d = d + corr[b]
            w = w - opt.lr * d
        out.append(w)
    return torch.stack(out)


@pytest.mark.parametrize("fused", [False, True], ids=["autograd", "fused"])
@pytest.mark.parametrize("kind", ["prox", "correction_rows", "scaled_shared_correction", "all"])
def test_local_objective_terms_equal_reference(fused, kind):
    from gossamer.algorithms.local import LocalObjective

    sizes = [8, 5, 11, 0, 3]
    opt = SGD(0.1, weight_decay=1e-3)
    trainer, model, spec, x, y = _setup(sizes, LocalSchedule(3, epochs=2), opt, fused=fused)
    n = len(sizes)
    g = torch.Generator().manual_seed(4)
    rows = torch.randn(n, spec.numel, generator=g) * 0.3
    anchor = torch.randn(spec.numel, generator=g) * 0.3
    corr_rows = torch.randn(n, spec.numel, generator=g) * 0.1
    objective = {
        "prox": LocalObjective(prox_mu=0.5, anchor=anchor),
        "correction_rows": LocalObjective(correction=corr_rows),
        "scaled_shared_correction": LocalObjective(grad_scale=0.7, correction=corr_rows[0]),
        "all": LocalObjective(prox_mu=0.2, anchor=rows.flip(0), correction=corr_rows, grad_scale=0.9),
    }[kind]
    result = trainer.train(rows, np.arange(n), keys=2, objective=objective)
    ref = _sequential_objective(trainer, model, spec, x, y, rows, np.arange(n), 2, opt, objective)
    assert torch.allclose(result.params, ref, atol=1e-5)
    assert torch.equal(result.params[3], rows[3])        # no data: no step, so no extra term either


@pytest.mark.parametrize("fused", [False, True], ids=["autograd", "fused"])
def test_per_node_step_counts(fused):
    from gossamer.algorithms.local import LocalObjective

    sizes = [8, 5, 11, 6]
    opt = SGD(0.1)
    trainer, model, spec, x, y = _setup(sizes, LocalSchedule(3, epochs=1), opt, fused=fused)
    rows = torch.randn(4, spec.numel) * 0.3
    steps = np.array([1, 4, 0, 7])
    result = trainer.train(rows, np.arange(4), keys=1, steps=steps)
    assert list(result.steps) == [1, 4, 0, 7]
    assert list(result.samples) == [3, 12, 0, 21]
    ref = _sequential_objective(trainer, model, spec, x, y, rows, np.arange(4), 1, opt,
                                LocalObjective(), steps)
    assert torch.allclose(result.params, ref, atol=1e-5)
    assert torch.equal(result.params[2], rows[2])
    # a node's batches do not depend on the others' step counts
    alone = trainer.train(rows[1:2], np.array([1]), keys=1, steps=np.array([4]))
    assert torch.allclose(alone.params[0], result.params[1], atol=1e-6)


def _grad(model, spec, w, xb, yb):
    spec.load_into(model, w)
    model.zero_grad()
    nn.functional.cross_entropy(model(xb), yb).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("fused", [False, True], ids=["autograd", "fused-model"])
def test_recursive_direction_equals_fedamd_miner_reference(fused):
    """FedAMD's miner (authors' code): d starts at v; each step on batch b adds
    g(w; b) - g(w_prev; b), then w -= lr d."""
    from gossamer.algorithms.local import LocalObjective

    sizes = [8, 5, 11, 0]
    opt = SGD(0.1)
    trainer, model, spec, x, y = _setup(sizes, LocalSchedule(3, epochs=1), opt, fused=fused)
    rows = torch.randn(4, spec.numel) * 0.3
    v = torch.randn(spec.numel) * 0.05
    result = trainer.train(rows, np.arange(4), keys=3, objective=LocalObjective(recursive_direction=v))
    idx, valid = trainer.batches(np.arange(4), np.full(4, 3))
    for b in range(4):
        w, prev, d = rows[b].clone(), rows[b].clone(), v.clone()
        for t in range(idx.shape[1]):
            take = idx[b, t][valid[b, t]]
            if len(take) == 0:
                continue
            d = d + _grad(model, spec, w, x[take], y[take]) - _grad(model, spec, prev, x[take], y[take])
            prev, w = w, w - 0.1 * d
        assert torch.allclose(result.params[b], w, atol=1e-5)
    assert torch.equal(result.params[3], rows[3])


def test_full_gradient_is_the_mean_loss_gradient_over_the_shard():
    sizes = [8, 5, 11]
    trainer, model, spec, x, y = _setup(sizes, LocalSchedule(3, epochs=1), SGD(0.1))
    rows = torch.randn(3, spec.numel) * 0.3
    grads, loss = trainer.full_gradient(rows[:2], np.array([2, 0]))
    for k, node in enumerate([2, 0]):
        shard = trainer.shards[node, : sizes[node]]
        assert torch.allclose(grads[k], _grad(model, spec, rows[k], x[shard], y[shard]), atol=1e-6)


@pytest.mark.parametrize("fused", [False, True], ids=["autograd", "fused"])
@pytest.mark.parametrize("schedule", [LocalSchedule(4, epochs=1, shuffle=True),      # 1-3 steps
                                      LocalSchedule(2, epochs=2, shuffle=True)])     # up to 12
def test_mean_of_trained_rows_without_the_rows(fused, schedule):
    """FedAvg's dense round: ``mean_weights`` returns the weighted mean of the rows the same
    call would have returned, taken from the parameter-major leaves, and no rows at all."""
    sizes = [8, 5, 11, 0, 3, 7]
    trainer, _, spec, *_ = _setup(sizes, schedule, SGD(0.1), fused=fused)
    nodes = np.array([0, 1, 2, 3, 4, 5])
    start = torch.randn(spec.numel) * 0.3
    weights = torch.tensor([8.0, 5, 11, 0, 3, 7]) / 34
    rows = trainer.train(start.expand(len(nodes), -1), nodes, keys=4)
    only = trainer.train(start.expand(len(nodes), -1), nodes, keys=4, mean_weights=weights)
    assert only.params is None and only.mean.shape == (spec.numel,)
    assert torch.allclose(only.mean, weights @ rows.params, atol=1e-6)
    assert not torch.equal(only.mean, start)                   # it trained
    assert torch.equal(only.loss, rows.loss) and np.array_equal(only.steps, rows.steps)
    assert np.array_equal(only.samples, rows.samples)
    again = trainer.train(start.expand(len(nodes), -1), nodes, keys=4, mean_weights=weights)
    assert torch.equal(again.mean, only.mean)                  # reused buffers: deterministic


def test_gathered_batches_are_not_aliased_between_steps():
    """The fused path gathers each step's inputs into one reused buffer; training many steps
    must still equal the sequential reference (a stale or overwritten batch would not)."""
    sizes = [9, 4, 12]
    opt = SGD(0.1)
    schedule = LocalSchedule(2, epochs=2, shuffle=True)
    trainer, model, spec, x, y = _setup(sizes, schedule, opt, fused=True)
    nodes = np.arange(3)
    rows = torch.randn(3, spec.numel) * 0.3
    first = trainer.train(rows, nodes, keys=1).params
    smaller = trainer.train(rows[:1], nodes[:1], keys=1).params   # a smaller call in between
    ref = _sequential(trainer, model, spec, x, y, rows, nodes, 1, opt)
    assert torch.allclose(first, ref, atol=1e-5)
    assert torch.allclose(smaller[0], ref[0], atol=1e-5)


@pytest.mark.parametrize("opt", [SGD(0.1), SGD(0.1, weight_decay=1e-2)], ids=["sgd", "decay"])
@pytest.mark.parametrize("prox", [0.0, 0.5], ids=["plain", "prox"])
def test_a_broadcast_start_trains_exactly_like_its_copies(opt, prox):
    """Rows that all start from one model are not copied before the fused kernel's first step
    (it reads the shared model and writes the blocks): bit for bit the same as training the
    materialized copies, with weight decay and an objective's terms."""
    from gossamer.algorithms.local import LocalObjective

    sizes = [8, 5, 11, 0, 3]
    trainer, _, spec, *_ = _setup(sizes, LocalSchedule(2, epochs=2, shuffle=True), opt, fused=True)
    nodes = np.arange(len(sizes))
    start = torch.randn(spec.numel) * 0.3
    objective = LocalObjective(prox, start) if prox else None
    shared = trainer.train(start.expand(len(nodes), -1), nodes, keys=2, objective=objective)
    copied = trainer.train(start.expand(len(nodes), -1).clone(), nodes, keys=2, objective=objective)
    assert torch.equal(shared.params, copied.params) and torch.equal(shared.loss, copied.loss)
    assert torch.equal(shared.params[3], start)              # no data: the start, untouched


def test_batches_are_no_wider_than_the_largest_shard():
    """Nodes that hold fewer samples than a batch train in one batch of their shard's size,
    not padded to batch_size (D-PSGD at N = 1000 holds 4 samples per node, batch 10)."""
    opt = SGD(0.1)
    trainer, model, spec, x, y = _setup([4, 3, 4], LocalSchedule(10, epochs=2, shuffle=True), opt, fused=True)
    nodes = np.arange(3)
    idx, valid = trainer.batches(nodes, np.full(3, 1))
    assert idx.shape == (3, 2, 4) and valid.sum(axis=(1, 2)).tolist() == [8, 6, 8]
    rows = torch.randn(3, spec.numel) * 0.3
    ref = _sequential(trainer, model, spec, x, y, rows, nodes, 1, opt)
    assert torch.allclose(trainer.train(rows, nodes, keys=1).params, ref, atol=1e-5)


@pytest.mark.parametrize("mode", ["rows", "inplace", "mean", "objective_rows", "steps"])
def test_training_in_node_chunks_equals_one_pass(monkeypatch, mode):
    """Autograd training of large models goes a few nodes at a time (chunk_nodes); every
    node's result, the mean, losses and counts are those of one pass over all nodes."""
    from gossamer.algorithms.local import LocalObjective

    sizes = [8, 5, 11, 0, 3, 7, 6]
    trainer, _, spec, *_ = _setup(sizes, LocalSchedule(3, epochs=1, shuffle=True), SGD(0.1))
    nodes = np.arange(len(sizes))
    rows = torch.randn(len(sizes), spec.numel) * 0.3
    kw = {}
    if mode == "objective_rows":
        kw["objective"] = LocalObjective(0.3, rows[0], correction=torch.randn(len(sizes), spec.numel) * 0.01)
    if mode == "steps":
        kw["steps"] = np.array([1, 2, 0, 3, 1, 2, 2])
    weights = torch.tensor(sizes, dtype=torch.float32) / sum(sizes)
    whole = trainer.train(rows.clone(), nodes, keys=3, **kw)
    monkeypatch.setattr(trainer, "chunk_bytes", 3 * spec.numel * 4 * 2)     # two nodes a pass
    assert trainer.chunk_nodes == 2
    if mode == "mean":
        parts = trainer.train(rows.clone(), nodes, keys=3, mean_weights=weights)
        assert parts.params is None
        assert torch.allclose(parts.mean, weights @ whole.params, atol=1e-6)
    else:
        target = rows.clone()
        parts = trainer.train(target, nodes, keys=3, inplace=mode == "inplace", **kw)
        assert torch.allclose(parts.params, whole.params, atol=1e-6)
        if mode == "inplace":
            assert parts.params is target
    assert torch.allclose(parts.loss, whole.loss) and np.array_equal(parts.steps, whole.steps)
    assert np.array_equal(parts.samples, whole.samples)


@pytest.mark.parametrize("mean", [False, True], ids=["rows", "mean"])
def test_fused_training_in_workspace_sized_chunks_equals_one_pass(monkeypatch, mean):
    """The fused kernel's parameter-major workspace is bounded (workspace_bytes): a larger
    call trains in chunks, with each node's result and the mean those of one pass."""

    sizes = [8, 5, 11, 0, 3, 7, 6]
    trainer, _, spec, *_ = _setup(sizes, LocalSchedule(2, epochs=2, shuffle=True), SGD(0.1), fused=True)
    nodes = np.arange(len(sizes))
    start = torch.randn(spec.numel) * 0.3
    weights = torch.tensor(sizes, dtype=torch.float32) / sum(sizes)
    whole = trainer.train(start.expand(len(nodes), -1), nodes, keys=3)
    monkeypatch.setattr(trainer, "workspace_bytes", spec.numel * 4 * 3)       # three nodes a pass
    parts = trainer.train(start.expand(len(nodes), -1), nodes, keys=3, mean_weights=weights if mean else None)
    if mean:
        assert torch.allclose(parts.mean, weights @ whole.params, atol=1e-6)
    else:
        assert torch.allclose(parts.params, whole.params, atol=1e-6)
    assert torch.allclose(parts.loss, whole.loss) and np.array_equal(parts.steps, whole.steps)


@pytest.mark.parametrize("case", ["rows", "in_rows", "mean"])
def test_fused_training_a_few_nodes_at_a_time_equals_every_node_at_once(monkeypatch, case):
    """On a CPU the fused kernel takes a few nodes through all their steps before the next
    few (their weights stay in the cache): each node's bits are those of stepping every node
    together, in the workspace, in the given rows, and for the mean."""
    import gossamer.training.trainer as trainer_module

    sizes = [8, 5, 11, 0, 3, 7, 6]
    schedule = LocalSchedule(4, steps=2) if case == "in_rows" else LocalSchedule(2, epochs=2, shuffle=True)
    trainer, _, spec, *_ = _setup(sizes, schedule, SGD(0.1, weight_decay=0.01), fused=True)
    nodes = np.arange(len(sizes))
    start = torch.randn(spec.numel) * 0.3
    weights = torch.tensor(sizes, dtype=torch.float32) / sum(sizes)
    mean = weights if case == "mean" else None
    runs = {}
    two = spec.numel * 4 * 2 // torch.get_num_threads() + 1     # per thread: two nodes a block
    for cache in (1 << 30, two):
        monkeypatch.setattr(trainer_module, "CACHE_BYTES", cache)
        runs[cache] = trainer.train(start.expand(len(nodes), -1), nodes, keys=3, mean_weights=mean)
    (_, whole), (_, parts) = runs.items()
    assert trainer._cache_nodes(len(nodes), 2) == 2 and trainer._cache_nodes(len(nodes), 1) == len(nodes)
    if case == "mean":
        assert torch.equal(parts.mean, whole.mean)
    else:
        assert torch.equal(parts.params, whole.params)
    assert torch.equal(parts.loss, whole.loss) and np.array_equal(parts.steps, whole.steps)


def test_grouped_means_are_each_groups_own_and_need_no_rows():
    """``mean_groups``: one weighted sum per group (the sharded simulator's blocks), each
    trained in a workspace of its own rows and summed from it; a group's sum has the same bits
    when its nodes are trained in another call (what makes sharded sums rank-count-free)."""
    sizes = [8, 5, 11, 0, 3, 7, 6]
    trainer, _, spec, *_ = _setup(sizes, LocalSchedule(2, epochs=2, shuffle=True), SGD(0.1), fused=True)
    nodes = np.arange(len(sizes))
    start = torch.randn(spec.numel) * 0.3
    weights = torch.tensor(sizes, dtype=torch.float32) / sum(sizes)
    groups = np.array([0, 3, 4, 7])
    rows = trainer.train(start.expand(len(nodes), -1), nodes, keys=3).params
    got = trainer.train(start.expand(len(nodes), -1), nodes, keys=3, mean_weights=weights, mean_groups=groups)
    assert got.params is None and got.mean.shape == (3, spec.numel)
    for g, (a, b) in enumerate(zip(groups[:-1], groups[1:], strict=True)):
        assert torch.allclose(got.mean[g], weights[a:b] @ rows[a:b], atol=1e-6)
        alone = trainer.train(start.expand(b - a, -1), nodes[a:b], keys=3, mean_weights=weights[a:b],
                              mean_groups=np.array([0, b - a]))
        assert torch.equal(alone.mean[0], got.mean[g]) and torch.equal(alone.loss, got.loss[a:b])


def test_a_group_trains_and_is_summed_in_equal_spans_that_fit_the_cache(monkeypatch):
    """A mean group larger than the cache budget trains and is summed span by span (equal
    spans of at most ``CACHE_BYTES`` of weights, fixed by the group's size and the model): the
    group's sum is still its rows' weighted sum, and the same bits as the group trained alone."""
    import gossamer.training.trainer as trainer_module

    sizes = [8, 5, 11, 2, 3, 7, 6]
    trainer, _, spec, *_ = _setup(sizes, LocalSchedule(2, epochs=2, shuffle=True), SGD(0.1), fused=True)
    monkeypatch.setattr(trainer_module, "CACHE_BYTES", 3 * spec.numel * 4)      # 3 rows of float32
    assert trainer._group_spans(0, 7, 4) == [(0, 2), (2, 4), (4, 7)]           # equal, at most 3
    assert trainer._group_spans(4, 7, 4) == [(4, 7)]
    nodes = np.arange(len(sizes))
    start = torch.randn(spec.numel, generator=torch.Generator().manual_seed(1)) * 0.3
    weights = torch.tensor(sizes, dtype=torch.float32) / sum(sizes)
    rows = trainer.train(start.expand(len(nodes), -1), nodes, keys=3).params
    got = trainer.train(start.expand(len(nodes), -1), nodes, keys=3, mean_weights=weights,
                        mean_groups=np.array([0, 7]))
    assert torch.allclose(got.mean[0], weights @ rows, atol=1e-6)
    split = trainer.train(start.expand(len(nodes), -1), nodes, keys=3, mean_weights=weights,
                          mean_groups=np.array([0, 4, 7]))
    assert torch.allclose(split.mean.sum(0), got.mean[0], atol=1e-6)
    alone = trainer.train(start.expand(3, -1), nodes[4:], keys=3, mean_weights=weights[4:],
                          mean_groups=np.array([0, 3]))
    assert torch.equal(alone.mean[0], split.mean[1])


def test_kept_round_inputs_are_reused_only_for_the_same_plan(monkeypatch):
    """The fused path gathers a call's inputs at once and keeps them for the next call with
    the same plan (no shuffling). A different plan (here also one of the same shape), or a
    call whose inputs exceed
    inputs_bytes (gathered step by step into the same storage), must not read stale inputs:
    every call equals a trainer that never kept anything."""

    sizes = [9, 4, 8, 6]
    opt = SGD(0.1)
    schedule = LocalSchedule(3, epochs=2, shuffle=False)
    trainer, *_ = _setup(sizes, schedule, opt, fused=True)
    fresh = lambda: _setup(sizes, schedule, opt, fused=True)[0]     # noqa: E731
    rows = torch.randn(len(sizes), trainer.spec.numel) * 0.3
    trainer.reserve(np.arange(len(sizes)))
    calls = [np.arange(4), np.arange(4), np.array([0, 1]), np.array([2, 3]), np.arange(4)]
    for nodes in calls:
        got = trainer.train(rows[nodes], nodes, keys=1)
        assert torch.equal(got.params, fresh().train(rows[nodes], nodes, keys=1).params)
    kept = trainer._inputs
    assert kept is not None
    trainer.train(rows, np.arange(4), keys=7)                       # keys change nothing here
    assert trainer._inputs is kept
    monkeypatch.setattr(trainer, "inputs_bytes", 0)             # now step by step
    smaller = trainer.train(rows[:2], np.arange(2), keys=1)
    assert trainer._inputs is None
    monkeypatch.setattr(trainer, "inputs_bytes", 64 << 20)
    again = trainer.train(rows, np.arange(4), keys=1)
    assert torch.equal(again.params, fresh().train(rows, np.arange(4), keys=1).params)
    assert torch.equal(smaller.params, fresh().train(rows[:2], np.arange(2), keys=1).params)


@pytest.mark.parametrize("opt", [SGD(0.1), SGD(0.05, momentum=0.9, weight_decay=1e-3)])
def test_frozen_parameters_do_not_move_and_the_others_train_as_torch_does(opt):
    """FedRep's steps: torch.optim.SGD over the unfrozen parameters only, on the same batches."""
    from gossamer.algorithms.local import LocalObjective

    sizes = [8, 5, 11]
    trainer, model, spec, x, y = _setup(sizes, LocalSchedule(3, epochs=2, shuffle=True), opt, fused=True)
    nodes = np.arange(3)
    rows = torch.randn(3, spec.numel) * 0.3
    frozen = ("net.0.weight", "net.0.bias")
    assert set(frozen) < set(spec.names)
    result = trainer.train(rows, nodes, keys=4, objective=LocalObjective(frozen=frozen))
    idx, valid = trainer.batches(nodes, np.full(3, 4))
    for b in range(3):
        spec.load_into(model, rows[b])
        train = [p for name, p in model.named_parameters() if name not in frozen]
        sgd = torch.optim.SGD(train, lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay)
        for t in range(idx.shape[1]):
            take = idx[b, t][valid[b, t]]
            if len(take):
                sgd.zero_grad()
                nn.functional.cross_entropy(model(x[take]), y[take]).backward()
                sgd.step()
        assert torch.allclose(result.params[b], spec.flatten(model), atol=1e-5)
        views = spec.views(result.params[b:b + 1])
        before = spec.views(rows[b:b + 1])
        assert all(torch.equal(views[n], before[n]) for n in frozen)
    with pytest.raises(ValueError, match="not the model's"):
        trainer.train(rows, nodes, keys=4, objective=LocalObjective(frozen=("head.weight",)))


def test_fused_training_in_the_given_rows_also_goes_in_bounded_passes(monkeypatch):
    """One or two local steps update the given rows directly (no workspace), but the gradients
    take as much: a call larger than workspace_bytes also trains in passes (D-PSGD on 10^6
    nodes), each node's result that of one pass."""

    sizes = [8, 5, 11, 0, 3, 7, 6]
    trainer, _, spec, *_ = _setup(sizes, LocalSchedule(2, steps=1, shuffle=True), SGD(0.1), fused=True)
    nodes = np.arange(len(sizes))
    rows = torch.randn(len(nodes), spec.numel) * 0.3
    whole = trainer.train(rows.clone(), nodes, keys=3)
    monkeypatch.setattr(trainer, "workspace_bytes", spec.numel * 4 * 3)       # three nodes a pass
    assert trainer.nodes_per_pass == 3
    target = rows.clone()
    parts = trainer.train(target, nodes, keys=3, inplace=True)
    assert parts.params is target and torch.allclose(target, whole.params, atol=1e-6)
    assert torch.allclose(parts.loss, whole.loss) and np.array_equal(parts.samples, whole.samples)


@pytest.mark.parametrize("case", ["fused_mean", "fused_inplace", "objective", "adamw_state", "broadcast"])
def test_training_rows_from_another_device_equals_training_in_place(case):
    """A runtime process hands the trainer host rows while it computes on a GPU
    (``_train_from_host``: rows, the objective's tensors and the mean's weights go over, the
    result, the trained rows in place and a kept optimizer state come back). Called directly
    here, where both sides are the CPU, every result must equal :meth:`train`'s own."""
    from gossamer.algorithms.local import LocalObjective
    from gossamer.training.trainer import AdamW

    sizes = [8, 5, 11, 3]
    nodes = np.arange(len(sizes))
    opt = AdamW(0.01) if case == "adamw_state" else SGD(0.1)
    trainer, _, spec, *_ = _setup(sizes, LocalSchedule(2, epochs=2, shuffle=True), opt,
                                  fused=case.startswith("fused") or case == "broadcast")
    g = torch.Generator().manual_seed(1)
    rows = torch.randn(len(sizes), spec.numel, generator=g) * 0.3
    if case == "broadcast":
        rows = rows[0].expand(len(sizes), -1)
    kw, state = {}, None
    if case == "fused_mean":
        kw["mean_weights"] = torch.tensor(sizes, dtype=torch.float32) / sum(sizes)
    if case == "objective":
        kw["objective"] = LocalObjective(0.1, rows.clone(), correction=torch.randn(len(sizes), spec.numel, generator=g) * 0.01)
    if case == "adamw_state":
        state = torch.randn(len(sizes), AdamW.state_width(spec.numel), generator=g).abs() * 0.01
        state[:, -1] = 3.0
    inplace = case == "fused_inplace"

    def run(fn, rows):
        objective = kw.get("objective")
        if state is not None:
            objective = LocalObjective(optimizer_state=state.clone())
        target = rows.clone() if inplace else rows
        got = fn(target, nodes, 4, inplace, None, objective, kw.get("mean_weights"), None)
        return got, target, None if objective is None else objective.optimizer_state

    direct, direct_target, direct_state = run(
        lambda p, n, k, i, s, o, w, gr: trainer.train(p, n, k, inplace=i, steps=s, objective=o, mean_weights=w), rows)
    moved, moved_target, moved_state = run(trainer._train_from_host, rows)
    for a, b in ((direct.params, moved.params), (direct.loss, moved.loss), (direct.mean, moved.mean),
                 (direct_state, moved_state)):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b)
    if inplace:
        assert moved.params is moved_target and torch.equal(moved_target, direct_target)
    assert np.array_equal(direct.samples, moved.samples) and np.array_equal(direct.steps, moved.steps)
