"""Random-walk learning: kernels, stationary distributions, SRRW's faster convergence, config errors."""

import numpy as np
import pytest

from gossamer import config, rng
from gossamer.algorithms import ALGORITHMS
from gossamer.algorithms.dl.random_walk import SRRW, RandomWalk, total_variation
from gossamer.config import ConfigError
from gossamer.topology import Topology, make_topology
from tests.conftest import small_config

TOPO = make_topology("barabasi_albert", 20, 0, m=2)      # irregular: degrees 1..12
WALKS = [RandomWalk(walk="simple"), RandomWalk(walk="metropolis_hastings"),
         RandomWalk(walk="srrw", base="simple", alpha=3.0), SRRW()]


def _kernel(algo, visits=None):
    return algo.kernel_matrix(TOPO.indptr, TOPO.indices, visits)


@pytest.mark.parametrize("algo", WALKS, ids=lambda a: f"{a.walk}-{a.chain}")
def test_kernel_rows_sum_to_one_on_the_graph(algo):
    visits = np.random.default_rng(0).integers(0, 20, TOPO.num_nodes)
    k = _kernel(algo, visits)
    assert np.allclose(k.sum(axis=1), 1.0) and (k >= 0).all()
    allowed = TOPO.adjacency().toarray() > 0
    if algo.chain == "metropolis_hastings":
        allowed |= np.eye(TOPO.num_nodes, dtype=bool)
    assert (k[~allowed] == 0).all()


def test_stationary_distributions():
    n, deg = TOPO.num_nodes, TOPO.degrees()
    mh = _kernel(RandomWalk(walk="metropolis_hastings"))
    uniform = np.full(n, 1 / n)
    assert np.allclose(uniform @ mh, uniform) and np.allclose(mh, mh.T)
    assert np.allclose(RandomWalk(walk="metropolis_hastings").target(deg), uniform)
    simple = _kernel(RandomWalk(walk="simple"))
    mu = RandomWalk(walk="simple").target(deg)
    assert np.allclose(mu, deg / deg.sum()) and np.allclose(mu @ simple, mu)
    assert not np.allclose(uniform @ simple, uniform)


def test_srrw_with_alpha_zero_is_the_base_chain_and_repels_exactly():
    visits = np.arange(TOPO.num_nodes) % 5
    base = _kernel(RandomWalk(walk="metropolis_hastings"))
    assert np.allclose(_kernel(SRRW(alpha=0.0), visits), base)
    # Path 1 - 0 - 2 on the simple chain (degrees 2, 1, 1: mu = 1/2, 1/4, 1/4): K_01 / K_02 exactly.
    path = Topology(3, np.array([[0, 1], [0, 2]]))
    algo = RandomWalk(walk="srrw", base="simple", alpha=2.0)
    k = algo.kernel_matrix(path.indptr, path.indices, np.array([0, 3, 0]))
    mu1 = 0.25
    assert k[0, 1] / k[0, 2] == pytest.approx((1 + 3 / mu1) ** -2.0)
    assert k[1, 0] == 1.0 and k[0, 0] == 0.0


def test_choose_respects_the_allowed_mask():
    algo = RandomWalk(walk="simple")
    cand = algo.candidates(TOPO.indptr, TOPO.indices, np.array([0, 0, 0]))
    probs = algo.kernel(cand, np.zeros((3, TOPO.num_nodes)), algo.target(TOPO.degrees()))
    allowed = np.zeros(cand.nodes.shape, dtype=bool)
    allowed[0, 1] = True
    allowed[1, :] = cand.nodes[1] >= 0
    nxt = algo.choose(cand, probs, allowed, np.array([0.99, 0.999999, 0.5]))
    assert nxt[0] == cand.nodes[0, 1] and nxt[1] in set(TOPO.neighbors(0)) and nxt[2] == -1
    u = rng.uniform(0, rng.STREAM_RANDOM_WALK, np.arange(4000), 0)
    cand = algo.candidates(TOPO.indptr, TOPO.indices, np.zeros(4000, dtype=np.int64))
    picks = algo.choose(cand, algo.kernel(cand, np.zeros((4000, 20)), algo.target(TOPO.degrees())),
                        cand.nodes >= 0, u)
    share = np.bincount(picks, minlength=20)[TOPO.neighbors(0)] / 4000
    assert np.allclose(share, 1 / TOPO.degrees()[0], atol=0.04)


def _walk_tv(algo, steps, tokens=64, seed=0):
    """Mean over independent tokens of TV(empirical visit frequency, mu) after each step."""
    n, mu = TOPO.num_nodes, algo.target(TOPO.degrees())
    pos = np.arange(tokens) % n
    visits = np.zeros((tokens, n), dtype=np.int64)
    out = []
    for s in range(steps):
        np.add.at(visits, (np.arange(tokens), pos), 1)
        cand = algo.candidates(TOPO.indptr, TOPO.indices, pos)
        u = rng.uniform(seed, rng.STREAM_RANDOM_WALK, np.arange(tokens), s)
        pos = algo.choose(cand, algo.kernel(cand, visits, mu), cand.nodes >= 0, u)
        out.append(total_variation(visits / visits.sum(1, keepdims=True), mu).mean())
    return np.array(out)


@pytest.mark.parametrize("base", ["metropolis_hastings", "simple"])
def test_srrw_visit_frequencies_approach_the_target_faster(base):
    """Fixed seed, 64 independent tokens on a 20-node irregular graph: SRRW's empirical visit
    frequencies are closer to mu (TV) than the base walk's at every checkpoint, and by a
    wide margin (Hu et al. 2024, arXiv:2401.09665)."""
    plain = _walk_tv(RandomWalk(walk=base), 200)
    repelled = _walk_tv(RandomWalk(walk="srrw", base=base, alpha=5.0), 200)
    for step in (49, 99, 199):
        assert repelled[step] < 0.6 * plain[step]
    assert plain[199] < plain[49] and repelled[199] < repelled[49]        # both converge


def test_step_weights_make_the_expected_update_sample_weighted():
    deg = TOPO.degrees()
    sizes = np.random.default_rng(1).integers(1, 50, TOPO.num_nodes)
    algo = RandomWalk(walk="simple")
    mu = algo.target(deg)
    w = algo.step_weights(sizes, mu)
    grads = np.random.default_rng(2).normal(size=(TOPO.num_nodes, 3))
    assert np.allclose((mu * w) @ grads, (sizes / sizes.sum()) @ grads)
    assert np.allclose(RandomWalk(walk="simple", reweight=False).step_weights(sizes, mu), 1.0)
    mh = RandomWalk(walk="metropolis_hastings")
    equal = np.full(TOPO.num_nodes, 7)
    assert np.allclose(mh.step_weights(equal, mh.target(deg)), 1.0)


@pytest.mark.parametrize("params,field", [({"alpha": -1.0, "walk": "srrw"}, "alpha"),
                                          ({"num_tokens": 0}, "num_tokens"),
                                          ({"walk": "levy"}, "walk"),
                                          ({"walk": "simple", "alpha": 2.0}, "alpha"),
                                          ({"base": "srrw", "walk": "srrw"}, "base")])
def test_config_errors_are_one_line_naming_the_field(params, field):
    cfg = small_config("random_walk", topology={"name": "ring"})
    cfg["algorithm"]["params"] = params
    with pytest.raises(ConfigError) as err:
        config.validate(cfg)
    text = str(err.value)
    assert "\n" not in text and "algorithm.params" in text and field in text


def test_isolated_nodes_are_refused_and_presets_are_registered():
    with pytest.raises(ValueError, match="node 2 has no neighbours"):
        RandomWalk().check_degrees(np.array([1, 1, 0]))
    RandomWalk().check_degrees(np.array([0]))                   # one node alone may stay put
    assert ALGORITHMS.get("srrw")().walk == "srrw" and ALGORITHMS.get("srrw")().alpha == 10.0
    assert ALGORITHMS.get("random_walk")().walk == "simple"
