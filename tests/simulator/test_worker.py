"""The client worker: per-client results that depend only on (theta, round, client), and evaluation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from simulator.algorithms.exactsum import DEFAULT_BOUND, Grid
from simulator.client.evaluation import evaluate_client, summarize
from simulator.client.worker import ClientWorker, cap_gpu_memory, share_exhausted
from simulator.config.schema import AlgorithmConfig, ConfigError, EvalConfig
from simulator.contract import Reduction, WorkerSpec
from simulator.data.base import ClientShard, Split, eval_client_ids
from simulator.experiment import load_config
from simulator.params import flat_delta, flat_params, flatten, row_block

BASE = ["data.num_clients=20", "clients.per_round=4", "eval.clients=5", "data.eval_clients=5",
        "model.hidden=[8]", "algorithm.local_steps=2", "eval.adapt_steps=2"]
SYN = ["data.name=synthetic", "data.samples_per_client=30"]


def make_worker(*extra: str) -> tuple[ClientWorker, np.ndarray]:
    cfg = load_config(None, [*BASE, *extra])
    worker = ClientWorker(WorkerSpec.from_config(cfg))
    return worker, flat_params(worker.model).numpy().copy()


@pytest.fixture(scope="module")
def sinusoid():
    return make_worker()


@pytest.fixture(scope="module")
def synthetic():
    return make_worker(*SYN)


def test_spec_from_config():
    cfg = load_config(None, [*BASE, "seed=4", "system.threads=1", "system.shard_cache=8"])
    spec = WorkerSpec.from_config(cfg)
    assert (spec.seed, spec.threads, spec.shard_cache) == (4, 1, 8)
    assert spec.data == cfg.data and spec.algorithm == cfg.algorithm and spec.eval == cfg.eval


def test_train_rows_follow_the_given_order(sinusoid):
    worker, theta = sinusoid
    res = worker.train(theta, 0, [7, 3, 11])
    p = theta.size
    assert p == 1 * 8 + 8 + 8 * 1 + 1
    assert res.client_ids.tolist() == [7, 3, 11]
    assert res.vectors.shape == (3, p) and res.vectors.dtype == np.float32
    assert res.num_samples.tolist() == [20, 20, 20]          # shots 10 + query 10
    assert res.samples_processed.tolist() == [20, 20, 20]    # 2 steps of batch 10
    for arr in (res.loss_before, res.loss_after, res.compute_time_s):
        assert arr.shape == (3,)
    assert np.all(np.isfinite(res.vectors))
    assert np.all(res.compute_time_s >= 0)
    assert res.worker_id == 0
    # rows belong to their clients: the reversed call gives the reversed rows
    rev = worker.train(theta, 0, [11, 3, 7])
    assert np.array_equal(rev.vectors, res.vectors[::-1])
    assert np.array_equal(rev.loss_before, res.loss_before[::-1])


@pytest.mark.parametrize("which", ["sinusoid", "synthetic"])
def test_train_is_bitwise_reproducible_and_independent_of_the_cohort(which, request):
    worker, theta = request.getfixturevalue(which)
    a = worker.train(theta, 2, [3, 7])
    b = worker.train(theta, 2, [3, 7])
    for name in ("vectors", "num_samples", "samples_processed", "loss_before", "loss_after"):
        assert np.array_equal(getattr(a, name), getattr(b, name))
    alone = worker.train(theta, 2, [7])
    assert np.array_equal(alone.vectors[0], a.vectors[1])
    assert alone.loss_after[0] == a.loss_after[1]
    # a fresh worker (empty shard cache, same spec) gives the same bits
    fresh = ClientWorker(worker.spec, worker_id=1).train(theta, 2, [7])
    assert np.array_equal(fresh.vectors, alone.vectors)
    assert fresh.worker_id == 1
    # the round changes the mini-batch order, hence the update
    assert not np.array_equal(worker.train(theta, 3, [7]).vectors, alone.vectors)


def test_train_does_not_modify_theta(sinusoid):
    worker, theta = sinusoid
    before = theta.copy()
    worker.train(theta, 0, [1, 2])
    assert np.array_equal(theta, before)
    as_tensor = torch.from_numpy(theta.copy())
    res_tensor = worker.train(as_tensor, 0, [1])
    assert np.array_equal(res_tensor.vectors, worker.train(theta, 0, [1]).vectors)


def test_train_empty_call(sinusoid):
    worker, theta = sinusoid
    res = worker.train(theta, 0, [])
    assert res.vectors.shape == (0, theta.size)
    assert res.client_ids.shape == (0,)


def test_shard_cache_eviction_keeps_results(sinusoid):
    worker, theta = sinusoid
    cfg = load_config(None, [*BASE, "system.shard_cache=1"])
    small = ClientWorker(WorkerSpec.from_config(cfg))
    first = small.train(theta, 0, [1, 2, 1])  # client 1's shard is evicted and rebuilt
    assert np.array_equal(first.vectors[0], first.vectors[2])
    assert np.array_equal(first.vectors, worker.train(theta, 0, [1, 2, 1]).vectors)


def test_the_shard_cache_keeps_to_its_memory_budget(sinusoid):
    worker, theta = sinusoid
    one = sum(t.nbytes for sp in (worker.shard(0).support, worker.shard(0).query) for t in (sp.x, sp.y))
    assert worker.shard(0).nbytes() == one  # the splits are views of the shard's whole data
    cfg = load_config(None, [*BASE, f"system.shard_cache_mb={2.5 * one / 2**20}"])  # room for two shards
    small = ClientWorker(WorkerSpec.from_config(cfg))
    res = small.train(theta, 0, [1, 2, 3, 1])
    assert list(small._shards) == [3, 1] and small._shard_bytes == 2 * one
    assert np.array_equal(res.vectors, worker.train(theta, 0, [1, 2, 3, 1]).vectors)


def test_prefetch_builds_the_shards_ahead_and_stops_at_half_the_cache(sinusoid):
    worker, theta = sinusoid
    cfg = load_config(None, [*BASE, "system.shard_cache=6"])
    fresh = ClientWorker(WorkerSpec.from_config(cfg))
    assert fresh.prefetch([4, 5, 6, 7, 8]) == 3  # half of 6: clients 4, 5, 6
    assert list(fresh._shards) == [4, 5, 6] and "all" in vars(fresh._shards[4])  # the training concat too
    assert fresh.prefetch([4, 5]) == 0  # cached: nothing to build
    res = fresh.train(theta, 0, [4, 5, 6, 9])
    assert np.array_equal(res.vectors, worker.train(theta, 0, [4, 5, 6, 9]).vectors)  # results never depend on it


@pytest.mark.parametrize("algorithm", ["fedavg", "reptile", "fomaml", "maml"])
@pytest.mark.parametrize("dataset", ["sinusoid", "synthetic"])
def test_every_algorithm_on_every_dataset(algorithm, dataset):
    extra = SYN if dataset == "synthetic" else []
    worker, theta = make_worker(*extra, f"algorithm.name={algorithm}")
    res = worker.train(theta, 0, [0, 5])
    assert res.vectors.shape == (2, theta.size)
    assert np.all(np.isfinite(res.vectors))
    assert np.all(np.isfinite(res.loss_before)) and np.all(np.isfinite(res.loss_after))
    assert np.any(res.vectors != 0)
    assert np.all(res.samples_processed > 0)
    # batch_size 10, local_steps 2. sinusoid: 10 support + 10 query; synthetic: 30 samples, 24 support + 6 query.
    # FedAvg/Reptile: 2 batches of 10 from all local data. MAML: 2 support batches (full batch of 10 for
    # sinusoid) plus one query batch (10, or the whole 6-point query split).
    expected = {("sinusoid", False): 20, ("synthetic", False): 20, ("sinusoid", True): 30, ("synthetic", True): 26}
    assert res.samples_processed.tolist() == [expected[dataset, algorithm in ("fomaml", "maml")]] * 2


def test_maml_and_fomaml_differ_on_an_mlp():
    w1, theta = make_worker("algorithm.name=maml")
    w2, theta2 = make_worker("algorithm.name=fomaml")
    assert np.array_equal(theta, theta2)  # same seed: same initial model
    a, b = w1.train(theta, 0, [4]), w2.train(theta, 0, [4])
    assert a.loss_after[0] == b.loss_after[0]  # same adapted model, same query loss
    assert not np.allclose(a.vectors, b.vectors)


def test_evaluate_sinusoid(sinusoid):
    worker, theta = sinusoid
    ids = list(eval_client_ids(worker.spec.data))
    assert ids == [20, 21, 22, 23, 24]
    res = worker.evaluate(theta, 0, ids)
    assert res.client_ids.tolist() == ids
    for arr in (res.loss_pre, res.loss_post):
        assert arr.shape == (5,) and np.all(np.isfinite(arr)) and np.all(arr >= 0)
    assert np.all(np.isnan(res.metric_pre)) and np.all(np.isnan(res.metric_post))
    again = worker.evaluate(theta, 0, ids)
    assert np.array_equal(again.loss_post, res.loss_post)


def test_evaluate_synthetic(synthetic):
    worker, theta = synthetic
    ids = list(eval_client_ids(worker.spec.data))
    res = worker.evaluate(theta, 1, ids)
    assert np.all(np.isfinite(res.loss_pre)) and np.all(np.isfinite(res.loss_post))
    for metric in (res.metric_pre, res.metric_post):
        assert np.all((metric >= 0) & (metric <= 1))
        # query has 6 points: accuracies are multiples of 1/6
        np.testing.assert_allclose(metric * 6, np.round(metric * 6), atol=1e-6)


@pytest.mark.parametrize("extra", [[], SYN], ids=["sinusoid", "synthetic"])
def test_evaluate_without_adaptation_leaves_the_loss(extra):
    worker, theta = make_worker(*extra, "eval.adapt_steps=0")
    res = worker.evaluate(theta, 0, [20, 21])
    assert np.array_equal(res.loss_pre, res.loss_post)
    assert np.array_equal(res.metric_pre, res.metric_post, equal_nan=True)


def test_evaluate_client_hand_computed():
    # y = w x, w = 0; support x = [1, 2], y = [2, 4]: one step with lr 0.1 gives w = 0 - 0.1 (5*0 - 10) = 1
    model = nn.utils.skip_init(nn.Linear, 1, 1, bias=False, dtype=torch.float64)
    col = lambda v: torch.tensor(v, dtype=torch.float64).reshape(-1, 1)  # noqa: E731
    shard = ClientShard(0, Split(col([1, 2]), col([2, 4])), Split(col([3]), col([6])))
    out = evaluate_client(model, torch.zeros(1, dtype=torch.float64), shard, EvalConfig(adapt_steps=1, adapt_lr=0.1),
                          AlgorithmConfig(batch_size=0), np.random.default_rng(0), F.mse_loss, "regression")
    assert out.loss_pre == pytest.approx(36.0, rel=1e-12)   # (0 - 6)^2
    assert out.loss_post == pytest.approx(9.0, rel=1e-12)   # (3 - 6)^2
    assert math.isnan(out.metric_pre) and math.isnan(out.metric_post)


def test_summarize():
    s = summarize(np.array([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert s == {"mean": 3.0, "p10": pytest.approx(1.4), "p50": 3.0, "p90": pytest.approx(4.6)}
    with_nan = summarize(np.array([1.0, math.nan, 3.0]))
    assert with_nan["mean"] == 2.0 and with_nan["p50"] == 2.0
    assert all(math.isnan(v) for v in summarize(np.array([])).values())
    assert all(math.isnan(v) for v in summarize(np.array([math.nan, math.nan])).values())


def test_a_cohort_larger_than_a_vectorized_chunk_gives_the_same_results(monkeypatch):
    from conftest import small_overrides

    from simulator.client import worker as worker_module

    cfg = load_config(None, small_overrides(**{"data.name": "synthetic", "algorithm.name": "fedavg"}))
    w = ClientWorker(WorkerSpec.from_config(cfg))
    assert w.vectorized is not None
    theta = flat_params(w.model).numpy()
    ids = list(range(0, 20, 2))
    whole = w.train(theta, 3, ids)
    monkeypatch.setattr(worker_module, "CPU_CHUNK", 3)  # chunks of 3, 3, 3 and a lone client
    chunked = w.train(theta, 3, ids)
    for field in ("client_ids", "vectors", "num_samples", "samples_processed", "loss_before", "loss_after"):
        np.testing.assert_array_equal(getattr(chunked, field), getattr(whole, field))


def test_a_chunks_share_of_a_reduction_reduces_its_clients_as_the_whole_does(synthetic):
    """``Reduction.parts`` (what the Ray calls carry) keeps each client's coefficient and the cohort's grid, so a
    chunk reduced with its share gives the same partial, bit for bit, as with the whole cohort's reduction."""
    worker, theta = synthetic
    cohort = np.array([3, 7, 1, 12, 9], np.int64)
    coefs = np.array([0.1, 0.3, 0.2, 0.15, 0.25])
    whole = Reduction(cohort, coefs, Grid.for_bound(DEFAULT_BOUND, float(coefs.sum())))
    part, rest = whole.parts([[12, 1], [3, 7, 9]])
    assert part.client_ids.tolist() == [12, 1] and part.coefs.tolist() == [0.15, 0.2] and part.grid == whole.grid
    assert rest.coefs.tolist() == [0.1, 0.3, 0.25]
    a, b = (worker.train(theta, 2, [12, 1], red).partial for red in (whole, part))
    assert a.grid == b.grid and np.array_equal(a.total, b.total) and a.total.any()
    with pytest.raises(KeyError):
        whole.parts([[4]])  # not in the cohort


def test_row_block_is_the_rows_own_tensor_or_none():
    """A vectorized cohort's update rows are used as the call's block without a copy; anything else is not."""
    delta = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    block = row_block(list(delta.unbind(0)))
    assert block is not None and torch.equal(block, delta) and block.data_ptr() == delta.data_ptr()
    assert torch.equal(row_block([delta[1], delta[2]]), delta[1:])  # consecutive rows from any start
    assert torch.equal(row_block([delta[0]]), delta[:1])  # a lone client's first row of its doubled group
    other = delta.clone()
    for rows in ([delta[1], delta[0]], [delta[0], delta[2]], [delta[0], other[1]], [delta[:, 0]],
                 [delta[0].double()], []):
        assert row_block(rows) is None


def test_a_vectorized_calls_block_equals_the_rows_it_was_given(synthetic):
    """The block taken as it is holds each client's own row: the same bits as the clients trained alone."""
    worker, theta = synthetic
    assert worker.vectorized is not None
    res = worker.train(theta, 1, [4, 9, 2])
    for i, c in enumerate([4, 9, 2]):
        assert np.array_equal(worker.train(theta, 1, [c, 0]).vectors[0], res.vectors[i])


@pytest.mark.parametrize(("system", "share"), [
    ([], 0.0),                                                                    # no GPU: no cap
    (["system.gpus_per_actor=0.25"], 0.25),                                       # 4 Ray actors on one GPU
    (["system.gpus_per_actor=0.5", "system.gpu_memory_fraction=0.3"], 0.3),       # set apart from the scheduling share
    (["system.gpus_per_actor=1"], 0.0),                                           # a whole GPU: its own
    (["system.gpus_per_actor=1", "system.gpu_memory_fraction=0.9"], 0.9),
    (["system.gpus_per_actor=0.25", "system.backend=\"inline\""], 0.0),           # the driver's process: no neighbours
    (["system.backend=\"inline\"", "system.gpu_memory_fraction=0.5"], 0.5),       # unless asked
])
def test_a_workers_gpu_memory_share_follows_its_fraction_of_a_gpu(system, share):
    assert WorkerSpec.from_config(load_config(None, [*BASE, *system])).gpu_memory_fraction == share


@pytest.mark.parametrize("bad", ["1.5", "-0.1"])
def test_a_gpu_memory_fraction_outside_0_1_is_one_clear_error(bad):
    with pytest.raises(ConfigError, match=r"system\.gpu_memory_fraction must be a fraction in \(0, 1\]"):
        load_config(None, [*BASE, f"system.gpu_memory_fraction={bad}"])


def test_a_cpu_worker_takes_no_gpu_cap_and_reports_none():
    worker, _ = make_worker("system.gpus_per_actor=0.25")
    assert worker.spec.gpu_memory_fraction == 0.25 and worker.device.type == "cpu"
    assert cap_gpu_memory(torch.device("cpu"), 0.25) is None
    assert worker.describe()["gpu_memory_cap"] is None
    assert worker.gpu_memory() == {"cap": None, "peak_allocated": None, "peak_reserved": None}


def test_an_exhausted_share_names_the_share_the_keys_and_torchs_line():
    err = share_exhausted(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nmore text"),
                          3, 35 * 2**30, 0.25)
    assert isinstance(err, torch.OutOfMemoryError)
    assert str(err) == ("worker 3 outgrew its share of the GPU's memory (35.00 GiB, a fraction 0.25): lower "
                        "system.clients_per_actor, or raise system.gpus_per_actor or system.gpu_memory_fraction; "
                        "torch: CUDA out of memory. Tried to allocate 2.00 GiB.")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_capped_worker_cannot_allocate_past_its_share_of_the_gpu():
    worker, theta = make_worker(*SYN, "system.gpu_memory_fraction=0.05")
    total = torch.cuda.get_device_properties(worker.device).total_memory
    assert worker.device.type == "cuda" and worker.gpu_memory_cap == int(0.05 * total)
    worker.train(theta, 0, [0, 1, 2])  # a few clients fit
    with pytest.raises(torch.OutOfMemoryError, match="outgrew its share"), worker._within_share():
        torch.empty(int(0.06 * total), dtype=torch.uint8, device=worker.device)
    memory = worker.gpu_memory()
    assert 0 < memory["peak_allocated"] <= memory["peak_reserved"] <= memory["cap"]


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.float64, torch.float32)])
def test_flat_delta_is_the_concatenation_minus_theta_bit_for_bit(dtypes):
    gen = torch.Generator().manual_seed(5)
    tensors = {"w": torch.randn(3, 4, generator=gen, dtype=dtypes[0]), "b": torch.randn(4, generator=gen,
                                                                                          dtype=torch.float32)}
    theta = torch.randn(16, generator=gen)
    got, ref = flat_delta(tensors, theta), flatten(tensors) - theta
    assert got.dtype == ref.dtype == dtypes[0] and torch.equal(got, ref)
    with pytest.raises(ValueError, match="the tensors hold 16 values, theta 15"):
        flat_delta(tensors, theta[:15])
