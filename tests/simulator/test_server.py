"""The server rules against hand-computed steps: Reddi et al. 2021's FedAdagrad, FedAdam and FedYogi (Alg. 2)
as printed, next to Kingma & Ba's Adam.

The numbers are dyadic fractions chosen so that every intermediate value (m, v, sqrt(v), the step) is exactly
representable in float64: the rules must reproduce them bit for bit. theta_{t+1} = theta_t - lr * step_t with
g = -Delta_t, so step_t = m_t / (sqrt(v_t) + tau), m and v taken over g (the sign cancels in v).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import small_overrides
from tiny import cfg, theta

from simulator.algorithms.server import FEDOPT, ServerOptimizer, ServerState, fedopt_step, sgd_step
from simulator.config.schema import ConfigError
from simulator.experiment import load_config

# rule: (tau, beta1, beta2, g_1, g_2, step_1, step_2), all exact
CASES = {
    # v_0 = 0.5625; v_1 = 0.5625 + 1 = 1.5625 = 1.25^2; m_1 = 0.5 g_1; step = 0.5 / (1.25 + 0.75) = 0.25;
    # v_2 = 1.5625 + 9 = 10.5625 = 3.25^2; m_2 = 0.5 m_1 + 0.5 g_2 = -1.75 (or -1.25); step = -1.75 / 4 = -0.4375
    "fedadagrad": (0.75, 0.5, 0.0, (-1.0, 1.0), (-3.0, -3.0), (-0.25, 0.25), (-0.4375, -0.3125)),
    # v_0 = 0.0625; v_1 = 0.875 * 0.0625 + 0.125 * 1.5625 = 0.25 = 0.5^2 (|g_1| = 1.25), m_1 = 0.75 g_1 = -0.9375:
    # step -0.9375 / 0.75 = -1.25; ...
    "fedadam": (0.25, 0.25, 0.875, (-1.25, 0.25, 1.25), (-2.5, -1.25, -2.5), (-1.25, 0.375, 1.25),
                (-1.6875, -1.1875, -1.3125)),
    # v_0 = 0.25; g_1 = 1: sign(0.25 - 1) = -1, v_1 = 0.25 + 0.75 = 1; g_1 = 4: v_1 = 0.25 + 12 = 12.25 = 3.5^2;
    # g_2 = 0 at v_1 = 12.25: sign(12.25) = 1 but g_2^2 = 0, so v_2 = v_1 and m_2 = 0.25 m_1 = 0.75: 0.75 / 4
    "fedyogi": (0.5, 0.25, 0.25, (1.0, -1.0, 4.0), (-1.0, -1.0, 0.0), (0.5, -0.5, 0.75), (-0.375, -0.625, 0.1875)),
}


@pytest.mark.parametrize("rule", FEDOPT)
def test_the_first_two_steps_are_the_hand_computed_ones_exactly(rule):
    tau, b1, b2, g1, g2, s1, s2 = CASES[rule]
    lr = 0.5
    th0 = theta(*[float(i) for i in range(len(g1))])
    opt = ServerOptimizer(th0, cfg(server_optimizer=rule, server_lr=lr, server_beta1=b1, server_beta2=b2,
                                   server_tau=tau))
    first = opt.step(theta(*g1))
    assert first.tolist() == [t - lr * s for t, s in zip(th0.tolist(), s1, strict=True)]
    assert opt.state.step == 1 and opt.state.exp_avg.tolist() == [(1 - b1) * g for g in g1]
    second = opt.step(theta(*g2))
    assert second.tolist() == [t - lr * s for t, s in zip(first.tolist(), s2, strict=True)]
    assert opt.state.step == 2


def test_fedopt_starts_from_v_equal_tau_squared_and_has_no_bias_correction():
    # one coordinate, g = 2: m_1 = (1 - b1) 2, v_1 = b2 tau^2 + (1 - b2) 4; no division by (1 - b^t)
    tau, b1, b2 = 1e-3, 0.9, 0.99
    new = fedopt_step(ServerState(theta(0.0)), theta(2.0), "fedadam", 1.0, b1, b2, tau)
    v1 = b2 * tau * tau + (1 - b2) * 4.0
    assert new.exp_avg_sq.item() == v1
    assert new.theta.item() == -((1 - b1) * 2.0) / (math.sqrt(v1) + tau)


def test_the_first_fedadam_step_is_3_2x_adams_with_adams_beta2_and_1x_with_the_papers():
    # Adam's bias-corrected first step is lr g / (|g| + eps) = lr sign(g). FedAdam's is
    # lr (1 - b1) g / (sqrt(b2 tau^2 + (1 - b2) g^2) + tau): (1 - b1) / sqrt(1 - b2) = 0.1 / sqrt(0.001) = 3.16
    # times larger with b2 = 0.999 (the 3.2x), 0.1 / sqrt(0.01) = 1x with the paper's b2 = 0.99, up to tau.
    g, lr = theta(1.0, -4.0, 0.25), 0.01
    adam = ServerOptimizer(theta(0.0, 0.0, 0.0), cfg(server_optimizer="adam", server_lr=lr)).step(g)
    for b2, tau in ((0.999, 1e-6), (0.99, 1e-3)):
        fed = ServerOptimizer(theta(0.0, 0.0, 0.0), cfg(server_optimizer="fedadam", server_lr=lr, server_beta2=b2,
                                                        server_tau=tau)).step(g)
        expected = [0.1 * abs(x) / (math.sqrt(b2 * tau * tau + (1 - b2) * x * x) + tau) / (abs(x) / (abs(x) + 1e-8))
                    for x in g.tolist()]
        assert (fed / adam).tolist() == pytest.approx(expected, rel=1e-12)
    # with b2 = 0.999 every coordinate is 3.16x (tau 1e-6 is a 1e-4 relative change at |g| = 0.25)
    fed = ServerOptimizer(theta(0.0, 0.0, 0.0), cfg(server_optimizer="fedadam", server_lr=lr, server_beta2=0.999,
                                                    server_tau=1e-6)).step(g)
    assert (fed / adam).tolist() == pytest.approx([0.1 / math.sqrt(0.001)] * 3, rel=2e-4)


def test_moments_start_afresh_and_are_kept_between_steps():
    opt = ServerOptimizer(theta(0.0), cfg(server_optimizer="fedyogi", server_tau=0.5))
    opt.step(theta(1.0))
    kept = opt.state
    assert kept.momentum is None and kept.exp_avg is not None and kept.exp_avg_sq is not None
    # a state put back from outside (a resumed checkpoint) continues exactly
    twin = ServerOptimizer(theta(0.0), cfg(server_optimizer="fedyogi", server_tau=0.5))
    twin.state = ServerState(kept.theta.clone(), kept.step, None, kept.exp_avg.clone(), kept.exp_avg_sq.clone())
    assert torch.equal(opt.step(theta(-2.0)), twin.step(theta(-2.0)))


@pytest.mark.parametrize(("key", "value", "message"), [
    ("algorithm.server_beta1", 1.0, r"algorithm\.server_beta1 must be in \[0, 1\)"),
    ("algorithm.server_beta2", -0.1, r"algorithm\.server_beta2 must be in \[0, 1\)"),
    ("algorithm.server_tau", 0.0, r"algorithm\.server_tau must be > 0"),
    ("algorithm.server_optimizer", '"fedprox"', r"algorithm\.server_optimizer = 'fedprox' is not supported"),
])
def test_bad_server_keys_name_the_key(key, value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, small_overrides() + [f"{key}={value}"])


def test_fedasync_refuses_the_adaptive_rules():
    with pytest.raises(ConfigError, match="fedasync"):
        load_config(None, small_overrides(**{"system.mode": "async", "async.rule": "fedasync",
                                             "algorithm.server_optimizer": "fedadam"}))


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_the_sgd_step_in_place_is_theta_minus_lr_b_bit_for_bit(momentum):
    # the step writes theta - lr * b over lr * b (no second model-sized vector): the same bits as the expression,
    # and the state it starts from is left as it was
    gen = torch.Generator().manual_seed(3)
    theta, g, m = (torch.randn(10_001, generator=gen) * 10.0 ** torch.randint(-6, 3, (10_001,), generator=gen)
                   for _ in range(3))
    state = ServerState(theta.clone(), 4, m.clone() if momentum else None)
    new = sgd_step(state, g, 0.37, momentum)
    b = momentum * m + g if momentum else g
    assert torch.equal(new.theta, theta - 0.37 * b)
    assert torch.equal(state.theta, theta) and new.theta.data_ptr() != state.theta.data_ptr()


@pytest.mark.parametrize("name", ["fedavg", "reptile", "pfedavg", "perfedavg_fo"])
def test_client_weights_of_a_cohort_are_each_clients_weight(name):
    """``client_weights`` gives, as float64, what ``client_weight`` gives client by client (FedAvg: the sample
    counts; the others: 1), before and after pfedavg's switch to uniformly weighted Reptile fine-tuning."""
    import numpy as np

    opt = ServerOptimizer(theta(0.0), cfg(name, switch_round=2) if name == "pfedavg" else cfg(name))
    n = np.array([7, 1, 50, 0, 3], np.int64)
    seen = set()
    for version in (0, 10**6):
        opt.state = ServerState(opt.state.theta, step=version)
        got = opt.client_weights(n)
        seen.add(opt.phase.weighting)
        assert got.dtype == np.float64
        np.testing.assert_array_equal(got, [opt.client_weight(int(k)) for k in n])
    assert opt.client_weights(n[:0]).shape == (0,)
    assert seen == ({"samples", "uniform"} if name == "pfedavg" else {"samples" if name == "fedavg" else "uniform"})
