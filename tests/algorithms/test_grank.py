"""G-Rank (Gold, Pouwelse, arXiv:2301.12530): its rules on hand-worked cases, the click model,
and small runs from the example config (NDCG rises; gossip beats local-only ranking)."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from gossamer import config, rng
from gossamer.algorithms.dl.grank import (
    click_scores,
    explore,
    pick_peers,
    rank,
    sample_log,
    similarity,
)
from gossamer.config import ConfigError
from gossamer.data.clicks import ClickModel, attractiveness, examination, make_world, ndcg_at_k
from gossamer.sim.drivers.grank import GRankDriver
from gossamer.sim.experiment import build_experiment

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "grank" / "grank.yaml"
# small enough for a test, two groups so that pooling the similar half pays off clearly
SMALL = ["partition.num_nodes=16", "data.params.items=60", "data.params.tags=20",
         "data.params.groups=2", "stop.rounds=40"]


def _counts(records, n=2, q=3, i=4):
    """counts[viewer, origin, query, item] from (viewer, origin, query, item) tuples."""
    c = np.zeros((n, n, q, i), dtype=np.int32)
    for v, j, qq, ii in records:
        c[v, j, qq, ii] += 1
    return c


# --- similarity ----------------------------------------------------------------------------------
def test_similarity_on_a_hand_worked_example():
    # node 0 clicked (q0,i0), (q0,i1), (q1,i2); it holds node 1's (q0,i1), (q2,i3)
    # shared queries {q0}; items both clicked for them {i1}: 1; top queries {q0,q1} & {q0,q2}: 1
    # union {i0,i1,i2} | {i1,i3}: 4  ->  (1 + 1^2) / 4 = 0.5;  itself: (3 + 2^2) / 3 = 7/3
    c = _counts([(0, 0, 0, 0), (0, 0, 0, 1), (0, 0, 1, 2), (0, 1, 0, 1), (0, 1, 2, 3), (1, 1, 0, 1)])
    s = similarity(c)
    assert s[0] == pytest.approx([1.0, 0.5 / (7 / 3)])          # 3/14 after the row's maximum
    assert s[1] == pytest.approx([0.0, 1.0])                     # node 1 holds none of node 0's
    c[0, 1, 0, 1] = 0                                            # no shared query left: 0
    assert similarity(c)[0, 1] == 0.0


def _loop_similarity(counts, top_k):
    """The definition with sets, one pair at a time."""
    n, q_count = counts.shape[0], counts.shape[2]
    out = np.zeros((n, n))

    def items(log, queries=None):
        return {i for q in range(q_count) for i in np.flatnonzero(log[q]) if queries is None or q in queries}

    def top(log):
        per = log.sum(1)
        order = sorted((q for q in range(q_count) if per[q] > 0), key=lambda q: (-per[q], q))
        return set(order[:top_k])

    for v in range(n):
        mine = counts[v, v]
        mine_q = {q for q in range(q_count) if mine[q].any()}
        for j in range(n):
            theirs = counts[v, j]
            shared = mine_q & {q for q in range(q_count) if theirs[q].any()}
            union = items(mine) | items(theirs)
            if shared and union:
                matched = items(mine, shared) & items(theirs, shared)
                out[v, j] = (len(matched) + len(top(mine) & top(theirs)) ** 2) / len(union)
        if out[v].max() > 0:
            out[v] /= out[v].max()
    return out


def test_similarity_equals_the_definition_on_random_logs():
    g = np.random.default_rng(0)
    counts = (g.random((5, 5, 6, 7)) < 0.15).astype(np.int32) * g.integers(1, 4, (5, 5, 6, 7))
    assert np.allclose(similarity(counts, top_queries=2), _loop_similarity(counts, 2))


# --- ranking -------------------------------------------------------------------------------------
def test_click_scores_weight_clicks_by_similarity_plus_offset():
    counts = np.zeros((1, 3, 5), dtype=np.int32)                 # one query, origins 0..2, items 0..4
    counts[0, 0, 2] = 1                                          # the viewer itself (similarity 1)
    counts[0, 1, 1] = 3                                          # a dissimilar peer, 3 clicks
    counts[0, 2, 3] = 1
    sim = np.array([[1.0, 0.2, 0.5]])
    assert click_scores(counts, sim, 0.0)[0] == pytest.approx([0, 0.6, 1.0, 0.5, 0])
    assert click_scores(counts, sim, 1.0)[0] == pytest.approx([0, 3.6, 2.0, 1.5, 0])
    tag = np.array([[False, False, False, False, True]])         # item 4 matches the query's tag
    popularity = np.array([[5, 0, 0, 0, 0]])
    assert rank(click_scores(counts, sim, 0.0), tag, popularity)[0].tolist() == [2, 1, 3, 4, 0]
    assert rank(click_scores(counts, sim, 1.0), tag, popularity)[0].tolist() == [1, 2, 3, 4, 0]


def test_unseen_queries_fall_back_to_tag_matches_then_popularity_then_id():
    scores = np.zeros((1, 5))
    tag = np.array([[False, True, False, True, False]])
    popularity = np.array([[0, 0, 2, 0, 7]])
    assert rank(scores, tag, popularity)[0].tolist() == [1, 3, 4, 2, 0]


def test_exploration_swaps_two_positions_at_the_configured_rate():
    shown = np.tile(np.arange(10), (20000, 1))
    u = rng.uniform(3, rng.STREAM_CLICKS, np.arange(20000)[:, None], np.arange(3))
    out = explore(shown, u, 0.5)
    changed = (out != shown).sum(1)
    assert set(changed.tolist()) == {0, 2}                        # one swap of two distinct places
    assert np.array_equal(np.sort(out, axis=1), shown)           # still a permutation
    assert abs((changed == 2).mean() - 0.5) < 0.02
    assert np.array_equal(out, explore(shown, u, 0.5))           # a pure function of the draws
    assert np.array_equal(explore(shown, u, 0.0), shown)
    assert (explore(shown, u, 1.0) != shown).sum(1).min() == 2


def test_peers_are_similar_neighbours_or_any_neighbour_when_none_is():
    adjacency = np.array([[0, 1, 1, 1], [1, 0, 1, 0], [0, 0, 0, 0]], dtype=bool)
    sim = np.array([[1, 0, 0.3, 0.7], [0, 1, 0, 0], [1, 0, 0, 0]])
    u = np.array([0.0, 0.99, 0.5])
    assert pick_peers(adjacency, sim, u).tolist() == [2, 2, -1]
    assert pick_peers(adjacency, sim, np.array([0.99, 0.0, 0.0])).tolist() == [3, 0, -1]


def test_a_log_sample_holds_only_held_records():
    held = np.array([[True, False, True, True]])
    u = np.array([[0.1, 0.1, 0.9, 0.4]])
    assert sample_log(held, u, 0.5).tolist() == [[True, False, False, True]]
    assert sample_log(held, u, 1.0).tolist() == held.tolist()


# --- the click model -----------------------------------------------------------------------------
def test_clicks_are_position_biased():
    assert examination(4, 1.0) == pytest.approx([1, 1 / 2, 1 / 3, 1 / 4])
    assert examination(3, 0.0) == pytest.approx([1, 1, 1])
    world = make_world(ClickModel(items=30, tags=6, groups=2, liked_tags=2, eta=2.0), 4, 0)
    item = int(np.flatnonzero(world.item_tags[:, 0])[0])
    others = [i for i in range(30) if i != item][:5]
    first = world.click_probability(np.array([0]), np.array([0]), np.array([[item, *others]]))[0, 0]
    last = world.click_probability(np.array([0]), np.array([0]), np.array([[*others, item]]))[0, 5]
    assert first / last == pytest.approx(36.0)                   # (5 + 1)^eta, eta = 2
    assert attractiveness(np.array([0, 3]), 3, 0.02) == pytest.approx([0.02, 1.0])


def test_relevance_follows_the_groups_tastes():
    model = ClickModel(items=25, tags=8, tags_per_item=3, groups=3, liked_tags=3)
    world = make_world(model, 9, 1)
    assert world.item_tags.sum(1).tolist() == [3] * 25 and world.item_tags.any(0).all()
    for g in range(3):
        for q in range(8):
            for i in range(25):
                tags = set(np.flatnonzero(world.item_tags[i]))
                liked = set(np.flatnonzero(world.liked[g]))
                want = 1 + len((tags & liked) - {q}) if q in tags else 0
                assert world.relevance[g, q, i] == want
    assert sorted(np.bincount(world.group_of).tolist()) == [3, 3, 3]
    assert np.allclose(world.query_probs.sum(1), 1)


def test_ndcg_on_a_hand_worked_ranking():
    rel = np.array([[3, 2, 0, 1]])
    assert ndcg_at_k(rel, np.array([[0, 1, 3, 2]]), 4)[0] == pytest.approx(1.0)
    dcg = 0 / np.log2(2) + 1 / np.log2(3) + 3 / np.log2(4) + 7 / np.log2(5)
    idcg = 7 / np.log2(2) + 3 / np.log2(3) + 1 / np.log2(4)
    assert ndcg_at_k(rel, np.array([[2, 3, 1, 0]]), 4)[0] == pytest.approx(dcg / idcg)
    assert ndcg_at_k(rel, np.array([[2, 3, 1, 0]]), 1)[0] == 0.0


# --- runs ------------------------------------------------------------------------------------------
def test_ndcg_rises_and_gossip_beats_local_ranking(tmp_path):
    from gossamer.cli import main

    final = {}
    for name, gossip in (("grank", "true"), ("local", "false")):
        out = tmp_path / name
        argv = ["run", str(EXAMPLE), "--out", str(out), "--quiet", "--set", f"algorithm.params.gossip={gossip}"]
        for item in SMALL:
            argv += ["--set", item]
        assert main(argv) == 0
        summary = json.loads((out / "summary.json").read_text())
        rows = list(csv.DictReader((out / "metrics.csv").open()))
        nodes = list(csv.DictReader((out / "nodes.csv").open()))
        assert len(nodes) == 16 * len(rows) and set(nodes[0]) == {"round", "node", "ndcg"}
        assert float(rows[-1]["ndcg"]) > float(rows[0]["ndcg"]) + 0.04
        assert summary["final_ndcg"] == pytest.approx(float(rows[-1]["ndcg"]))
        assert not (out / "model.pt").exists()
        final[name] = summary
    g, local = final["grank"], final["local"]
    assert g["nodes_ndcg_rose"] == 1.0
    assert g["final_ndcg"] > local["final_ndcg"] + 0.03
    assert g["final_ndcg_min"] > local["final_ndcg_min"] + 0.03
    assert g["bytes_sent_total"] > 0 and local["bytes_sent_total"] == 0


def test_a_run_is_deterministic_and_resumes_to_the_same_logs():
    cfg = config.load(EXAMPLE, SMALL)
    whole = GRankDriver(build_experiment(cfg))
    for _ in range(10):
        whole.run_round()
    first = GRankDriver(build_experiment(cfg))
    for _ in range(5):
        first.run_round()
    first.evaluate()
    resumed = GRankDriver(build_experiment(cfg))
    resumed.load_state_dict(first.state_dict())
    for _ in range(5):
        resumed.run_round()
    assert np.array_equal(resumed.counts, whole.counts) and np.array_equal(resumed.held, whole.held)
    assert resumed.evaluate()["ndcg"] == whole.evaluate()["ndcg"]
    assert whole.counts.sum() > 0


def test_real_processes_refuse_grank_in_one_line():
    from gossamer.runtime.common import refuse_simulator_only

    with pytest.raises(ConfigError) as info:
        refuse_simulator_only(config.load(EXAMPLE))
    assert str(info.value) == ("algorithm.name: grank (grank) runs in the simulator only so far; "
                               "use `gossamer run`")


@pytest.mark.parametrize("overrides, message", [
    (["data.dataset=mnist5k"], "data.dataset: grank ranks items from click logs: set data.dataset: clicks"),
    (["algorithm.name=dpsgd", "algorithm.params={}"], "data.dataset: clicks is a click model for learn-to-rank"),
    (["data.params.tags_per_item=40"], "data.params: tags_per_item (40) exceeds tags (30)"),
    (["data.params.colour=1"], "data.params: colour: Unexpected keyword argument"),
    (["adversary.attack=sign_flip", "adversary.fraction=0.1"], "adversary: not with grank"),
    (["topology.name=one_peer_exponential"], "topology.name: grank gossips over a static graph"),
    (["partition.num_nodes=2000"], "partition.num_nodes: grank keeps every node's click counts"),
    (["eval.nodes=4"], "eval.nodes: grank measures every node's NDCG"),
])
def test_config_errors_are_one_line(overrides, message):
    with pytest.raises(ConfigError) as info:
        build_experiment(config.load(EXAMPLE, overrides))
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


@pytest.mark.parametrize("override, message", [
    ("algorithm.params.sample_rate=0", "algorithm.params: sample_rate must be in (0, 1], got 0"),
    ("algorithm.params.swap_prob=1.5", "algorithm.params: swap_prob must be in [0, 1], got 1.5"),
    ("algorithm.params.display=0", "algorithm.params: display must be >= 1, got 0"),
])
def test_algorithm_params_are_checked_when_the_config_loads(override, message):
    with pytest.raises(ConfigError) as info:
        config.load(EXAMPLE, [override])
    assert str(info.value).startswith(message)


def test_offline_nodes_neither_search_nor_receive_and_local_logs_stay_local():
    cfg = config.load(EXAMPLE, SMALL)
    d = GRankDriver(build_experiment(cfg))
    for _ in range(5):
        d.run_round()
    online = d.exp.online(d.sim_time)                  # the mask the next round sees
    off = np.flatnonzero(~online)
    assert len(off) > 0 and online.any()
    counts, held = d.counts.copy(), d.held.copy()
    d.run_round()
    assert np.array_equal(d.counts[off], counts[off])
    assert not d.held[off, held.shape[1]:].any() and np.array_equal(d.held[off, :held.shape[1]], held[off])
    assert d.bytes_down < d.bytes_up                   # messages to offline nodes were lost
    local = GRankDriver(build_experiment(config.load(EXAMPLE, SMALL + ["algorithm.params.gossip=false"])))
    for _ in range(10):
        local.run_round()
    v, rec = np.nonzero(local.held)
    assert np.array_equal(local.origin[rec], v) and local.bytes_up == 0 and len(rec) > 0
