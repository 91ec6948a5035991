"""The vectorized cohort path equals the sequential client steps, for every algorithm and data shape."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from conftest import small_overrides

from simulator.algorithms.server import initial_vector
from simulator.algorithms.stacked import unsupported_reason
from simulator.client.worker import ClientWorker
from simulator.contract import WorkerSpec
from simulator.experiment import load_config, replace
from simulator.params import flat_params

CASES = [
    # (dataset overrides, why)
    (["data.name=\"sinusoid\""], "equal sizes, mini-batches"),
    (["data.name=\"sinusoid\"", "algorithm.batch_size=0"], "equal sizes, full batch"),
    (["data.name=\"synthetic\""], "log-normal sizes: mini-batches over padded data"),
    (["data.name=\"synthetic\"", "data.samples_per_client=8", "algorithm.batch_size=6"],
     "batch >= some splits: full-batch groups by size beside mini-batch groups"),
    (["data.name=\"gaussian\"", "data.partition=\"quantity\"", "algorithm.batch_size=0"],
     "quantity skew, full batch: one group per size"),
]


def _workers(extra: list[str]) -> tuple[ClientWorker, ClientWorker]:
    cfg = load_config(None, small_overrides() + extra)
    seq = ClientWorker(WorkerSpec.from_config(replace(cfg, **{"system.vectorize": False})))
    vec = ClientWorker(WorkerSpec.from_config(cfg))
    assert seq.vectorized is None and vec.vectorized is not None
    return seq, vec


@pytest.mark.parametrize("algorithm", ["fedavg", "reptile", "fomaml", "maml"])
@pytest.mark.parametrize(("extra", "why"), CASES, ids=[c[1] for c in CASES])
def test_vectorized_updates_equal_the_sequential_ones(algorithm, extra, why):
    seq, vec = _workers(extra + [f"algorithm.name=\"{algorithm}\"", "algorithm.local_steps=3"])
    theta = flat_params(seq.model).numpy()
    clients = [0, 3, 5, 6, 11, 17, 20]
    keys = [7, 7, 7, 8, 8, 9, 9]  # per-client stream keys (async refill groups) follow their clients
    a = seq.train(theta, keys, clients)
    b = vec.train(theta, keys, clients)
    assert a.client_ids.tolist() == b.client_ids.tolist() == clients
    np.testing.assert_array_equal(a.num_samples, b.num_samples)
    np.testing.assert_array_equal(a.samples_processed, b.samples_processed)
    np.testing.assert_allclose(b.vectors, a.vectors, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(b.loss_before, a.loss_before, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(b.loss_after, a.loss_after, rtol=1e-4, atol=1e-6)
    assert np.abs(a.vectors).max() > 0


def test_models_with_state_or_randomness_fall_back_with_a_logged_reason(tmp_path, monkeypatch, caplog):
    (tmp_path / "bn_model.py").write_text(
        "import torch.nn as nn\n"
        "def batchnorm(input_dim, output_dim):\n"
        "    return nn.Sequential(nn.Linear(input_dim, 8), nn.BatchNorm1d(8), nn.Linear(8, output_dim))\n"
        "def dropout(input_dim, output_dim):\n"
        "    return nn.Sequential(nn.Linear(input_dim, 8), nn.Dropout(0.1), nn.Linear(8, output_dim))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name, needle in (("batchnorm", "buffers"), ("dropout", "dropout")):
        cfg = load_config(None, small_overrides(**{"model.factory": f"bn_model:{name}"}))
        with caplog.at_level(logging.WARNING, logger="metafleet.worker"):
            worker = ClientWorker(WorkerSpec.from_config(cfg))
        assert worker.vectorized is None
        assert needle in unsupported_reason(worker.model)
        assert "sequential client steps instead" in caplog.text


@pytest.mark.parametrize("algorithm", ["reptile", "fomaml", "maml"])
@pytest.mark.parametrize(("extra", "why"), CASES[:4], ids=[c[1] for c in CASES[:4]])
def test_a_clients_vectorized_update_does_not_depend_on_its_call_mates(algorithm, extra, why):
    # actor counts change how a cohort is chunked: each client's bits must not change with it
    cfg = load_config(None, small_overrides(**{"algorithm.name": algorithm}) + extra)
    worker = ClientWorker(WorkerSpec.from_config(cfg))
    theta = flat_params(worker.model).numpy()
    ids = list(range(0, 24, 2))
    whole = worker.train(theta, 1, ids)
    for k in (1, 2, 5):
        parts = [worker.train(theta, 1, ids[i:i + k]) for i in range(0, len(ids), k)]
        for field in ("vectors", "loss_before", "loss_after"):
            np.testing.assert_array_equal(np.concatenate([getattr(p, field) for p in parts]), getattr(whole, field))


# ---------------------------------------------------------------------------------- the stacked MLP forward

def test_plain_mlps_and_only_they_take_the_stacked_forward():
    from torch import nn
    from torch.func import functional_call

    from simulator.models import femnist_cnn, mlp, stacked_forward

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 5, bias=False), nn.ReLU(), nn.Linear(5, 2))
    assert stacked_forward(mlp(3, 2, (4, 5))) is not None
    for other in (nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), nn.Sequential(nn.Linear(3, 4), nn.Dropout()),
                  nn.Linear(3, 2), nn.Sequential(), femnist_cnn(784, 10)):
        assert stacked_forward(other) is None
    k = 3  # three clients with their own parameters and inputs
    params = {n: p.detach() + 0.1 * torch.randn(k, *p.shape) for n, p in net.named_parameters()}
    x = torch.randn(k, 6, 3)
    out = stacked_forward(net)(params, x)
    for j in range(k):
        want = functional_call(net, {n: p[j] for n, p in params.items()}, (x[j],))
        torch.testing.assert_close(out[j], want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("algorithm", ["fedavg", "fomaml", "maml", "perfedavg_hf", "metasgd"])
@pytest.mark.parametrize(("extra", "why"), CASES, ids=[c[1] for c in CASES])
def test_the_stacked_forward_gives_the_updates_of_the_vmapped_one(algorithm, extra, why):
    cfg = load_config(None, small_overrides(**{"algorithm.name": algorithm, "algorithm.local_steps": 3}) + extra)
    worker = ClientWorker(WorkerSpec.from_config(cfg))
    assert worker.vectorized is not None and worker.vectorized.stacked is not None  # the built-in MLP
    theta = initial_vector(cfg.algorithm, flat_params(worker.model)).numpy()
    ids, keys = [0, 3, 5, 6, 11, 17, 20], [7, 7, 7, 8, 8, 9, 9]
    stacked = worker.train(theta, keys, ids)
    worker.vectorized.stacked = None  # vmap of functional_call, as for any other model
    vmapped = worker.train(theta, keys, ids)
    # The two paths sum in other orders, so each gradient differs by up to about n u |g| (u: float32's unit
    # roundoff, n: the longest sum in a gradient entry, a step's samples times the widest layer). An update is a sum
    # of lr-scaled gradients (or a meta-gradient), so its entries differ by up to about n u times its scale: the
    # vectors' tolerance. Per-FedAvg HF: the finite-difference Hessian-vector product
    # [g(w + delta v) - g(w - delta v)] / (2 delta), scaled by alpha, turns that into alpha n u |g| / delta
    # (Fallah et al. 2020, Eq. 10).
    a = cfg.algorithm
    samples = max(len(worker.shard(c).all) for c in ids) if a.batch_size == 0 else a.batch_size
    width = max(max(p.shape) for p in worker.model.parameters())
    unit_roundoff = np.finfo(np.float32).eps / 2
    amplified = max(1.0, a.local_lr / a.hf_delta) if algorithm == "perfedavg_hf" else 1.0
    atol = amplified * samples * width * unit_roundoff * np.abs(vmapped.vectors).max()
    np.testing.assert_allclose(stacked.vectors, vmapped.vectors, rtol=1e-5, atol=atol)
    # the losses after local work are first order in the weights: their differences grow as the vectors' do,
    # 1 / delta; 1e-5 held at delta = 1e-3
    loss_rtol = 1e-5 * max(1.0, 1e-3 / cfg.algorithm.hf_delta) if algorithm == "perfedavg_hf" else 1e-5
    np.testing.assert_allclose(stacked.loss_before, vmapped.loss_before, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(stacked.loss_after, vmapped.loss_after, rtol=loss_rtol, atol=1e-7)
    assert np.abs(stacked.vectors).max() > 0


# ---------------------------------------------------------------------------------- the written-out backward

@pytest.mark.parametrize("task", ["classification", "regression"])
@pytest.mark.parametrize("batch", [3, 0], ids=["mini-batch", "full batch"])
def test_the_written_out_backward_gives_autograds_sgd_steps(task, batch):
    from torch import nn
    from torch.func import functional_call

    from simulator.algorithms.mlpsgd import StackedMLPSGD
    from simulator.params import flat_params as flat

    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    outputs = 4 if task == "classification" else 2
    # ReLU, Tanh and Sigmoid take their output's kernel; GELU goes through autograd; a layer without a bias
    net = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 6, bias=False), nn.Tanh(), nn.Linear(6, 6),
                        nn.GELU(), nn.Linear(6, 5), nn.Sigmoid(), nn.Linear(5, outputs))
    engine = StackedMLPSGD.build(net, task)
    assert engine is not None
    k, n, steps, lr = 3, 8, 4, 0.3
    x = torch.randn(k, n, 5, generator=gen)
    y = (torch.randint(0, outputs, (k, n), generator=gen) if task == "classification"
         else torch.randn(k, n, outputs, generator=gen))
    plans = torch.randint(0, n, (k, steps, batch), generator=gen) if batch else None
    theta = flat(net)
    delta, before, after = engine.local_sgd(theta, x, y, plans, steps, lr)
    loss = nn.functional.cross_entropy if task == "classification" else nn.functional.mse_loss
    for j in range(k):  # client j by autograd, one SGD step after another
        p = {name: t.detach().clone().requires_grad_(True) for name, t in net.named_parameters()}
        with torch.no_grad():
            want_before = [float(loss(functional_call(net, p, (x[j][i:i + 1],)), y[j][i:i + 1])) for i in range(n)]
        for s in range(steps):
            rows = plans[j, s] if batch else torch.arange(n)
            grads = torch.autograd.grad(loss(functional_call(net, p, (x[j][rows],)), y[j][rows]), list(p.values()))
            p = {name: (t - lr * g).detach().requires_grad_(True)
                 for (name, t), g in zip(p.items(), grads, strict=True)}
        want = torch.cat([t.detach().reshape(-1) for t in p.values()]) - theta
        # float32 sums in other orders: a gradient entry sums at most b * width products, each off by up to
        # that many unit roundoffs u, and steps of them add up in the update
        longest = (batch or n) * max(max(t.shape) for t in net.parameters())
        atol = steps * longest * np.finfo(np.float32).eps / 2 * float(want.abs().max())
        torch.testing.assert_close(delta[j], want, rtol=1e-5, atol=atol)
        torch.testing.assert_close(before[j], torch.tensor(want_before), rtol=1e-5, atol=1e-7)
        assert after[j].shape == (n,)
    assert float(delta.abs().max()) > 0


def test_in_place_activations_other_than_relu_keep_the_autograd_path():
    from torch import nn

    from simulator.algorithms.mlpsgd import StackedMLPSGD

    assert StackedMLPSGD.build(nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 2)), "x") is not None
    assert StackedMLPSGD.build(nn.Sequential(nn.Linear(3, 4), nn.ELU(inplace=True), nn.Linear(4, 2)), "x") is None
    assert StackedMLPSGD.build(nn.Sequential(nn.Conv1d(1, 1, 1)), "x") is None
