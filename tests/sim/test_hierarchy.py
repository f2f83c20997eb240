"""Hierarchical aggregation (protocols/hierarchy.py): the tree, eager forwarding times written
out by hand, the mean summed up the tree, and a FedAvg run equal to the flat one with fewer
bytes on the server's link and shorter rounds when that link is the bottleneck."""

import numpy as np
import pytest
import torch

from gossamer import config, wire
from gossamer.config import ConfigError
from gossamer.protocols.hierarchy import Link, build_tree, downward_s, tree_mean, upward
from gossamer.sim.drivers.sync_fl import SyncFLDriver
from gossamer.sim.experiment import build_experiment
from tests.conftest import run_split, small_config


def test_the_tree_splits_clients_and_aggregators_into_contiguous_runs():
    tree = build_tree([2, 6], [Link(0, 1), Link(0, 1)], 30, "contiguous", 0)
    assert tree.parents[0].tolist() == [-1, -1]
    assert tree.parents[1].tolist() == [0, 0, 0, 1, 1, 1]
    assert np.bincount(tree.leaf_of).tolist() == [5] * 6 and tree.leaf_of[:6].tolist() == [0] * 5 + [1]
    shuffled = build_tree([2, 6], [Link(0, 1), Link(0, 1)], 30, "random", 0)
    assert sorted(shuffled.leaf_of.tolist()) == sorted(tree.leaf_of.tolist())
    assert shuffled.leaf_of.tolist() != tree.leaf_of.tolist()
    for levels, match in (([6, 2], "shrink"), ([40], "leaf aggregators"), ([], "at least one")):
        with pytest.raises(ValueError, match=match):
            build_tree(levels, [Link(0, 1)] * len(levels), 30, "contiguous", 0)


def test_eager_aggregators_forward_when_their_last_child_has_crossed_the_link():
    tree = build_tree([2], [Link(latency_s=0.5, bandwidth_Bps=10.0)], 4, "contiguous", 0)
    clients = np.array([0, 1, 2, 3])                       # leaves: {0, 1} and {2, 3}
    arrival = np.array([1.0, 4.0, 2.0, 2.5])
    sizes = np.array([10.0, 10.0, 20.0, 10.0])
    done, messages = upward(tree, clients, arrival, sizes, partial_bytes=30)
    # leaf 0: 1 -> 2 (1 s of bytes), 4 -> 5; forwards at 5 + 0.5 + 3 = 8.5
    # leaf 1: 2 -> 4 (2 s), then 2.5 waits until 4 -> 5; forwards at 8.5 too; leaf 0 is last
    assert done == pytest.approx(8.5) and messages.tolist() == [2]
    done, messages = upward(tree, clients[:2], arrival[:2], sizes[:2], partial_bytes=30)
    assert done == pytest.approx(8.5) and messages.tolist() == [1]   # leaf 1 sends nothing
    two = build_tree([1, 2], [Link(0.0, 10.0), Link(0.5, 10.0)], 4, "contiguous", 0)
    done, messages = upward(two, clients, arrival, sizes, partial_bytes=30)
    # the top aggregator takes both partials (8.5 and 8.5) one after the other: 8.5 + 3 + 3,
    # then sends its own: + 0 + 3
    assert done == pytest.approx(17.5) and messages.tolist() == [1, 2]
    # down: each leaf sends the 10-byte model to its 2 clients (2 s) after 0.5 s latency
    assert downward_s(tree, clients, 10).tolist() == [2.5] * 4
    assert downward_s(two, clients[:3], 10).tolist() == pytest.approx([4.5, 4.5, 3.5])


def test_the_mean_summed_up_the_tree_is_the_weighted_mean():
    tree = build_tree([2, 5], [Link(0, 1), Link(0, 1)], 20, "random", 3)
    clients = np.array([0, 3, 4, 7, 9, 12, 15, 19])
    rows = torch.randn(8, 50)
    weights = torch.rand(8) + 0.1
    flat = (weights / weights.sum()) @ rows
    assert torch.allclose(tree_mean(tree, clients, rows, weights), flat, atol=1e-6)


def _config(**over):
    cfg = small_config("fedavg", stop={"rounds": 4}, **over)
    cfg["partition"] = {"name": "iid", "num_nodes": 12}
    cfg["system"] = {"server_bandwidth_Bps": 2e5}           # the server's link is the bottleneck
    return cfg


def _rounds(tree, whole, rounds):
    """Run both drivers ``rounds`` rounds; the bytes ``tree`` sent up in each."""
    ups = []
    for _ in range(rounds):
        before = tree.bytes_up
        tree.run_round()
        whole.run_round()
        ups.append(tree.bytes_up - before)
    return ups


def test_hierarchical_fedavg_is_flat_fedavg_with_less_on_the_server_link():
    flat = SyncFLDriver(build_experiment(config.validate(_config())))
    tree = SyncFLDriver(build_experiment(config.validate(_config(hierarchy={"levels": [3]}))))
    for _ in range(4):
        flat.run_round()
        tree.run_round()
    assert (tree.state.params - flat.state.params).abs().max() < 1e-5     # float rounding only
    summary = tree.summary()["hierarchy"]
    numel = tree.exp.spec.numel
    partial = wire.encoded_size(numel + 1)
    assert summary["bytes_up_by_tier"] == [4 * 3 * partial, flat.bytes_up]   # 3 partials per round
    assert summary["bytes_down_by_tier"] == [4 * 3 * wire.encoded_size(numel), flat.bytes_down]
    assert tree.bytes_up == flat.bytes_up + 4 * 3 * partial
    assert tree.sim_time < flat.sim_time / 2


def test_resume_is_bit_identical(tmp_path):
    cfg = _config(hierarchy={"levels": [2, 4], "assign": "random",
                             "links": [{"latency_s": 0.01, "bandwidth_Bps": 1e6},
                                       {"latency_s": 0.002, "bandwidth_Bps": 5e6}]})
    cfg["output"] = {"progress": False, "checkpoint_every": 1}
    rest = run_split(cfg, tmp_path, split=2, total=4)
    rest.run()
    assert (tmp_path / "a/metrics.csv").read_bytes() == (tmp_path / "b/metrics.csv").read_bytes()
    assert (tmp_path / "a/summary.json").read_text().count("bytes_up_by_tier") == 1


@pytest.mark.parametrize("over, field", [
    ({"algorithm": {"name": "fedavg", "params": {"deadline_s": 1.0}}}, "algorithm.params"),
    ({"algorithm": {"name": "fedavg", "params": {"aggregator": "median"}}}, "hierarchy.levels"),
    ({"hierarchy": {"levels": [20]}}, "hierarchy.levels")])
def test_what_a_tree_cannot_carry_is_refused_in_one_line(over, field):
    cfg = _config(hierarchy={"levels": [3]})
    cfg.update(over)
    with pytest.raises(ConfigError, match=field):
        build_experiment(config.validate(cfg))
    with pytest.raises(ValueError, match="links"):
        config.validate(_config(hierarchy={"levels": [3], "links": [{}, {}]}))


def test_with_rehome_a_failed_leafs_clients_reach_the_next_leaf(tmp_path):
    """The same failure with ``rehome``: leaf 1's 4 clients train under leaf 2 in rounds 2-3
    (every client takes part, nothing is cut off), the server's link carries 2 partials in
    those rounds instead of 3, and the model is the no-failure tree's to float rounding."""
    failing = {"levels": [3], "rehome": True,
               "failures": [{"aggregator": 1, "from_round": 2, "to_round": 3}]}
    tree = SyncFLDriver(build_experiment(config.validate(_config(hierarchy=failing))))
    whole = SyncFLDriver(build_experiment(config.validate(_config(hierarchy={"levels": [3]}))))
    assert tree.exp.hierarchy.rehomed(2).leaf_of.tolist() == [0] * 4 + [2] * 8
    assert tree.exp.hierarchy.rehomed(4) is tree.exp.hierarchy
    numel = tree.exp.spec.numel
    ups = _rounds(tree, whole, 4)
    client_up, partial = wire.encoded_size(numel), wire.encoded_size(numel + 1)
    assert ups == [12 * client_up + 3 * partial, 12 * client_up + 2 * partial,
                   12 * client_up + 2 * partial, 12 * client_up + 3 * partial]
    out = tree.summary()["hierarchy"]
    assert out["clients_cut_off"] == 0 and out["clients_rehomed"] == 8
    assert float((tree.state.params - whole.state.params).abs().max()) < 1e-6
    cfg = _config(hierarchy=failing)
    cfg["output"] = {"progress": False, "checkpoint_every": 1}
    rest = run_split(cfg, tmp_path, split=2, total=4)
    rest.run()
    assert (tmp_path / "a/metrics.csv").read_bytes() == (tmp_path / "b/metrics.csv").read_bytes()


def test_real_aggregators_are_numbered_level_by_level():
    """`gossamer aggregator --id`: the tree's numbering of aggregators for real processes."""
    from gossamer.protocols.hierarchy import Link, build_tree

    tree = build_tree([2, 4], [Link(0, 1), Link(0, 1)], 8, "contiguous", 0)
    assert tree.count == 6
    assert [tree.locate(g) for g in range(6)] == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (1, 3)]
    assert [tree.parent(g) for g in range(6)] == [-1, -1, 0, 0, 1, 1]
    assert [tree.home(i) for i in range(8)] == [2, 2, 3, 3, 4, 4, 5, 5]
    with pytest.raises(ValueError):
        tree.locate(6)


def test_a_failed_leaf_aggregator_cuts_its_clients_off_for_those_rounds(tmp_path):
    """Leaf 1 of 3 is down in rounds 2-3: its 4 clients get no task there (nothing sent to
    or from them, the round goes on with the other 8) and are back in round 4."""
    cfg = _config(hierarchy={"levels": [3], "failures": [{"aggregator": 1, "from_round": 2, "to_round": 3}]})
    tree = SyncFLDriver(build_experiment(config.validate(cfg)))
    whole = SyncFLDriver(build_experiment(config.validate(_config(hierarchy={"levels": [3]}))))
    numel = tree.exp.spec.numel
    ups = _rounds(tree, whole, 4)
    client_up = wire.encoded_size(numel)
    partial = wire.encoded_size(numel + 1)
    assert ups == [12 * client_up + 3 * partial, 8 * client_up + 2 * partial,
                   8 * client_up + 2 * partial, 12 * client_up + 3 * partial]
    assert tree.summary()["hierarchy"]["clients_cut_off"] == 8
    assert not torch.equal(tree.state.params, whole.state.params)          # round 2 differed
    cfg["output"] = {"progress": False, "checkpoint_every": 1}
    rest = run_split(cfg, tmp_path, split=2, total=4)
    rest.run()
    assert (tmp_path / "a/metrics.csv").read_bytes() == (tmp_path / "b/metrics.csv").read_bytes()
    with pytest.raises(ConfigError, match="hierarchy.failures"):
        build_experiment(config.validate(_config(hierarchy={
            "levels": [3], "failures": [{"aggregator": 3, "from_round": 1, "to_round": 2}]})))


def test_a_down_aggregator_above_the_leaves_re_homes_its_children_to_the_server():
    """Top aggregator 0 of [2, 4] down in round 2: without re-homing, the clients of leaves 0
    and 1 are cut off; re-homed, leaves 0 and 1 send straight to the server (parent -1), as a
    real aggregator's second address is the coordinator's. Written out by hand: times, tiers
    and the mean."""
    tree = build_tree([2, 4], [Link(0.0, 10.0), Link(0.5, 10.0)], 8, "contiguous", 0,
                      [(0, 2, 2, 0)])
    assert tree.down_at(1).tolist() == [False] * 4
    assert tree.down_at(2).tolist() == [True, True, False, False]
    moved = tree.rehomed(2)
    assert moved.parents[1].tolist() == [-1, -1, 1, 1] and moved.leaf_of.tolist() == tree.leaf_of.tolist()
    assert moved.failures == () and tree.rehomed(3) is tree
    clients = np.arange(8)
    arrival = np.array([1.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    done, messages = upward(moved, clients, arrival, np.full(8, 10.0), partial_bytes=30)
    # every leaf: its 2 uploads cross its link one after the other (1 s each), then 0.5 s of
    # latency and 3 s for its partial: leaf 0 (last upload at 2) forwards at 2 + 1 + 3.5 = 6.5,
    # the others at 1 + 2 + 3.5 = 6.5. Leaves 0 and 1 reach the server then; aggregator 1 takes
    # leaves 2 and 3 (6.5 -> 9.5 -> 12.5) and forwards at 12.5 + 0 + 3 = 15.5
    assert done == pytest.approx(15.5)
    assert messages.tolist() == [3, 2]          # server's link: aggregator 1 and leaves 0, 1
    # down: leaves 0 and 1 are served by the server (their own link only: 0.5 + 2 x 1 s);
    # leaves 2 and 3 wait for aggregator 1's 2 copies too (0 + 2 x 1 s)
    assert downward_s(moved, clients, 10).tolist() == pytest.approx([2.5] * 4 + [4.5] * 4)
    rows, weights = torch.randn(8, 20), torch.rand(8) + 0.1
    assert torch.allclose(tree_mean(moved, clients, rows, weights), (weights / weights.sum()) @ rows, atol=1e-6)
    with pytest.raises(ValueError, match="level 2"):
        build_tree([2, 4], [Link(0, 1)] * 2, 8, "contiguous", 0, [(0, 1, 1, 2)])
    with pytest.raises(ValueError, match="aggregator 2"):
        build_tree([2, 4], [Link(0, 1)] * 2, 8, "contiguous", 0, [(2, 1, 1, 0)])


@pytest.mark.parametrize("rehome", [False, True])
def test_a_run_with_a_down_top_aggregator(rehome):
    """FedAvg on [2, 4] over 12 clients, top aggregator 0 down in round 2. Cut off: its 6
    clients (leaves 0 and 1) sit the round out. Re-homed: every client takes part, leaves 0
    and 1 send to the server, whose link carries 3 partials instead of 2, and the model is the
    no-failure tree's to float rounding."""
    levels = [2, 4]
    failing = {"levels": levels, "rehome": rehome,
               "failures": [{"aggregator": 0, "level": 0, "from_round": 2, "to_round": 2}]}
    tree = SyncFLDriver(build_experiment(config.validate(_config(hierarchy=failing))))
    whole = SyncFLDriver(build_experiment(config.validate(_config(hierarchy={"levels": levels}))))
    numel = tree.exp.spec.numel
    client_up, partial = wire.encoded_size(numel), wire.encoded_size(numel + 1)
    ups = _rounds(tree, whole, 3)
    out = tree.summary()["hierarchy"]
    if rehome:
        # round 2: 12 uploads, 4 leaf partials (2 to aggregator 1, 2 to the server), 1 from
        # aggregator 1
        assert ups == [12 * client_up + 6 * partial, 12 * client_up + 5 * partial, 12 * client_up + 6 * partial]
        assert out["clients_cut_off"] == 0
        assert float((tree.state.params - whole.state.params).abs().max()) < 1e-6
    else:
        assert ups == [12 * client_up + 6 * partial, 6 * client_up + 3 * partial, 12 * client_up + 6 * partial]
        assert out["clients_cut_off"] == 6
        assert not torch.equal(tree.state.params, whole.state.params)


def test_a_loaded_leaf_runs_more_instances():
    """LIFL's scaling with load, written out by hand: one leaf serving 4 of the round's
    clients at 2 per instance runs 2 instances, each taking 2 clients in id order on a link of
    its own, each sending its partial to the server; the mean is unchanged."""
    tree = build_tree([1], [Link(0.5, 10.0)], 5, "contiguous", 0)
    clients = np.array([0, 1, 3, 4])
    assert tree.scaled(clients, 4) is tree and tree.scaled(clients, None) is tree
    scaled = tree.scaled(clients, 2)
    assert scaled.parents[0].tolist() == [-1, -1] and scaled.leaf_of.tolist() == [0, 0, 0, 1, 1]
    arrival, sizes = np.array([1.0, 2.0, 1.0, 1.0]), np.full(4, 10.0)
    done, messages = upward(tree, clients, arrival, sizes, partial_bytes=30)
    # one leaf: 1 -> 2, 2 -> 3, -> 4, -> 5, then 0.5 + 3: 8.5
    assert done == pytest.approx(8.5) and messages.tolist() == [1]
    done, messages = upward(scaled, clients, arrival, sizes, partial_bytes=30)
    # instance 0 takes clients 0, 1: 1 -> 2, 2 -> 3, forwards at 6.5; instance 1 (3, 4): 1 -> 3, 6.5
    assert done == pytest.approx(6.5) and messages.tolist() == [2]
    assert downward_s(scaled, clients, 10).tolist() == pytest.approx([2.5] * 4)     # 0.5 + 2 x 1 s
    assert downward_s(tree, clients, 10).tolist() == pytest.approx([4.5] * 4)       # 0.5 + 4 x 1 s
    rows, weights = torch.randn(4, 20), torch.rand(4) + 0.1
    assert torch.allclose(tree_mean(scaled, clients, rows, weights), (weights / weights.sum()) @ rows, atol=1e-6)


def test_a_run_scaled_with_load_finishes_rounds_sooner_with_the_same_model(tmp_path):
    """FedAvg on one leaf of 12 clients whose link is the bottleneck: at 3 clients per
    instance the leaf runs 4 instances every round (12 extra over 4 rounds), the server's link
    takes 4 partials a round instead of 1, rounds finish sooner, the model is the unscaled
    tree's to float rounding, and the run resumes bit-identically; real processes refuse it."""
    slow = [{"latency_s": 0.01, "bandwidth_Bps": 2e5}]
    one = SyncFLDriver(build_experiment(config.validate(_config(hierarchy={"levels": [1], "links": slow}))))
    scaled_cfg = _config(hierarchy={"levels": [1], "links": slow, "clients_per_instance": 3})
    many = SyncFLDriver(build_experiment(config.validate(scaled_cfg)))
    for _ in range(4):
        one.run_round()
        many.run_round()
    numel = many.exp.spec.numel
    partial = wire.encoded_size(numel + 1)
    out = many.summary()["hierarchy"]
    assert out["extra_instances"] == 12 and out["bytes_up_by_tier"][0] == 4 * 4 * partial
    assert one.summary()["hierarchy"]["bytes_up_by_tier"][0] == 4 * partial
    assert many.sim_time < one.sim_time
    assert float((many.state.params - one.state.params).abs().max()) < 1e-6
    scaled_cfg["output"] = {"progress": False, "checkpoint_every": 1}
    rest = run_split(scaled_cfg, tmp_path, split=2, total=4)
    rest.run()
    assert (tmp_path / "a/metrics.csv").read_bytes() == (tmp_path / "b/metrics.csv").read_bytes()
    from gossamer.runtime.fl_server import Coordinator
    with pytest.raises(ConfigError, match="hierarchy.clients_per_instance"):
        Coordinator.check_config(config.validate(scaled_cfg))
