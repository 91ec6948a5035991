"""Client and server steps of FedAvg, Reptile, FOMAML and MAML against hand-derived values.

The models are tiny linear maps with hand-set weights (float64), built without touching the global RNG.
For y = w x with MSE, L(w) = mean((w x - y)^2), L'(w) = 2 mean(x (w x - y)), L''(w) = 2 mean(x^2).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny import D, cfg, col, linear, rng, shard, theta

from simulator.algorithms.aggregation import weighted_mean
from simulator.algorithms.fedavg import local_sgd_update
from simulator.algorithms.maml import maml_update
from simulator.algorithms.record import client_weight, pseudo_gradient
from simulator.algorithms.registry import ALGORITHMS
from simulator.algorithms.server import ServerOptimizer, update_norm
from simulator.algorithms.steps import batch_plan, full_loss, loss_function, processed, take
from simulator.config.schema import AlgorithmConfig
from simulator.data.base import ClientShard, Split
from simulator.params import load_flat

# ---------------------------------------------------------------------------------------------- batch plans


@pytest.mark.parametrize(("n", "batch_size"), [(5, 0), (5, 5), (5, 9), (1, 1)])
def test_batch_plan_full_batch(n, batch_size):
    assert batch_plan(rng(), n, batch_size, 4) == [None] * 4


def test_batch_plan_zero_steps_is_empty():
    assert batch_plan(rng(), 10, 3, 0) == []


def test_batch_plan_zero_steps_full_batch():
    assert batch_plan(rng(), 10, 0, 0) == []


def test_batch_plan_epochs_are_permutations():
    plan = batch_plan(rng(1), 12, 3, 8)
    assert len(plan) == 8
    assert all(b.shape == (3,) for b in plan)
    for epoch in range(2):  # 12 / 3 = 4 steps per epoch
        seen = np.concatenate(plan[4 * epoch:4 * epoch + 4])
        assert sorted(seen.tolist()) == list(range(12))


@pytest.mark.parametrize(("n", "batch_size", "steps"), [(50, 10, 5), (12, 3, 8), (10, 3, 7), (7, 6, 1)])
def test_batch_plan_is_one_array_of_the_streams_permutations(n, batch_size, steps):
    """Its rows are the batches cut, one after another, from the epochs' permutations of the client's stream."""
    plan = batch_plan(rng(3), n, batch_size, steps)
    ref, order = rng(3), np.zeros(0, np.int64)
    while order.size < steps * batch_size:
        order = np.concatenate([order, ref.permutation(n)])
    want = [order[i * batch_size:(i + 1) * batch_size] for i in range(steps)]
    assert isinstance(plan, np.ndarray) and plan.shape == (steps, batch_size)
    assert all(np.array_equal(b, w) for b, w in zip(plan, want, strict=True))
    assert processed(n, plan) == steps * batch_size == sum(len(b) for b in want)
    assert ref.random() == _after(n, batch_size, steps)  # the plan drew its epochs' permutations, no more


def _after(n: int, batch_size: int, steps: int) -> float:
    """The stream's next value after a plan: a plan consumes exactly its epochs' permutations."""
    g = rng(3)
    batch_plan(g, n, batch_size, steps)
    return g.random()


def test_batch_plan_partial_epochs():
    plan = batch_plan(rng(2), 10, 3, 7)  # 21 indices: two full epochs and one more
    flat = np.concatenate(plan)
    assert flat.shape == (21,)
    assert sorted(flat[:10].tolist()) == list(range(10))
    assert sorted(flat[10:20].tolist()) == list(range(10))
    assert 0 <= flat[20] < 10


def test_batch_plan_is_deterministic_per_seed():
    a, b, c = (batch_plan(rng(s), 20, 4, 9) for s in (5, 5, 6))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_take_and_loss_helpers():
    split = Split(col([10, 20, 30]), col([1, 2, 3]))
    x, y = take(split, np.array([2, 0]))
    assert x.flatten().tolist() == [30.0, 10.0] and y.flatten().tolist() == [3.0, 1.0]
    x, y = take(split, None)
    assert x is split.x and y is split.y
    assert loss_function("regression") is F.mse_loss
    assert loss_function("classification") is F.cross_entropy
    model = linear()
    load_flat(model, theta(0.5))
    # mean((0.5*x - y)^2) for x = 10, 20, 30 and y = 1, 2, 3: (16 + 64 + 144) / 3
    assert full_loss(model, split, F.mse_loss) == pytest.approx(224 / 3, rel=1e-14)


# ------------------------------------------------------------------------------------- FedAvg / Reptile step


def sgd_loss(w: float) -> float:
    # data x = [1, 2, 3], y = [2, 4, 3]: mean(x^2) = 14/3, mean(xy) = 19/3, mean(y^2) = 29/3
    return (14 * w * w - 38 * w + 29) / 3


# with lr = 0.03: w <- w - 0.03 * 2 (14 w - 19) / 3 = 0.72 w + 0.38
@pytest.mark.parametrize(
    ("w0", "steps", "w_end"),
    [(0.0, 1, 0.38), (0.0, 3, 0.850592), (1.0, 1, 1.1), (1.0, 3, 1.22384)],
)
def test_local_sgd_update_full_batch(w0, steps, w_end):
    model = linear()
    th = theta(w0)
    data = shard([1, 2], [2, 4], [3], [3])  # the client step trains on support and query together
    upd = local_sgd_update(model, th, data, cfg(steps=steps, lr=0.03), rng(), F.mse_loss)
    assert upd.vector.shape == (1,)
    assert upd.vector.item() == pytest.approx(w_end - w0, rel=1e-12, abs=1e-14)
    assert upd.loss_before == pytest.approx(sgd_loss(w0), rel=1e-12)
    assert upd.loss_after == pytest.approx(sgd_loss(w_end), rel=1e-12)
    assert upd.samples_processed == 3 * steps
    assert th.item() == w0  # theta itself is not modified


def test_local_sgd_update_mini_batches_follow_the_plan():
    xs, ys = [1.0, 2.0, -1.0, 3.0, 0.5], [1.0, -2.0, 0.0, 2.0, 1.0]
    data = shard(xs[:3], ys[:3], xs[3:], ys[3:])
    c = cfg(steps=4, lr=0.05, batch_size=2)
    upd = local_sgd_update(linear(), theta(0.25), data, c, rng(11), F.mse_loss)
    x, y, w = np.array(xs), np.array(ys), 0.25
    for batch in batch_plan(rng(11), 5, 2, 4):
        w -= 0.05 * 2 * np.mean(x[batch] * (w * x[batch] - y[batch]))
    assert upd.vector.item() == pytest.approx(w - 0.25, rel=1e-12)
    assert upd.samples_processed == 8
    assert upd.loss_after == pytest.approx(np.mean((w * x - y) ** 2), rel=1e-12)


# ------------------------------------------------------------------------------------------ MAML / FOMAML

# support xs = [1, 2], ys = [2, 4]: L_s'(w) = 5 w - 10, L_s''(w) = 5; with alpha = 0.1 one inner step is
# w' = 0.5 w + 1 and dw'/dw = 0.5. Query xq = [3], yq = [6]: L_q'(w) = 18 w - 36, L_q(w) = (3 w - 6)^2.
MAML_SHARD = shard([1, 2], [2, 4], [3], [6])


@pytest.mark.parametrize(
    ("steps", "second_order", "grad", "loss_after"),
    [
        (1, True, -9.0, 9.0),      # w' = 1: L_q'(1) = -18, times 0.5
        (1, False, -18.0, 9.0),    # first order: L_q'(w') only
        (2, True, -2.25, 2.25),    # w'' = 1.5: L_q'(1.5) = -9, times 0.5 * 0.5
        (2, False, -9.0, 2.25),
    ],
)
def test_maml_update_one_parameter(steps, second_order, grad, loss_after):
    upd = maml_update(linear(), theta(0.0), MAML_SHARD, cfg("maml", steps=steps, lr=0.1), rng(), F.mse_loss,
                      second_order=second_order)
    assert upd.vector.shape == (1,)
    assert upd.vector.item() == pytest.approx(grad, rel=1e-12)
    assert upd.loss_before == pytest.approx(36.0, rel=1e-12)  # query loss at theta: (0 - 6)^2
    assert upd.loss_after == pytest.approx(loss_after, rel=1e-12)
    assert upd.samples_processed == 2 * steps + 1


def test_maml_and_fomaml_agree_when_the_hessian_vanishes():
    # support inputs all zero: L_s'' = 0, so w' = w and dw'/dw = 1; both give L_q'(w) = 2*3*(3*0.5 - 6) = -27
    data = shard([0, 0], [1, 1], [3], [6])
    for second_order in (True, False):
        upd = maml_update(linear(), theta(0.5), data, cfg("maml", steps=2), rng(), F.mse_loss,
                          second_order=second_order)
        assert upd.vector.item() == pytest.approx(-27.0, rel=1e-12)


def _affine_grad_hess(x: np.ndarray, y: np.ndarray, th: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gradient and Hessian of mean((x w + b - y)^2) w.r.t. (w_1..w_d, b)."""
    xa = np.hstack([x, np.ones((len(x), 1))])
    n = len(x)
    return 2 / n * xa.T @ (xa @ th - y), 2 / n * xa.T @ xa


@pytest.mark.parametrize("second_order", [True, False])
def test_maml_update_affine_model_matches_closed_form(second_order):
    xs = np.array([[1.0, 0.5], [-1.0, 2.0], [0.5, -1.5]])
    ys = np.array([1.0, 0.0, -2.0])
    xq = np.array([[2.0, 1.0], [0.0, -1.0]])
    yq = np.array([0.5, 1.5])
    th0 = np.array([0.3, -0.2, 0.1])  # parameter order of nn.Linear: weight (1 x 2), then bias
    alpha, steps = 0.05, 3
    th, jac = th0.copy(), np.eye(3)
    for _ in range(steps):
        g, h = _affine_grad_hess(xs, ys, th)
        th, jac = th - alpha * g, (np.eye(3) - alpha * h) @ jac
    gq, _ = _affine_grad_hess(xq, yq, th)
    expected = jac.T @ gq if second_order else gq

    data = ClientShard(0, Split(torch.tensor(xs), col(ys)), Split(torch.tensor(xq), col(yq)))
    upd = maml_update(linear(2, bias=True), torch.tensor(th0), data, cfg("maml", steps=steps, lr=alpha), rng(),
                      F.mse_loss, second_order=second_order)
    np.testing.assert_allclose(upd.vector.numpy(), expected, rtol=1e-12, atol=1e-14)
    assert upd.loss_after == pytest.approx(np.mean((np.hstack([xq, np.ones((2, 1))]) @ th - yq) ** 2), rel=1e-12)


def test_maml_update_mini_batches_follow_the_plan():
    xs, ys = np.array([1.0, 2.0, -1.0, 0.5]), np.array([0.0, 1.0, 2.0, -1.0])
    xq, yq = np.array([3.0, -2.0, 1.0]), np.array([1.0, 1.0, 0.0])
    data = shard(xs, ys, xq, yq)
    alpha, w0 = 0.1, 0.2
    upd = maml_update(linear(), theta(w0), data, cfg("maml", steps=2, lr=alpha, batch_size=2), rng(3), F.mse_loss,
                      second_order=True)
    r = rng(3)
    plan = batch_plan(r, 4, 2, 2)
    (qb,) = batch_plan(r, 3, 2, 1)
    w, dw = w0, 1.0
    for b in plan:
        w, dw = w - alpha * 2 * np.mean(xs[b] * (w * xs[b] - ys[b])), dw * (1 - alpha * 2 * np.mean(xs[b] ** 2))
    expected = 2 * np.mean(xq[qb] * (w * xq[qb] - yq[qb])) * dw
    assert upd.vector.item() == pytest.approx(expected, rel=1e-12)
    assert upd.loss_before == pytest.approx(np.mean((w0 * xq[qb] - yq[qb]) ** 2), rel=1e-12)
    assert upd.samples_processed == 2 + 2 + 2


# ------------------------------------------------------------------------------------------- server steps


def test_algorithm_table():
    assert set(ALGORITHMS) == {"fedavg", "reptile", "fomaml", "maml", "pfedavg", "perfedavg_fo", "perfedavg_hf",
                               "metasgd"}
    assert client_weight(ALGORITHMS["fedavg"], 7) == 7.0
    for name in ("reptile", "fomaml", "maml", "perfedavg_fo", "perfedavg_hf", "metasgd"):
        assert client_weight(ALGORITHMS[name], 7) == 1.0


def test_pseudo_gradient_signs():
    v = theta(1.0, -2.0)
    assert torch.equal(pseudo_gradient(ALGORITHMS["fedavg"], v), theta(-1.0, 2.0))
    assert torch.equal(pseudo_gradient(ALGORITHMS["reptile"], v), theta(-1.0, 2.0))
    assert torch.equal(pseudo_gradient(ALGORITHMS["fomaml"], v), v)
    assert torch.equal(pseudo_gradient(ALGORITHMS["maml"], v), v)


def server_round(name: str, th: torch.Tensor, shards: list[ClientShard], c: AlgorithmConfig) -> torch.Tensor:
    algo = ALGORITHMS[name]
    updates = [algo.client_step(linear(), th, s, c, rng(s.client_id), F.mse_loss) for s in shards]
    vectors = torch.stack([u.vector for u in updates])
    weights = torch.tensor([client_weight(algo, s.num_samples) for s in shards], dtype=D)
    return ServerOptimizer(th, c).step(pseudo_gradient(algo, weighted_mean(vectors, weights)))


# one SGD step, lr 0.03, from w = 0 (full batch):
#   A: x = [1, 2, 3], y = [2, 4, 3]  -> w = 0.38 (see above), n = 3
#   B: x = [1, 1],    y = [1, 1]     -> w = 0 - 0.03 * 2 (0 - 1) = 0.06, n = 2
#   C: x = [1, 1, 1], y = [1, 1, 1]  -> w = 0.06, n = 3
SHARD_A = shard([1, 2], [2, 4], [3], [3], cid=0)
SHARD_B = shard([1], [1], [1], [1], cid=1)
SHARD_C = shard([1, 1], [1, 1], [1], [1], cid=2)


def test_reptile_with_server_lr_1_equals_fedavg_for_equal_sizes():
    c = cfg(steps=1, lr=0.03, server_lr=1.0)
    fedavg = server_round("fedavg", theta(0.0), [SHARD_A, SHARD_C], c)
    reptile = server_round("reptile", theta(0.0), [SHARD_A, SHARD_C], c)
    assert fedavg.item() == pytest.approx(0.22, rel=1e-12)  # (0.38 + 0.06) / 2
    torch.testing.assert_close(fedavg, reptile, rtol=1e-15, atol=0)


def test_fedavg_weights_by_sample_count():
    c = cfg(steps=1, lr=0.03, server_lr=1.0)
    fedavg = server_round("fedavg", theta(0.0), [SHARD_A, SHARD_B], c)
    reptile = server_round("reptile", theta(0.0), [SHARD_A, SHARD_B], c)
    assert fedavg.item() == pytest.approx((3 * 0.38 + 2 * 0.06) / 5, rel=1e-12)  # 0.252
    assert reptile.item() == pytest.approx((0.38 + 0.06) / 2, rel=1e-12)        # 0.22


def test_reptile_server_lr_scales_the_mean_delta():
    c = cfg(steps=1, lr=0.03, server_lr=0.5)
    out = server_round("reptile", theta(0.0), [SHARD_A, SHARD_B], c)
    assert out.item() == pytest.approx(0.5 * 0.22, rel=1e-12)


def test_maml_server_step_descends_the_mean_meta_gradient():
    # MAML_SHARD's meta-gradient at 0 is -9 (above); the other client adapts to the same w' = 1 but its
    # query yq = [3] gives L_q'(1) = 2*3*(3 - 3) = 0. Mean -4.5; theta <- 0 - 0.1 * (-4.5) = 0.45.
    other = shard([1, 2], [2, 4], [3], [3], cid=1)
    c = cfg("maml", steps=1, lr=0.1, server_lr=0.1)
    out = server_round("maml", theta(0.0), [MAML_SHARD, other], c)
    assert out.item() == pytest.approx(0.45, rel=1e-12)


def test_server_sgd_step():
    opt = ServerOptimizer(theta(1.0, -2.0), cfg(server_lr=0.1))
    out = opt.step(theta(0.5, 0.25))
    assert out.tolist() == pytest.approx([0.95, -2.025], rel=1e-15)
    assert torch.equal(opt.params, out)


def test_server_sgd_momentum():
    opt = ServerOptimizer(theta(1.0), cfg(server_lr=0.1, server_momentum=0.9))
    assert opt.step(theta(1.0)).item() == pytest.approx(0.9, rel=1e-15)    # buf = 1
    assert opt.step(theta(0.5)).item() == pytest.approx(0.76, rel=1e-14)   # buf = 0.9 + 0.5 = 1.4


def test_server_adam_first_step_is_lr_times_sign():
    th0, g, lr = theta(1.0, -2.0, 3.0), theta(0.5, -4.0, 0.0), 0.01
    opt = ServerOptimizer(th0, cfg(server_lr=lr, server_optimizer="adam"))
    out = opt.step(g)
    # after bias correction Adam's first step is lr * g / (|g| + eps), i.e. lr * sign(g) up to eps
    torch.testing.assert_close(out, th0 - lr * g / (g.abs() + 1e-8), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(out, theta(0.99, -1.99, 3.0), rtol=0, atol=1e-9)


def test_server_optimizer_does_not_alias_theta():
    th = theta(1.0, 2.0)
    opt = ServerOptimizer(th, cfg(server_lr=1.0))
    th[0] = 100.0
    assert opt.params.tolist() == [1.0, 2.0]
    p = opt.params
    p[1] = -5.0
    assert opt.params.tolist() == [1.0, 2.0]
    assert torch.equal(opt.state.theta, theta(1.0, 2.0)) and opt.state.step == 0


def test_server_adam_constant_gradient_moves_lr_per_step():
    # with g constant, m_hat = g and v_hat = g^2 at every step: each step is lr * g / (|g| + eps)
    th0, g, lr = theta(1.0, -2.0), theta(2.0, -0.5), 0.1
    opt = ServerOptimizer(th0, cfg(server_lr=lr, server_optimizer="adam"))
    opt.step(g)
    out = opt.step(g)
    torch.testing.assert_close(out, th0 - 2 * lr * g / (g.abs() + 1e-8), rtol=1e-12, atol=1e-15)
    assert opt.state.step == 2


@pytest.mark.parametrize(("optimizer", "momentum"), [("sgd", 0.0), ("sgd", 0.9), ("adam", 0.0), ("fedadagrad", 0.0),
                                                     ("fedadam", 0.0), ("fedyogi", 0.0)])
@pytest.mark.parametrize("name", ["fedavg", "maml", "pfedavg"])  # -mean; the mean itself; a change of rule mid-run
def test_a_mean_applied_block_by_block_gives_the_whole_vector_steps_bits(optimizer, momentum, name):
    """``step_mean`` (the driver's, on blocks of the vector) against ``step`` of the whole pseudo-gradient, in the
    runs' float32: every rule is elementwise, so new parameters and moments are equal bit for bit."""
    n, gen = 1003, torch.Generator().manual_seed(3)  # 15 blocks of 64 and a tail of 43
    extra = {"switch_round": 2} if name == "pfedavg" else {}
    c = cfg(name, server_lr=0.5, server_optimizer=optimizer, server_momentum=momentum, **extra)
    th = torch.randn(n, generator=gen)
    whole, blocks = ServerOptimizer(th, c), ServerOptimizer(th, c)
    for _ in range(4):
        mean = torch.randn(n, generator=gen)
        want, got = whole.step(pseudo_gradient(whole.algo, mean)), blocks.step_mean(mean, block=64)
        assert got.dtype == torch.float32 and torch.equal(got, want)
        for moment in ("momentum", "exp_avg", "exp_avg_sq"):
            a, b = getattr(whole.state, moment), getattr(blocks.state, moment)
            assert (a is None and b is None) or torch.equal(a, b), moment
        assert blocks.state.step == whole.state.step


def test_the_update_norm_is_the_float64_norm_of_the_float32_difference():
    gen = torch.Generator().manual_seed(4)
    new, old = torch.randn(1003, generator=gen), torch.randn(1003, generator=gen)
    exact = float(torch.linalg.vector_norm((new - old).double()))
    # only the order of the float64 sum of 1,003 squares differs: n * 2^-53 relative at most
    assert update_norm(new, old, block=64) == pytest.approx(exact, rel=1003 * 2.0**-53, abs=0)
    assert update_norm(old, old) == 0.0


def test_the_update_norm_does_not_depend_on_the_thread_count():
    """The inline driver runs with the worker's thread count, a Ray driver with torch's default: the norm must not
    change with it (a BLAS dot product of this size does, in its last bits)."""
    gen = torch.Generator().manual_seed(5)
    new, old = torch.randn(3 * 2**18 + 7, generator=gen), torch.randn(3 * 2**18 + 7, generator=gen)
    threads = torch.get_num_threads()
    try:
        norms = set()
        for n in (1, 2, 4):
            torch.set_num_threads(n)
            norms.add(update_norm(new, old))
    finally:
        torch.set_num_threads(threads)
    assert len(norms) == 1
