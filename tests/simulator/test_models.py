"""LEAF's FEMNIST CNN and Shakespeare LSTM: shapes, parameter counts, seeded init, the data-fit check, one client
step of every algorithm on each, and the vectorized path against the sequential one."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import small_overrides

from simulator.algorithms.record import planned_samples
from simulator.algorithms.registry import ALGORITHMS
from simulator.algorithms.server import initial_vector
from simulator.algorithms.stacked import VectorizedCohort, unsupported_reason
from simulator.client.worker import ClientWorker
from simulator.config.schema import AlgorithmConfig, ConfigError, ModelConfig
from simulator.contract import WorkerSpec
from simulator.data.base import ClientShard, Split
from simulator.experiment import load_config
from simulator.models import build_model, check_output_shape, mlp
from simulator.params import flat_params, num_parameters
from simulator.rng import torch_seed
from simulator.rounds import context
from simulator.rounds.context import prepare

CNN, LSTM = ModelConfig(name="femnist_cnn"), ModelConfig(name="shakespeare_lstm")


@pytest.fixture(scope="module")
def cnn() -> torch.nn.Module:
    return build_model(CNN, 784, 62, seed=0)


@pytest.fixture(scope="module")
def lstm() -> torch.nn.Module:
    return build_model(LSTM, 80, 80, seed=0)


def test_femnist_cnn_shapes_and_leaf_parameter_count(cnn):
    # conv 1->32 (5x5): 832; conv 32->64: 51,264; dense 3136->2048: 6,424,576; dense 2048->62: 127,038
    assert num_parameters(cnn) == 6_603_710 == flat_params(cnn).numel()
    shapes = [tuple(p.shape) for p in cnn.parameters()]
    assert shapes == [(32, 1, 5, 5), (32,), (64, 32, 5, 5), (64,), (2048, 3136), (2048,), (62, 2048), (62,)]
    assert tuple(cnn(torch.zeros(3, 784)).shape) == (3, 62)
    assert num_parameters(build_model(CNN, 784, 10, seed=0)) == 6_603_710 - 52 * 2049
    check_output_shape(cnn, 784, 62)


def test_femnist_cnn_needs_28x28_inputs():
    with pytest.raises(ConfigError, match=r"model\.name = \"femnist_cnn\".*784.*input_dim 60"):
        build_model(CNN, 60, 10, seed=0)


def test_shakespeare_lstm_shapes_and_parameter_count(lstm):
    # embedding 80 x 8: 640; LSTM layer 1: 4*256*(8+256) + 2*4*256 = 272,384; layer 2: 4*256*512 + 2048 = 526,336;
    # dense 256 -> 80: 20,560 (PyTorch keeps two bias vectors per LSTM layer)
    assert num_parameters(lstm) == 640 + 272_384 + 526_336 + 20_560 == 819_920
    ids = torch.randint(0, 80, (4, 80), generator=torch.Generator().manual_seed(1))
    assert tuple(lstm(ids).shape) == (4, 80)
    assert tuple(lstm(ids[:, :7]).shape) == (4, 80)  # any sequence length; the last step's output


def test_check_output_shape_probes_with_the_datas_dtype(lstm):
    check_output_shape(lstm, 80, 80, torch.int64)
    with pytest.raises(ConfigError, match="float32 inputs of shape"):
        check_output_shape(lstm, 80, 80)  # an embedding cannot take float features
    with pytest.raises(ConfigError, match=r"outputs \(2, 80\).*needs \(2, 62\)"):
        check_output_shape(lstm, 80, 62, torch.int64)


class _Chars:
    """A stand-in for a character dataset (another module provides the real one): int64 inputs."""

    task, input_dim, output_dim, input_dtype = "classification", 20, 80, torch.int64


def test_prepare_checks_the_model_with_the_datasets_input_dtype(monkeypatch):
    c = load_config(None, small_overrides(**{"model.name": "shakespeare_lstm"}))
    monkeypatch.setattr(context, "make_dataset", lambda data, seed: _Chars())
    prepared = prepare(c)
    assert prepared.theta0.numel() == 819_920
    monkeypatch.setattr(_Chars, "input_dtype", torch.float32)
    with pytest.raises(ConfigError, match="float32"):
        prepare(c)


@pytest.mark.parametrize("cfg", [CNN, LSTM, ModelConfig()], ids=["cnn", "lstm", "mlp"])
def test_seeded_init_is_identical_twice(cfg):
    dims = {"femnist_cnn": (784, 62), "shakespeare_lstm": (80, 80), "mlp": (60, 10)}[cfg.name]
    a, b, c = (flat_params(build_model(cfg, *dims, seed=s)) for s in (3, 3, 4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_the_default_mlp_is_unchanged():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(torch_seed(5, "init"))
        expected = flat_params(mlp(1, 1, (40, 40)))
    assert torch.equal(flat_params(build_model(ModelConfig(), 1, 1, seed=5)), expected)


# --------------------------------------------------------------------------------- client steps on each model


def _shards(model: str, k: int, out: int) -> list[ClientShard]:
    """k tiny clients (sizes 5 + 3, 6 + 3, ...) of random images or character ids, from a seeded generator."""
    g = torch.Generator().manual_seed(7)
    shards = []
    for c in range(k):
        n, q = 5 + c, 3
        if model == "femnist_cnn":
            x = torch.rand(n + q, 784, generator=g)
        else:
            x = torch.randint(0, 80, (n + q, 6), generator=g)
        y = torch.randint(0, out, (n + q,), generator=g)
        shards.append(ClientShard(c, Split(x[:n], y[:n]), Split(x[n:], y[n:])))
    return shards


def _cfg(name: str) -> AlgorithmConfig:
    return AlgorithmConfig(name=name, local_steps=2, local_lr=0.05, batch_size=2, switch_round=1)


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
@pytest.mark.parametrize("model", ["femnist_cnn", "shakespeare_lstm"])
def test_one_client_step_of_every_algorithm_on_each_model(model, algorithm, cnn, lstm):
    net = cnn if model == "femnist_cnn" else lstm
    c = _cfg(algorithm)
    theta = initial_vector(c, flat_params(net))
    (sh,) = _shards(model, 1, 62 if model == "femnist_cnn" else 80)
    upd = ALGORITHMS[algorithm].client_step(net, theta, sh, c, np.random.default_rng(0), F.cross_entropy)
    assert upd.vector.shape == theta.shape and torch.isfinite(upd.vector).all() and upd.vector.abs().max() > 0
    assert np.isfinite(upd.loss_before) and np.isfinite(upd.loss_after)
    assert upd.samples_processed == planned_samples(ALGORITHMS[algorithm], c, len(sh.support), len(sh.query))


def test_the_lstm_takes_the_sequential_path_with_a_reason(lstm, cnn):
    assert "recurrent" in unsupported_reason(lstm)
    for algorithm in ALGORITHMS.values():
        assert unsupported_reason(cnn, algorithm) is None
        assert unsupported_reason(cnn, algorithm, torch.device("cuda", 0)) is None
    # vmap over clients' convolutions is slower than a loop on a CPU: the worker trains them one by one there
    assert "convolutions" in unsupported_reason(cnn, ALGORITHMS["fedavg"], torch.device("cpu"))


# reptile and pfedavg run fedavg's client step (local SGD)
@pytest.mark.parametrize("algorithm", ["fedavg", "fomaml", "maml", "perfedavg_fo", "perfedavg_hf", "metasgd"])
def test_vectorized_cnn_equals_sequential(algorithm):
    # float64 so that the comparison is not blurred by float32 rounding amplified by ReLU/max-pool ties and
    # Per-FedAvg HF's finite difference; two clients, one step (multi-step chains are checked on MLPs in
    # test_meta_algorithms and test_vectorized): a 6.5M-parameter model is slow to vmap on a CPU
    net = build_model(CNN, 784, 5, seed=0).double()
    c = dataclasses.replace(_cfg(algorithm), local_steps=1)
    theta = initial_vector(c, flat_params(net).double())
    shards = [ClientShard(s.client_id, Split(s.support.x.double(), s.support.y), Split(s.query.x.double(), s.query.y))
              for s in _shards("femnist_cnn", 2, 5)]
    seq = [ALGORITHMS[algorithm].client_step(net, theta, s, c, np.random.default_rng(s.client_id), F.cross_entropy)
           for s in shards]
    vec = VectorizedCohort(net, "classification").run(ALGORITHMS[algorithm], theta, shards,
                                                      [np.random.default_rng(s.client_id) for s in shards], c)
    for a, b in zip(seq, vec, strict=True):
        torch.testing.assert_close(b.vector, a.vector, rtol=1e-9, atol=1e-12)
        assert b.loss_before == pytest.approx(a.loss_before, rel=1e-9)
        assert b.loss_after == pytest.approx(a.loss_after, rel=1e-9)
        assert a.samples_processed == b.samples_processed


def test_cnn_worker_on_784_feature_data():
    # the gaussian pool with 784 features stands in for FEMNIST's flattened images
    c = load_config(None, small_overrides(**{"model.name": "femnist_cnn", "data.name": "gaussian",
                                              "data.features": 784, "algorithm.local_steps": 1}))
    worker = ClientWorker(WorkerSpec.from_config(c))
    assert (worker.vectorized is None) == (worker.device.type == "cpu")  # vmap of convolutions on a GPU only
    theta = flat_params(worker.model).numpy()
    res = worker.train(theta, 0, [0, 1])
    assert res.vectors.shape == (2, 6_603_710 - 52 * 2049) and np.all(np.isfinite(res.vectors))
    assert np.all(np.isfinite(worker.evaluate(theta, 0, [24]).loss_post))
