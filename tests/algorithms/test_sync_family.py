"""The synchronous FL family: server optimizers, FedProx, SCAFFOLD, FedAvg-M, deadlines."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gossamer import config, wire
from gossamer.algorithms import ALGORITHMS
from gossamer.algorithms.fl.fedavg import FedAvg, ServerState
from gossamer.algorithms.fl.payload import Payload
from gossamer.algorithms.fl.scaffold import Scaffold
from gossamer.algorithms.fl.server_opt import ServerOptimizer
from gossamer.sim.drivers.sync_fl import SyncFLDriver
from gossamer.sim.experiment import build_experiment
from tests.conftest import small_config

DELTAS = [1.0, -0.5, 2.0, 0.25]


def _closed_form(name, lr, b1, b2, tau):
    """The server rules written out on scalars (Reddi et al. 2021, Alg. 2; Hsu et al. 2019)."""
    x, m, v = 0.0, 0.0, tau ** 2
    mom = 0.0
    out = []
    for d in DELTAS:
        if name == "sgd":
            x += lr * d
        elif name == "momentum":
            mom = b1 * mom + d
            x += lr * mom
        else:
            m = b1 * m + (1 - b1) * d
            if name == "adagrad":
                v = v + d * d
            elif name == "adam":
                v = b2 * v + (1 - b2) * d * d
            else:
                v = v - (1 - b2) * d * d * math.copysign(1.0, v - d * d) if v != d * d else v
            x += lr * m / (math.sqrt(v) + tau)
        out.append(x)
    return out


@pytest.mark.parametrize("name", ["sgd", "momentum", "adagrad", "adam", "yogi"])
def test_server_optimizer_on_one_dimension_equals_closed_form(name):
    opt = ServerOptimizer(name, lr=0.3, beta1=0.8, beta2=0.95, tau=0.01)
    x, buffers = torch.zeros(1, dtype=torch.float64), opt.init(torch.zeros(1, dtype=torch.float64))
    got = []
    for d in DELTAS:
        x, buffers = opt.step(x, torch.tensor([d], dtype=torch.float64), buffers)
        got.append(float(x))
    assert got == pytest.approx(_closed_form(name, 0.3, 0.8, 0.95, 0.01), rel=1e-12)


def test_fedadam_aggregate_uses_the_weighted_average_as_pseudo_gradient():
    algo = ALGORITHMS.get("fedadam").from_params({"server_lr": 0.1, "weighting": "uniform"})
    state = algo.init_state(torch.zeros(2))
    new = algo.aggregate(state, torch.tensor([[1.0, 0.0], [3.0, -2.0]]), np.array([1, 1]))
    delta = torch.tensor([2.0, -1.0])
    m = 0.1 * delta
    v = 0.99 * 1e-6 + 0.01 * delta ** 2
    assert torch.allclose(new.params, 0.1 * m / (v.sqrt() + 1e-3))
    assert torch.allclose(new.extra["server_m"], m)


def test_registered_names_and_defaults():
    assert ALGORITHMS.get("fedprox").from_params({}).prox_mu == 0.01
    assert ALGORITHMS.get("fedavgm").from_params({}).server_optimizer == "momentum"
    assert ALGORITHMS.get("fedyogi").from_params({}).server_optimizer == "yogi"
    assert ALGORITHMS.get("fedavg_m").from_params({}).momentum_beta == 0.9
    assert ALGORITHMS.get("scaffold_m").from_params({}).download_vectors == 3
    with pytest.raises(ValueError, match="mean only"):
        Scaffold(aggregator="median")
    with pytest.raises(ValueError, match="server_momentum"):
        FedAvg(server_optimizer="momentum", server_momentum=1.5)


# --- SCAFFOLD on a quadratic ---------------------------------------------------------------
def _local_gd(grad, x, correction, lr, steps, beta=1.0, momentum=None):
    """Full-batch local steps along beta * (grad + correction) + (1 - beta) * momentum."""
    y, grads = x.clone(), []
    for _ in range(steps):
        g = grad(y)
        grads.append(g)
        d = beta * (g + correction)
        if momentum is not None:
            d = d + (1 - beta) * momentum
        y = y - lr * d
    return y, torch.stack(grads).mean(0)


@pytest.mark.parametrize("beta", [None, 0.7])
def test_scaffold_control_variate_update_on_a_quadratic_equals_closed_form(beta):
    """f_i(w) = 1/2 (w - b_i)' A_i (w - b_i): after K local steps the new control variate
    is the average local gradient along the trajectory (option II, and SCAFFOLD-M)."""
    torch.manual_seed(0)
    algo = Scaffold(momentum_beta=beta)
    p, lr, k = 3, 0.1, 5
    a = torch.diag(torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64))
    b = torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64)
    x = torch.tensor([0.2, 0.1, -0.3], dtype=torch.float64)
    c = torch.tensor([0.05, -0.1, 0.2], dtype=torch.float64)
    c_i = torch.tensor([0.3, 0.0, -0.2], dtype=torch.float64)
    m = torch.tensor([0.4, -0.2, 0.1], dtype=torch.float64)
    # the wire form, read back as the client does
    payload = Payload.of(torch.cat([x, c] + ([m] if beta is not None else [])), algo.download_names)
    assert torch.equal(payload["control"], c) and (beta is None or torch.equal(payload["momentum"], m))
    objective = algo.local_objective(payload, c_i.unsqueeze(0))
    assert torch.allclose(objective.correction[0],
                          (c - c_i) if beta is None else beta * (c - c_i) + (1 - beta) * m)
    y, avg_grad = _local_gd(lambda w: a @ (w - b), x, c - c_i, lr, k,
                            beta=1.0 if beta is None else beta, momentum=None if beta is None else m)
    uploads, new_c = algo.client_update(y.unsqueeze(0), payload, c_i.unsqueeze(0), np.array([k]), lr)
    assert torch.allclose(new_c[0], avg_grad, atol=1e-12)
    assert torch.allclose(uploads[0, :p], y) and torch.allclose(uploads[0, p:], avg_grad - c_i)
    # the server: model step by the mean update, c += (1/N) sum of control deltas
    state = algo.init_state(x, num_clients=4)
    state.extra["control"] = c.clone()
    new = algo.aggregate(state, uploads, np.array([10]), np.array([k]), lr)
    assert torch.allclose(new.params, y)
    assert torch.allclose(new.extra["control"], c + (avg_grad - c_i) / 4)


def test_scaffold_client_without_steps_keeps_its_control_variate():
    algo = Scaffold()
    x, c_i = torch.ones(2), torch.tensor([[0.5, -0.5]])
    uploads, new_c = algo.client_update(x.unsqueeze(0), Payload(x, {"control": torch.zeros(2)}), c_i,
                                        np.array([0]), 0.1)
    assert torch.equal(new_c, c_i) and torch.equal(uploads[0, 2:], torch.zeros(2))


def test_fedavg_m_momentum_is_the_average_local_direction():
    algo = ALGORITHMS.get("fedavg_m").from_params({"momentum_beta": 0.5, "weighting": "uniform"})
    state = algo.init_state(torch.zeros(2))
    models = torch.tensor([[-1.0, 0.0], [0.0, -4.0]])
    new = algo.aggregate(state, models, np.array([1, 1]), np.array([2, 4]), 0.5)
    # (x - y_i) / (lr K_i): [1, 0] and [0, 2]
    assert torch.allclose(new.extra["momentum"], torch.tensor([0.5, 1.0]))
    assert torch.allclose(new.params, torch.tensor([-0.5, -2.0]))
    objective = algo.local_objective(algo.broadcast(new), None)
    assert objective.grad_scale == 0.5 and torch.allclose(objective.correction, 0.5 * new.extra["momentum"])


# --- end to end in the simulator -------------------------------------------------------------
def _exp(algorithm="fedavg", params=None, **over):
    cfg = small_config(algorithm, **over)
    cfg["algorithm"]["params"] = params or {}
    return build_experiment(config.validate(cfg))


def test_full_participation_one_full_batch_step_equals_centralized_gradient_descent():
    exp = _exp(local={"epochs": 1, "batch_size": 10_000, "lr": 0.5, "shuffle": False})
    driver = SyncFLDriver(exp)
    w = exp.init_params.reshape(-1).clone()
    every = np.concatenate(exp.shards)                 # the union of the clients' data
    x, y = exp.dataset.x_train[every], exp.dataset.y_train[every]
    for _ in range(3):
        driver.run_round()
        params = {k: v[0].clone().requires_grad_(True) for k, v in exp.spec.views(w.unsqueeze(0)).items()}
        loss = F.cross_entropy(torch.func.functional_call(exp.model, params, (x,)), y)
        grads = torch.autograd.grad(loss, list(params.values()))
        w = w - 0.5 * torch.cat([g.reshape(-1) for g in grads])
        assert torch.allclose(driver.state.params, w, atol=1e-5)


def test_fedprox_with_a_strong_proximal_term_stays_near_the_global_model():
    plain, prox = SyncFLDriver(_exp()), SyncFLDriver(_exp("fedprox", {"prox_mu": 5.0}))
    start = plain.state.params.clone()
    plain.run_round()
    prox.run_round()
    assert (prox.state.params - start).norm() < 0.5 * (plain.state.params - start).norm()


@pytest.mark.parametrize("name", ["scaffold", "scaffold_m", "fedavg_m", "fedadam", "fedyogi",
                                  "fedadagrad", "fedavgm", "fedprox"])
def test_every_sync_algorithm_learns_and_counts_its_bytes(name):
    params = {"server_lr": 0.1} if name in ("fedadam", "fedyogi", "fedadagrad") else {}
    exp = _exp(name, params, partition={"name": "dirichlet", "num_nodes": 8, "params": {"alpha": 0.5}})
    driver = SyncFLDriver(exp)
    before = float(driver.evaluate()["test_accuracy"])
    for _ in range(4):
        driver.run_round()
    assert float(driver.evaluate()["test_accuracy"]) > before + 0.25
    algo = exp.algorithm
    numel = exp.spec.numel
    assert driver.bytes_down == 4 * 8 * wire.encoded_size(algo.download_vectors * numel)
    assert driver.bytes_up == 4 * 8 * wire.encoded_size(algo.upload_vectors * numel)
    if name.startswith("scaffold"):
        assert driver.client_state.get(np.arange(driver.exp.num_nodes)).abs().sum() > 0 and driver.state.extra["control"].abs().sum() > 0


def _tiered(**params):
    system = {"sample_time_s": {"dist": "per_node", "values": [0.001] * 4 + [0.1] * 4},
              "latency_s": {"dist": "constant", "value": 0.0},
              "bandwidth_up_Bps": {"dist": "constant", "value": 1e12},
              "bandwidth_down_Bps": {"dist": "constant", "value": 1e12}}
    return _exp("fedavg", params, system=system)


def test_deadline_drops_late_clients_and_ends_the_round_at_the_deadline():
    exp = _tiered(deadline_s=1.0)
    driver = SyncFLDriver(exp)
    driver.run_round()
    slow = exp.trainer.sizes[4:] * 0.1                  # > 1 s: one epoch at 0.1 s per sample
    assert (slow > 1.0).all()
    assert driver.dropped == 4 and driver.sim_time == pytest.approx(1.0)
    assert driver.bytes_up == 4 * exp.message_bytes


def test_over_selection_keeps_the_first_arrivals():
    exp = _tiered(client_fraction=0.5, over_selection=1.0)
    driver = SyncFLDriver(exp)
    driver.run_round()                                  # selects all 8, keeps the 4 fastest
    fast = exp.trainer.sizes[:4] * 0.001
    assert driver.participants == 8 and driver.dropped == 4
    assert driver.sim_time == pytest.approx(float(fast.max()) + 2 * 28 / 1e12, abs=1e-6)


def test_scaffold_resume_restores_client_control_variates():
    a = SyncFLDriver(_exp("scaffold"))
    a.run_round()
    b = SyncFLDriver(_exp("scaffold"))
    b.load_state_dict(a.state_dict())
    a.run_round()
    b.run_round()
    assert torch.equal(a.state.params, b.state.params)
    everyone = np.arange(a.exp.num_nodes)
    assert torch.equal(a.client_state.get(everyone), b.client_state.get(everyone))
    assert isinstance(b.state, ServerState)


def test_sync_accounting_participation_bytes_and_waiting_for_the_slowest():
    exp = _tiered()
    driver = SyncFLDriver(exp)
    driver.run_round()
    summary = driver.summary()
    assert summary["participation"] == [1] * 8
    assert summary["bytes_up_per_client"] == [exp.message_bytes] * 8
    assert summary["staleness_histogram"] == {"0": 8}
    compute = exp.trainer.sizes * np.array([0.001] * 4 + [0.1] * 4)
    tiny = 2 * exp.message_bytes / 1e12                  # download + upload at 1e12 B/s
    expected = compute.max() - compute                    # each waits for the slowest client
    assert np.allclose(summary["client_idle_s"], expected, atol=1e-9)
    assert driver.sim_time == pytest.approx(compute.max() + tiny, abs=1e-9)


# --- FedAMD -------------------------------------------------------------------------------------
def test_fedamd_roles_are_a_shared_counter_draw_and_round_one_is_all_anchors():
    from gossamer.algorithms.fl.fedamd import FedAMD

    algo = FedAMD(anchor_prob=0.3)
    clients = np.arange(4000)
    assert algo.anchors(0, 1, clients).all()
    roles = algo.anchors(0, 5, clients)
    assert abs(roles.mean() - 0.3) < 4 * math.sqrt(0.3 * 0.7 / 4000)
    assert np.array_equal(algo.anchors(0, 5, clients[7:9]), roles[7:9])      # one client alone
    assert not np.array_equal(algo.anchors(0, 6, clients), roles)


def test_fedamd_aggregate_updates_bullseyes_and_moves_by_miners_only():
    from gossamer.algorithms.fl.fedamd import FedAMD

    algo = FedAMD(weighting="uniform")
    state = algo.init_state(torch.zeros(2), num_clients=3)
    assert torch.equal(algo.broadcast(state)["direction"], torch.zeros(2))  # no bullseye yet
    uploads = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.5, 0.5]])
    new = algo.aggregate(state, uploads, np.ones(3), clients=np.array([2, 0, 1]),
                         anchors=np.array([True, False, True]))
    assert torch.equal(new.extra["bullseyes"][2], uploads[0]) and torch.equal(new.extra["bullseyes"][1], uploads[2])
    assert torch.allclose(new.params, torch.tensor([3.0, -1.0]))            # the one miner's model
    assert torch.allclose(algo.broadcast(new)["direction"], (uploads[0] + uploads[2]) / 2)
    assert torch.equal(algo.broadcast(new).flat()[2:], algo.broadcast(new)["direction"])    # on the wire
    only_anchors = algo.aggregate(new, uploads[:1], np.ones(1), clients=np.array([0]), anchors=np.array([True]))
    assert torch.equal(only_anchors.params, new.params) and only_anchors.round == 2


def test_fedamd_learns_and_anchors_cost_their_shard():
    exp = _exp("fedamd", {"anchor_prob": 0.3}, partition={"name": "dirichlet", "num_nodes": 8,
                                                          "params": {"alpha": 0.5}})
    driver = SyncFLDriver(exp)
    before = float(driver.evaluate()["test_accuracy"])
    driver.run_round()                                   # all anchors: no model move, table full
    assert torch.equal(driver.state.params, exp.init_params.reshape(-1))
    assert bool(driver.state.extra["has_bullseye"].all())
    for _ in range(8):
        driver.run_round()
    assert float(driver.evaluate()["test_accuracy"]) > before + 0.25
    assert driver.bytes_down == 9 * 8 * wire.encoded_size(2 * exp.spec.numel)
