"""FedAsync's proximal client (Xie et al. 2019, Alg. 1): local SGD on f(x) + rho/2 ||x - x_tau||^2.

For y = w x with MSE on x = [1, 1], y = [2, 2]: f'(w) = 2 (w - 2), and the proximal gradient adds rho (w - w_0).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch.nn.functional as F
from conftest import small_overrides
from tiny import cfg, linear, rng, shard, theta

from simulator.algorithms.fedavg import REPTILE, local_sgd_update, with_proximal
from simulator.algorithms.registry import ALGORITHMS
from simulator.client.worker import ClientWorker
from simulator.config.schema import ConfigError
from simulator.contract import WorkerSpec
from simulator.experiment import load_config, replace
from simulator.params import flat_params

DATA = shard([1.0], [2.0], [1.0], [2.0])


@pytest.mark.parametrize(("rho", "w_end"), [
    # w_0 = 0, lr 0.25: step 1 g = -4 (the proximal term is 0 at w_0), w_1 = 1;
    # step 2 g = 2 (1 - 2) + rho (1 - 0) = -2 + rho: rho = 2 stops at w_2 = 1, rho = 0 goes on to 1.5
    (2.0, 1.0), (1.0, 1.25), (0.0, 1.5)])
def test_two_local_steps_are_the_hand_computed_proximal_gradient_steps(rho, w_end):
    c = cfg("reptile", steps=2, lr=0.25)
    upd = local_sgd_update(linear(), theta(0.0), DATA, c, rng(), F.mse_loss, rho=rho)
    assert upd.vector.item() == w_end  # exact: dyadic numbers throughout


def test_rho_0_is_the_plain_local_step_bit_for_bit():
    c = cfg("reptile", steps=3, lr=0.1)
    plain = local_sgd_update(linear(), theta(0.3), DATA, c, rng(), F.mse_loss)
    assert with_proximal(REPTILE, 0.0) is REPTILE
    assert plain.vector.tolist() == local_sgd_update(linear(), theta(0.3), DATA, c, rng(), F.mse_loss,
                                                     rho=0.0).vector.tolist()


FEDASYNC = {"system.mode": "async", "async.rule": "fedasync", "system.backend": "inline",
            "algorithm.local_steps": 4}


@pytest.mark.parametrize("algorithm", ["fedavg", "reptile"])
def test_the_worker_applies_rho_in_the_sequential_and_the_vectorized_path_alike(algorithm):
    cfg_ = load_config(None, small_overrides(**FEDASYNC, **{"algorithm.name": algorithm, "async.proximal_rho": 5.0}))
    spec = WorkerSpec.from_config(cfg_)
    assert spec.proximal_rho == 5.0
    vec = ClientWorker(spec)
    seq = ClientWorker(WorkerSpec.from_config(replace(cfg_, **{"system.vectorize": False})))
    off = ClientWorker(WorkerSpec.from_config(replace(cfg_, **{"async.proximal_rho": 0.0})))
    assert vec.vectorized is not None and seq.vectorized is None
    th = flat_params(vec.model).numpy()
    ids, keys = [0, 3, 5, 6], [1, 1, 2, 2]
    a, b, plain = seq.train(th, keys, ids), vec.train(th, keys, ids), off.train(th, keys, ids)
    np.testing.assert_allclose(b.vectors, a.vectors, rtol=1e-4, atol=1e-6)
    # the proximal pull toward x_tau shortens every client's move
    assert (np.linalg.norm(a.vectors, axis=1) < np.linalg.norm(plain.vectors, axis=1)).all()


@pytest.mark.parametrize(("extra", "message"), [
    ({"async.proximal_rho": -0.1}, r"async\.proximal_rho must be >= 0"),
    ({"async.proximal_rho": 0.01, "system.mode": "sync"}, r"async\.proximal_rho = 0\.01 is FedAsync's client term"),
    ({"async.proximal_rho": 0.01, "async.rule": "fedbuff"}, r"needs system\.mode = \"async\" and async\.rule"),
    ({"async.proximal_rho": 0.01, "algorithm.name": "maml"}, r"not to algorithm 'maml'"),
])
def test_bad_proximal_settings_name_the_key(extra, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, small_overrides(**{**FEDASYNC, **extra}))


def test_only_local_sgd_records_take_the_proximal_term():
    assert with_proximal(ALGORITHMS["fedavg"], 0.1).client_step.keywords == {"rho": 0.1}
    for name in ("fomaml", "maml", "perfedavg_fo", "perfedavg_hf", "metasgd"):
        with pytest.raises(ConfigError, match="async.proximal_rho"):
            with_proximal(ALGORITHMS[name], 0.1)
