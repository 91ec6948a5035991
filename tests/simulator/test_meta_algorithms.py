"""Per-FedAvg (FO, HF), Meta-SGD and Personalized FedAvg against hand-derived values, then through the worker,
the vectorized path and the driver.

Tiny linear models y = w x (float64, hand-set weights) with MSE: L(w) = mean((w x - y)^2),
L'(w) = 2 mean(x (w x - y)), L''(w) = 2 mean(x^2).
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import run_with_backend, small_overrides
from tiny import D, cfg, col, linear, rng, shard, theta
from torch import nn

from simulator.algorithms.metasgd import metasgd_update
from simulator.algorithms.perfedavg import gradient_difference, per_fedavg_update
from simulator.algorithms.record import planned_samples, pseudo_gradient, split_vector
from simulator.algorithms.registry import ALGORITHMS
from simulator.algorithms.server import ServerOptimizer, ServerState, initial_vector
from simulator.algorithms.steps import batch_plan
from simulator.client.evaluation import evaluate_client
from simulator.client.worker import ClientWorker
from simulator.config.schema import AlgorithmConfig, DataConfig, EvalConfig, ModelConfig
from simulator.contract import WorkerSpec
from simulator.data.base import ClientShard, Split
from simulator.data.registry import make_dataset
from simulator.experiment import load_config
from simulator.models import build_model
from simulator.params import flat_params
from simulator.rng import generator

NEW = ["perfedavg_fo", "perfedavg_hf", "metasgd", "pfedavg"]
# support xs = [1, 2], ys = [2, 4] (L_s'(w) = 5 w - 10); query xq = [3], yq = [6] (L_q'(w) = 18 w - 36)
MAML_SHARD = shard([1, 2], [2, 4], [3], [6])

# ------------------------------------------------------------------------------------------------ Per-FedAvg

# all local data x = [1, 1], y = [2, 2]: L'(w) = 2 (w - 2), L'' = 2. alpha = 0.25: w~ = 0.5 w + 1, v = L'(w~) = w - 2.
# FO, beta 0.5: w <- w - 0.5 (w - 2) = 0.5 w + 1.  HF: w <- w - 0.5 (v - 0.25 * 2 v) = 0.75 w + 0.5.
FLAT = shard([1], [2], [1], [2])


@pytest.mark.parametrize(("hf", "steps", "w_end"), [(False, 1, 1.0), (False, 2, 1.5), (True, 1, 0.5), (True, 2, 0.875)])
def test_per_fedavg_full_batch(hf, steps, w_end):
    c = cfg("perfedavg_hf" if hf else "perfedavg_fo", steps=steps, lr=0.25, outer_lr=0.5)
    upd = per_fedavg_update(linear(), theta(0.0), FLAT, c, rng(), F.mse_loss, hessian_free=hf)
    assert upd.vector.item() == pytest.approx(w_end, rel=1e-9)  # delta from w0 = 0
    assert upd.loss_before == pytest.approx(4.0, rel=1e-12)
    assert upd.loss_after == pytest.approx((w_end - 2) ** 2, rel=1e-9)
    assert upd.samples_processed == (3 if hf else 2) * 2 * steps
    assert upd.samples_processed == planned_samples(ALGORITHMS[c.name], c, 1, 1)


def test_per_fedavg_outer_lr_0_is_local_lr():
    # beta = alpha = 0.25: w <- w - 0.25 (w - 2): from 0, 0.5
    upd = per_fedavg_update(linear(), theta(0.0), FLAT, cfg("perfedavg_fo", lr=0.25), rng(), F.mse_loss, False)
    assert upd.vector.item() == pytest.approx(0.5, rel=1e-12)


@pytest.mark.parametrize("hf", [False, True])
def test_per_fedavg_mini_batches_follow_independent_plans(hf):
    x, y = np.array([1.0, 2.0, -1.0, 0.5, 3.0]), np.array([0.5, 1.0, 2.0, -1.0, 1.5])
    data = shard(x[:3], y[:3], x[3:], y[3:])
    alpha, beta, w0, steps = 0.05, 0.1, 0.3, 3
    c = cfg("perfedavg_hf" if hf else "perfedavg_fo", steps=steps, lr=alpha, batch_size=2, outer_lr=beta)
    upd = per_fedavg_update(linear(), theta(w0), data, c, rng(5), F.mse_loss, hessian_free=hf)
    r = rng(5)
    plans = [batch_plan(r, 5, 2, steps) for _ in range(3 if hf else 2)]  # D, D' (, D''), one stream each

    def grad(w: float, b: np.ndarray) -> float:
        return 2 * np.mean(x[b] * (w * x[b] - y[b]))

    w = w0
    for s in range(steps):
        v = grad(w - alpha * grad(w, plans[0][s]), plans[1][s])
        w = w - beta * (v - alpha * 2 * np.mean(x[plans[2][s]] ** 2) * v) if hf else w - beta * v
    assert upd.vector.item() == pytest.approx(w - w0, rel=1e-9)
    assert upd.samples_processed == (3 if hf else 2) * steps * 2 == planned_samples(ALGORITHMS[c.name], c, 3, 2)
    assert upd.loss_after == pytest.approx(np.mean((w * x - y) ** 2), rel=1e-9)


def test_per_fedavg_hf_approximates_the_exact_hessian_vector_product():
    # softmax regression (curved loss): HF's finite difference -> Eq. 8's exact H v as delta -> 0
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 2, generator=g, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1, 0])
    data = ClientShard(0, Split(x[:4], y[:4]), Split(x[4:], y[4:]))
    w0 = torch.tensor([0.3, -0.5, 0.8, 0.1, 0.2, -0.4], dtype=torch.float64)
    alpha, beta = 0.5, 0.7

    def grad(w: torch.Tensor) -> torch.Tensor:
        return torch.func.grad(lambda u: F.cross_entropy(x @ u[:4].reshape(2, 2).T + u[4:], y))(w)

    v = grad(w0 - alpha * grad(w0))
    hv = torch.func.jvp(grad, (w0,), (v,))[1]
    exact = -beta * (v - alpha * hv)
    model = nn.utils.skip_init(nn.Linear, 2, 2, dtype=D)
    for delta, tol in ((1e-4, 1e-7), (1e-2, 1e-4)):
        c = cfg("perfedavg_hf", lr=alpha, outer_lr=beta, hf_delta=delta)
        upd = per_fedavg_update(model, w0, data, c, rng(), F.cross_entropy, hessian_free=True)
        torch.testing.assert_close(upd.vector, exact, rtol=tol, atol=tol * 1e-2)
    fo = per_fedavg_update(model, w0, data, cfg("perfedavg_fo", lr=alpha, outer_lr=beta), rng(), F.cross_entropy,
                           hessian_free=False)
    torch.testing.assert_close(fo.vector, -beta * v, rtol=1e-12, atol=1e-15)
    assert not torch.allclose(fo.vector, exact, rtol=1e-3)


def test_per_fedavg_server_averages_uniformly():
    # FLAT -> 1.0 (above); x = [1, 1], y = [0, 0] gives v = w~ = 0.5 w: from 0 the delta is 0. Mean 0.5.
    c = cfg("perfedavg_fo", lr=0.25, outer_lr=0.5, server_lr=0.5)
    algo = ALGORITHMS["perfedavg_fo"]
    other = shard([1], [0], [1], [0])
    vectors = [algo.client_step(linear(), theta(0.0), s, c, rng(), F.mse_loss).vector for s in (FLAT, other)]
    opt = ServerOptimizer(theta(0.0), c)
    weights = [opt.client_weight(n) for n in (2, 7)]
    assert weights == [1.0, 1.0] and algo.update == "delta"
    mean = sum(w * v for w, v in zip(weights, vectors, strict=True)) / sum(weights)
    assert opt.step(pseudo_gradient(algo, mean)).item() == pytest.approx(0.25, rel=1e-12)  # 0 + 0.5 * 0.5


# --------------------------------------------------------------------------------------------------- Meta-SGD


def test_metasgd_vector_layout():
    th = theta(0.5, -1.0, 2.0)
    out = initial_vector(cfg("metasgd", lr=0.03), th)
    assert out.tolist() == pytest.approx([0.5, -1.0, 2.0, 0.03, 0.03, 0.03], rel=1e-15)
    for name in ("fedavg", "reptile", "fomaml", "maml", "perfedavg_fo", "perfedavg_hf", "pfedavg"):
        assert initial_vector(cfg(name), th) is th
    params, alpha = split_vector(ALGORITHMS["metasgd"], out, 3)
    assert params.tolist() == [0.5, -1.0, 2.0] and alpha.tolist() == pytest.approx([0.03] * 3)
    with pytest.raises(ValueError, match="expected 6"):
        split_vector(ALGORITHMS["metasgd"], th, 3)


# MAML_SHARD: support x = [1, 2], y = [2, 4] (L_s' = 5 w - 10), query x = [3], y = [6] (L_q' = 18 w - 36).
# From w = 0, alpha = 0.1: w1 = w - alpha (5 w - 10) = 1, dw1/dw = 1 - 5 alpha = 0.5, dw1/dalpha = -(5 w - 10) = 10.
# Two steps: w2 = 1.5, dw2/dw = 0.25, dw2/dalpha = 0.5 * 10 - (5 * 1 - 10) = 10.
@pytest.mark.parametrize(("steps", "expected", "loss_after"), [(1, [-9.0, -180.0], 9.0), (2, [-2.25, -90.0], 2.25)])
def test_metasgd_update_one_parameter(steps, expected, loss_after):
    upd = metasgd_update(linear(), theta(0.0, 0.1), MAML_SHARD, cfg("metasgd", steps=steps), rng(), F.mse_loss)
    assert upd.vector.tolist() == pytest.approx(expected, rel=1e-12)
    assert upd.loss_before == pytest.approx(36.0, rel=1e-12)
    assert upd.loss_after == pytest.approx(loss_after, rel=1e-12)
    assert upd.samples_processed == 2 * steps + 1 == planned_samples(ALGORITHMS["metasgd"], cfg(steps=steps), 2, 1)


def test_metasgd_update_affine_model_matches_closed_form():
    # theta_{k+1} = theta_k - alpha o g_k; J_theta <- (I - diag(alpha) H) J_theta,
    # J_alpha <- (I - diag(alpha) H) J_alpha - diag(g_k); the meta-gradient is [J_theta^T gq ; J_alpha^T gq]
    xs, ys = np.array([[1.0, 0.5], [-1.0, 2.0], [0.5, -1.5]]), np.array([1.0, 0.0, -2.0])
    xq, yq = np.array([[2.0, 1.0], [0.0, -1.0]]), np.array([0.5, 1.5])
    th0, alpha = np.array([0.3, -0.2, 0.1]), np.array([0.05, 0.02, 0.1])
    xa = np.hstack([xs, np.ones((3, 1))])
    hess = 2 / 3 * xa.T @ xa
    th, j_th, j_al = th0.copy(), np.eye(3), np.zeros((3, 3))
    for _ in range(3):
        g = 2 / 3 * xa.T @ (xa @ th - ys)
        j_th, j_al = (np.eye(3) - np.diag(alpha) @ hess) @ j_th, (np.eye(3) - np.diag(alpha) @ hess) @ j_al - np.diag(g)
        th = th - alpha * g
    xqa = np.hstack([xq, np.ones((2, 1))])
    gq = xqa.T @ (xqa @ th - yq)  # 2 / 2 * ...
    data = ClientShard(0, Split(torch.tensor(xs), col(ys)), Split(torch.tensor(xq), col(yq)))
    upd = metasgd_update(linear(2, bias=True), torch.tensor(np.concatenate([th0, alpha])), data,
                         cfg("metasgd", steps=3), rng(), F.mse_loss)
    np.testing.assert_allclose(upd.vector.numpy(), np.concatenate([j_th.T @ gq, j_al.T @ gq]), rtol=1e-12, atol=1e-14)


def test_metasgd_server_learns_alpha():
    c = cfg("metasgd", server_lr=0.01)
    opt = ServerOptimizer(initial_vector(c, theta(0.0)), c)
    upd = ALGORITHMS["metasgd"].client_step(linear(), opt.params, MAML_SHARD, c, rng(), F.mse_loss)
    assert opt.client_weight(9) == 1.0 and ALGORITHMS["metasgd"].update == "gradient"
    out = opt.step(pseudo_gradient(ALGORITHMS["metasgd"], upd.vector))  # [0, 0.1] - 0.01 [-9, -180]
    assert out.tolist() == pytest.approx([0.09, 1.9], rel=1e-12)


def test_metasgd_evaluation_adapts_with_the_learned_rates():
    ev = EvalConfig(adapt_steps=1, adapt_lr=0.02)
    meta, plain = AlgorithmConfig(name="metasgd", batch_size=0), AlgorithmConfig(name="reptile", batch_size=0)
    # alpha = 0.1: w = 0 + 0.1 * 10 = 1, query loss (3 - 6)^2 = 9; adapt_lr 0.02 would give w = 0.2, (0.6 - 6)^2
    out = evaluate_client(linear(), theta(0.0, 0.1), MAML_SHARD, ev, meta, rng(), F.mse_loss, "regression")
    assert out.loss_pre == pytest.approx(36.0, rel=1e-12) and out.loss_post == pytest.approx(9.0, rel=1e-12)
    base = evaluate_client(linear(), theta(0.0), MAML_SHARD, ev, plain, rng(), F.mse_loss, "regression")
    assert base.loss_post == pytest.approx(29.16, rel=1e-12)
    # elementwise: weight rate 0.1, bias rate 0 -> the bias stays 0.5. Support L_s'(w) at (w, b) = (0, 0.5):
    # 2 mean(x (w x + b - y)) = (1 * (0.5 - 2) + 2 * (0.5 - 4)) = -8.5 -> w = 0.85; query (3 * 0.85 + 0.5 - 6)^2
    affine = linear(1, bias=True)
    out = evaluate_client(affine, theta(0.0, 0.5, 0.1, 0.0), MAML_SHARD, ev, meta, rng(), F.mse_loss, "regression")
    assert out.loss_post == pytest.approx((3 * 0.85 + 0.5 - 6) ** 2, rel=1e-12)
    assert affine.bias.item() == 0.5


# ------------------------------------------------------------------------------------------ Personalized FedAvg


def test_pfedavg_switches_from_fedavg_momentum_to_reptile_adam():
    c = cfg("pfedavg", server_lr=0.1, server_momentum=0.9, switch_round=2, finetune_server_lr=0.01)
    opt = ServerOptimizer(theta(1.0), c)
    assert opt.client_weight(7) == 7.0 and not opt.finetuning
    assert opt.step(theta(1.0)).item() == pytest.approx(0.9, rel=1e-15)   # SGD momentum, buf = 1
    assert opt.client_weight(7) == 7.0
    assert opt.step(theta(0.5)).item() == pytest.approx(0.76, rel=1e-14)  # buf = 0.9 + 0.5
    assert opt.state.momentum is not None and opt.state.step == 2
    # version 2 = switch_round: uniform weights, Adam with fresh moments (t = 1: a step of lr * sign(g))
    assert opt.finetuning and opt.client_weight(7) == 1.0
    assert opt.step(theta(2.0)).item() == pytest.approx(0.75, abs=1e-9)
    st = opt.state
    assert st.momentum is None and st.step == 3
    assert st.exp_avg.item() == pytest.approx(0.2, rel=1e-12) and st.exp_avg_sq.item() == pytest.approx(0.004, rel=1e-9)
    # Adam's count restarts at the switch: a constant g moves lr per step (t = 2, not 4)
    assert opt.step(theta(2.0)).item() == pytest.approx(0.74, abs=1e-9)
    assert opt.client_weight(7) == 1.0


def test_pfedavg_phase_follows_a_replaced_state():
    # the async driver (FedAsync) and resumed checkpoints replace opt.state directly
    opt = ServerOptimizer(theta(1.0), cfg("pfedavg", switch_round=3))
    opt.state = ServerState(theta(0.5), 3)
    assert opt.finetuning and opt.client_weight(5) == 1.0
    opt.state = ServerState(theta(0.5), 2)
    assert not opt.finetuning and opt.client_weight(5) == 5.0
    assert not ServerOptimizer(theta(1.0), cfg("fedavg", switch_round=0)).finetuning


# ---------------------------------------------------------------------------------- worker and vectorized path

CASES = [["data.name=\"sinusoid\""], ["data.name=\"sinusoid\"", "algorithm.batch_size=0"], ["data.name=\"synthetic\""],
         ["data.name=\"synthetic\"", "data.samples_per_client=8", "algorithm.batch_size=6"]]


def _worker(algorithm: str, extra: list[str], vectorize: bool = True) -> tuple[ClientWorker, np.ndarray]:
    c = load_config(None, small_overrides(**{"algorithm.name": algorithm, "algorithm.local_steps": 3,
                                              "system.vectorize": vectorize}) + extra)
    worker = ClientWorker(WorkerSpec.from_config(c))
    return worker, initial_vector(c.algorithm, flat_params(worker.model)).numpy()


@pytest.mark.parametrize("algorithm", NEW)
@pytest.mark.parametrize("extra", CASES, ids=["sinusoid", "sinusoid-full", "synthetic", "synthetic-mixed"])
def test_vectorized_updates_equal_the_sequential_ones(algorithm, extra):
    (seq, th), (vec, _) = _worker(algorithm, extra, vectorize=False), _worker(algorithm, extra)
    assert seq.vectorized is None and vec.vectorized is not None
    clients, keys = [0, 3, 5, 6, 11, 17, 20], [7, 7, 7, 8, 8, 9, 9]
    a, b = seq.train(th, keys, clients), vec.train(th, keys, clients)
    np.testing.assert_array_equal(a.samples_processed, b.samples_processed)
    atol = 1e-6
    if algorithm == "perfedavg_hf":
        # as in test_vectorized: the paths sum gradients in other orders (up to n u |g|, n a step's samples times
        # the widest layer), which the finite difference divides by delta and scales by alpha (Eq. 10)
        c = seq.spec.algorithm
        n = max(len(seq.shard(i).all) for i in clients) if c.batch_size == 0 else c.batch_size
        width = max(max(p.shape) for p in seq.model.parameters())
        atol = c.local_lr * n * width * (np.finfo(np.float32).eps / 2) / c.hf_delta * np.abs(a.vectors).max()
    np.testing.assert_allclose(b.vectors, a.vectors, rtol=1e-4, atol=atol)
    np.testing.assert_allclose(b.loss_before, a.loss_before, rtol=1e-5, atol=1e-7)
    # first order in the weights: for perfedavg_hf the differences grow as 1 / delta (1e-4 held at delta 1e-3)
    loss_rtol = 1e-4 * max(1.0, 1e-3 / seq.spec.algorithm.hf_delta) if algorithm == "perfedavg_hf" else 1e-4
    np.testing.assert_allclose(b.loss_after, a.loss_after, rtol=loss_rtol, atol=1e-6)
    assert np.abs(a.vectors).max() > 0


@pytest.mark.parametrize("algorithm", NEW)
def test_a_clients_vectorized_update_does_not_depend_on_its_call_mates(algorithm):
    worker, th = _worker(algorithm, CASES[2])
    ids = list(range(0, 12, 2))
    whole = worker.train(th, 1, ids)
    parts = [worker.train(th, 1, ids[i:i + 2]) for i in range(0, len(ids), 2)]
    np.testing.assert_array_equal(np.concatenate([p.vectors for p in parts]), whole.vectors)


def test_metasgd_worker_trains_and_evaluates_the_split_vector():
    worker, th = _worker("metasgd", CASES[2])
    p = flat_params(worker.model).numel()
    assert th.size == worker.vector_size == 2 * p
    res = worker.train(th, 0, [1, 2])
    assert res.vectors.shape == (2, 2 * p) and np.any(res.vectors[:, p:] != 0)  # alpha gets a meta-gradient
    ev = worker.evaluate(th, 0, [24, 25])
    assert np.all(np.isfinite(ev.loss_post)) and not np.array_equal(ev.loss_pre, ev.loss_post)
    with pytest.raises(ValueError, match="needs"):
        worker.train(th[:p], 0, [1])


# ------------------------------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("algorithm", NEW)
def test_end_to_end_run(algorithm, tmp_path):
    c = load_config(None, small_overrides(**{"algorithm.name": algorithm, "data.name": "synthetic",
                                              "system.backend": "inline"}))
    summary = run_with_backend(c, tmp_path)
    assert summary["status"] == "completed" and summary["rounds_completed"] == 4
    assert json.loads((tmp_path / "summary.json").read_text())["algorithm"] == algorithm
    rounds, clients = pd.read_parquet(tmp_path / "rounds.parquet"), pd.read_parquet(tmp_path / "clients.parquet")
    assert np.all(np.isfinite(rounds["train_loss"])) and np.all(np.isfinite(rounds["update_norm"]))
    assert np.all(np.isfinite(rounds["eval_loss_post"].dropna())) and rounds["eval_loss_post"].notna().sum() == 3
    weights = clients.groupby("round")["weight"].apply(list)
    if algorithm == "pfedavg":  # switch_round = rounds // 2 = 2: FedAvg's n_i, then Reptile's uniform weights
        assert c.algorithm.switch_round == 2
        for r in (0, 1):
            assert weights[r] == clients[clients["round"] == r]["num_samples"].astype(float).tolist()
        assert all(w == 1.0 for r in (2, 3) for w in weights[r])
    else:
        assert all(w == 1.0 for ws in weights for w in ws)


@pytest.mark.parametrize("algorithm", ["metasgd", "pfedavg"])
def test_end_to_end_async_fedbuff(algorithm, tmp_path):
    c = load_config(None, small_overrides(**{"algorithm.name": algorithm, "system.backend": "inline",
                                              "data.name": "synthetic", "system.mode": "async",
                                              "async.buffer_size": 3}))
    summary = run_with_backend(c, tmp_path)
    assert summary["status"] == "completed" and summary["rounds_completed"] == 4
    rounds = pd.read_parquet(tmp_path / "rounds.parquet")
    assert np.all(np.isfinite(rounds["train_loss"])) and np.all(np.isfinite(rounds["eval_loss_post"].dropna()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_default_hf_delta_gives_the_exact_hessian_vector_product_within_1e_3_on_the_built_in_mlp(dtype):
    # Per-FedAvg HF's d = [g(w + delta v) - g(w - delta v)] / (2 delta) (Eq. 10) against autograd's H v (double
    # backward of <grad f(w), v>) on the default model (MLP 1-40-40-1, ReLU) at its seeded initialization, with
    # v = grad f(w - alpha grad f(w, D), D') as in a local step on sinusoid clients' batches of 10. The step is
    # the error: at delta = 1e-3 ReLU kinks within delta |v| of w put it 50% off (in float64 too); at the
    # default 1e-5 the worst of these clients is 9.6e-4 in float32 (rounding, ~u |g| / delta) and 1e-8 in float64.
    delta = AlgorithmConfig().hf_delta
    model = build_model(ModelConfig(), 1, 1, 0).to(dtype)
    dataset = make_dataset(DataConfig(), 0)
    worst = {}
    for client in range(10):
        data, r = dataset.shard(client).all, generator(0, "batches", 0, client)
        batches = [(data.x[i].to(dtype), data.y[i].to(dtype))
                   for i in (torch.from_numpy(r.permutation(len(data))[:10]) for _ in range(3))]
        w = {n: p.detach() for n, p in model.named_parameters()}

        def f(p, which, batches=batches):
            return F.mse_loss(torch.func.functional_call(model, p, (batches[which][0],)), batches[which][1])

        def grad_at(p, which, f=f):
            return torch.func.grad(f)(p, which)

        v = grad_at({n: w[n] - 0.02 * g for n, g in grad_at(w, 0).items()}, 1)
        leaves = {n: t.clone().requires_grad_(True) for n, t in w.items()}
        g = torch.autograd.grad(f(leaves, 2), list(leaves.values()), create_graph=True)
        hv = torch.autograd.grad(sum((gi * v[n]).sum() for gi, n in zip(g, leaves, strict=True)),
                                 list(leaves.values()))
        d = gradient_difference(grad_at, w, v, delta)
        exact = torch.cat([h.double().flatten() for h in hv])
        approx = torch.cat([(d[n].double() / (2 * delta)).flatten() for n in w])
        worst[client] = float(torch.linalg.vector_norm(approx - exact) / torch.linalg.vector_norm(exact))
    assert max(worst.values()) < 1e-3, worst
