"""Determinism across backends: inline, Ray with 1 actor and Ray with 2 actors give identical metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import small_overrides

from actors.backends import make_backend
from actors.calls import KeptPartial, KeptRows
from actors.inline import InlineBackend
from simulator.algorithms.aggregation import fedbuff_coefficients, fedbuff_mean
from simulator.algorithms.exactsum import DEFAULT_BOUND, Grid, Partial
from simulator.client.reduce import release_mean
from simulator.client.worker import ClientWorker
from simulator.contract import Reduction, Release, Selection, WorkerSpec, split_cohort
from simulator.experiment import load_config
from simulator.params import flat_params
from simulator.rounds.run import run
from simulator.rundir.metrics import WALL_CLOCK_COLUMNS

CASES = [
    ("reptile", "sinusoid", []),
    ("fedavg", "synthetic", ["data.samples_per_client=30"]),
    ("fomaml", "synthetic", []),  # log-normal client sizes
    ("maml", "sinusoid", ["algorithm.server_optimizer=\"adam\"", "algorithm.server_lr=0.01"]),
]


def _tables(run_dir: Path) -> dict[str, pd.DataFrame]:
    out = {}
    for name, wall in WALL_CLOCK_COLUMNS.items():
        df = pd.read_parquet(run_dir / f"{name}.parquet")
        out[name] = df.drop(columns=list(wall)).sort_values(["round", "client_id"] if name != "rounds" else ["round"],
                                                             ignore_index=True)
    return out


def _run(tmp_path: Path, tag: str, overrides: list[str]) -> dict[str, pd.DataFrame]:
    cfg = load_config(None, overrides)
    with make_backend(cfg) as backend:
        summary = run(cfg, backend, tmp_path / tag)
    assert summary["status"] == "completed"
    return _tables(tmp_path / tag)


@pytest.mark.parametrize(("algorithm", "dataset", "extra"), CASES)
def test_identical_metrics_inline_ray1_ray2(ray_session, tmp_path, algorithm, dataset, extra):
    base = small_overrides(**{"algorithm.name": algorithm, "data.name": dataset}) + extra
    inline = _run(tmp_path, "inline", base + ["system.backend=\"inline\""])
    ray1 = _run(tmp_path, "ray1", base + ["system.backend=\"ray\"", "system.actors=1"])
    ray2 = _run(tmp_path, "ray2", base + ["system.backend=\"ray\"", "system.actors=2"])
    assert len(inline["rounds"]) == 4 and len(inline["clients"]) == 24 and len(inline["evals"]) == 3 * 4
    assert np.isfinite(inline["rounds"]["eval_loss_post"].dropna()).all()
    for name in inline:
        pd.testing.assert_frame_equal(inline[name], ray1[name], check_exact=True)
        pd.testing.assert_frame_equal(inline[name], ray2[name], check_exact=True)


HETEROGENEOUS = ['devices.speed={dist="pareto", median=100.0, shape=1.0}', "devices.dropout=0.3",
                 "devices.availability=0.7"]

MODES = [
    ("deadline", ["system.mode=\"deadline\"", "system.deadline_s=0.5"]),
    ("overselect", ["system.mode=\"overselect\"", "system.overselect=1.5"]),
    ("fedbuff", ["system.mode=\"async\"", "async.buffer_size=3", "system.max_concurrency=8",
                 "system.max_staleness=3", "algorithm.name=\"fomaml\"", "algorithm.server_lr=0.1"]),
    ("fedasync", ["system.mode=\"async\"", "async.rule=\"fedasync\"", "system.max_concurrency=5",
                  "async.staleness=\"polynomial\"", "data.name=\"gaussian\"", "data.partition=\"dirichlet\"",
                  "seed=1"]),
]


@pytest.mark.parametrize(("mode", "extra"), MODES, ids=[m for m, _ in MODES])
def test_identical_metrics_in_every_mode(ray_session, tmp_path, mode, extra):
    base = small_overrides(rounds=6) + HETEROGENEOUS + extra
    inline = _run(tmp_path, "inline", base + ["system.backend=\"inline\""])
    prefetch = ["system.prefetch=true"] if mode != "deadline" else []  # with and without, both equal inline
    ray1 = _run(tmp_path, "ray1", base + ["system.backend=\"ray\"", "system.actors=1", *prefetch])
    ray2 = _run(tmp_path, "ray2", base + ["system.backend=\"ray\"", "system.actors=2"])
    assert len(inline["rounds"]) == 6
    assert inline["rounds"]["num_dropped"].sum() > 0  # the scenario exercises drops
    for name in inline:
        pd.testing.assert_frame_equal(inline[name], ray1[name], check_exact=True)
        pd.testing.assert_frame_equal(inline[name], ray2[name], check_exact=True)


class ShuffledBackend(InlineBackend):
    """Splits each cohort over 3 pretend workers and returns their results in reverse order."""

    def _shuffled(self, fn, theta, round_idx, client_ids, *more):
        results = []
        for w, chunk in split_cohort(client_ids, 3):
            res = fn(theta, round_idx, chunk, *more)
            results.append(type(res)(**{**res.__dict__, "worker_id": w}))
        yield from reversed(results)

    def train(self, theta, round_idx, client_ids, reduce=None):
        return self._shuffled(self.worker.train, theta, round_idx, client_ids, reduce)

    def evaluate(self, theta, round_idx, client_ids):
        return self._shuffled(self.worker.evaluate, theta, round_idx, client_ids)


def test_completion_order_does_not_change_results(tmp_path):
    cfg = load_config(None, small_overrides(**{"system.backend": "inline", "algorithm.name": "fedavg",
                                               "data.name": "synthetic"}))
    spec = WorkerSpec.from_config(cfg)
    with InlineBackend(spec, cfg.system) as a, ShuffledBackend(spec, cfg.system) as b:
        run(cfg, a, tmp_path / "a")
        run(cfg, b, tmp_path / "b")
    ta, tb = _tables(tmp_path / "a"), _tables(tmp_path / "b")
    for name in ta:
        pd.testing.assert_frame_equal(ta[name], tb[name], check_exact=True)


def test_ray_pool_describes_actors_and_places_on_cpu(ray_session):
    cfg = load_config(None, small_overrides(**{"system.actors": 2, "system.prefetch": True}))
    with make_backend(cfg) as pool:
        info = pool.describe()
        assert [d["worker_id"] for d in info] == [0, 1]
        assert {d["device"] for d in info} == {"cpu"}
        assert {d["threads"] for d in info} == {1}
        assert len({d["pid"] for d in info}) == 2  # two processes
        theta = np.zeros(1, np.float32)
        worker = ClientWorker(WorkerSpec.from_config(cfg))
        theta = flat_params(worker.model).numpy()
        pool.prefetch(np.arange(6))  # each actor builds the shards of the clients train places on it
        assert sorted(ray_session.get(pool._prefetching)) == [3, 3]
        chunks = list(pool.train(theta, 0, np.arange(6)))
        assert sorted(c.worker_id for c in chunks) == [0, 1]
        pool.prefetch(np.arange(6))  # every actor was given all of its clients: no call is sent
        assert pool._prefetching == []
        pool.prefetch(np.array([1, 3, 5, 8]))  # [8, 1] land on actor 0, which has neither: one call, there only
        assert ray_session.get(pool._prefetching) == [2]
        assert sorted(np.concatenate([c.client_ids for c in chunks]).tolist()) == list(range(6))
        # the same clients trained in-process give bit-identical vectors
        local = worker.train(theta, 0, list(range(6)))
        for c in chunks:
            rows = [list(local.client_ids).index(i) for i in c.client_ids]
            np.testing.assert_array_equal(c.vectors, local.vectors[rows])


@pytest.mark.parametrize(("algorithm", "dataset", "extra"), [
    ("fedavg", "synthetic", []),  # log-normal sizes: unequal weights n_i
    ("reptile", "sinusoid", ['privacy.mode="local"', "privacy.noise_multiplier=0.3", "privacy.clip=0.5"]),
])
def test_reduced_sums_are_identical_whatever_the_chunking(ray_session, tmp_path, algorithm, dataset, extra):
    # each call reduces its chunk to one int64 partial: 1 client a call, 2 a call, the whole cohort, 2 actors
    # with 1 client a call, and 3 pretend workers completing in reverse all combine to the same sums
    base = small_overrides(**{"algorithm.name": algorithm, "data.name": dataset}) + HETEROGENEOUS + extra
    inline = _run(tmp_path, "inline", base + ["system.backend=\"inline\""])
    runs = {f"inline-{c}": _run(tmp_path, f"inline{c}", base + ["system.backend=\"inline\"",
                                                              f"system.clients_per_actor={c}"]) for c in (1, 2)}
    runs["ray2-1"] = _run(tmp_path, "ray2", base + ["system.backend=\"ray\"", "system.actors=2",
                                                    "system.clients_per_actor=1"])
    runs["ray2-1-combined-in-actors"] = _run(tmp_path, "ray2a", base + [
        "system.backend=\"ray\"", "system.actors=2", "system.clients_per_actor=1", "system.combine=\"actors\""])
    cfg = load_config(None, base + ["system.backend=\"inline\""])
    with ShuffledBackend(WorkerSpec.from_config(cfg), cfg.system) as shuffled:
        run(cfg, shuffled, tmp_path / "shuffled")
    runs["shuffled"] = _tables(tmp_path / "shuffled")
    assert inline["rounds"]["num_completed"].sum() > 0
    for tag, tables in runs.items():
        for name in inline:
            pd.testing.assert_frame_equal(inline[name].drop(columns="actor_id", errors="ignore"),
                                          tables[name].drop(columns="actor_id", errors="ignore"), check_exact=True,
                                          obj=f"{tag} {name}")


def test_kept_partials_are_combined_by_an_actor_into_the_in_process_mean(ray_session):
    # the pool's own path, without a run: with combine = "actors" every chunk's partial stays in the object store
    # (a KeptPartial), and the mean an actor makes of them is the one the in-process worker's partials give
    cfg = load_config(None, small_overrides(**{"system.actors": 2, "system.clients_per_actor": 2,
                                               "system.combine": "actors", "algorithm.name": "fedavg"}))
    worker = ClientWorker(WorkerSpec.from_config(cfg))
    theta = flat_params(worker.model).numpy()
    ids = np.arange(7)
    red = Reduction(ids, np.arange(1, 8) / 28.0, Grid.for_bound())
    release = Release(ids, 1.25)
    expected = release_mean([worker.train(theta, 3, ids.tolist(), red).partial], release, theta.size)
    with make_backend(cfg) as pool:
        assert pool.combines_in_actors(theta.size)
        chunks = list(pool.train(theta, 3, ids, red))
        assert len(chunks) == 4 and all(isinstance(c.partial, KeptPartial) for c in chunks)
        np.testing.assert_array_equal(pool.release([c.partial for c in chunks], release, theta.size), expected)
    auto = load_config(None, small_overrides(**{"system.actors": 1}))
    with make_backend(auto) as pool:  # "auto": a small model's partials come to the driver
        assert not pool.combines_in_actors(theta.size) and pool.combines_in_actors(1 << 20)
        chunks = list(pool.train(theta, 3, ids, red))
        assert all(isinstance(c.partial, Partial) for c in chunks)
        np.testing.assert_array_equal(pool.release([c.partial for c in chunks], release, theta.size), expected)


CENTRAL_ADAPTIVE = ['privacy.mode="central"', "privacy.noise_multiplier=0.5", "privacy.clip=0.5",
                    "privacy.adaptive_quantile=0.5"]
FEDBUFF = dict(MODES)["fedbuff"]


@pytest.mark.parametrize("extra", [
    ["algorithm.name=\"fedavg\"", "data.name=\"synthetic\"", "rounds=5", *CENTRAL_ADAPTIVE],
    [*FEDBUFF, *CENTRAL_ADAPTIVE],  # FedAvg's weights c_i = n_i: the pool-level test below and test_reduce.py
], ids=["sync-central-dp-adaptive", "fedbuff-central-dp-adaptive"])
def test_a_mean_combined_in_an_actor_is_the_drivers(ray_session, tmp_path, extra):
    # system.combine = "actors", chunks of 2 clients on 2 actors: the partials (FedBuff: the clients' vectors,
    # dispatched at different versions) stay in the object store and one actor turns them into the release's mean,
    # with the central noise at the adaptive clip of the moment added there: the metrics are the inline run's, and
    # the adaptive clip moved (the next releases' noise and clipping depend on it)
    base = small_overrides(rounds=6) + HETEROGENEOUS + extra
    inline = _run(tmp_path, "inline", base + ["system.backend=\"inline\""])
    combined = _run(tmp_path, "ray", base + ["system.backend=\"ray\"", "system.actors=2", "system.clients_per_actor=2",
                                             "system.combine=\"actors\""])
    assert len(inline["rounds"]) == (6 if FEDBUFF[0] in extra else 5)
    if FEDBUFF[0] in extra:
        assert (inline["clients"]["staleness"] > 0).any()
    if CENTRAL_ADAPTIVE[0] in extra:
        assert inline["rounds"]["dp_clip"].nunique() > 1
    for name in inline:
        pd.testing.assert_frame_equal(inline[name].drop(columns="actor_id", errors="ignore"),
                                      combined[name].drop(columns="actor_id", errors="ignore"), check_exact=True,
                                      obj=name)


def test_submitted_vectors_stay_where_they_were_computed_until_a_buffer_sums_them(ray_session):
    # the pool's own path: with combine = "actors" each submitted chunk's vectors stay in the object store (KeptRows)
    # and its per-client scalars are the in-process worker's; the rows a buffer picks (one client twice, from
    # three chunks) sum to fedbuff_mean of those rows, bit for bit. Under "auto" a small model's vectors come to
    # the driver as the chunks' handles, and the inline backend holds its own: the same mean
    cfg = load_config(None, small_overrides(**{"system.actors": 2, "system.clients_per_actor": 2,
                                               "system.combine": "actors", "algorithm.name": "fedavg"}))
    spec = WorkerSpec.from_config(cfg)
    worker = ClientWorker(spec)
    theta, ids = flat_params(worker.model).numpy(), np.arange(7)
    keys = ids % 3
    full = worker.train(theta, keys, ids.tolist(), summarized=True)
    buffer = np.array([5, 0, 3, 5, 6])
    s = torch.tensor([1.0, 0.5, 2 ** -0.5, 1.0, 0.25], dtype=torch.float64)
    c = torch.from_numpy(full.num_samples[buffer].astype(np.float64))
    expected = fedbuff_mean(torch.from_numpy(full.vectors[buffer]), s, c).numpy()
    coefs = fedbuff_coefficients(s, c).numpy()
    red = Reduction(ids[buffer], coefs, Grid.for_bound(DEFAULT_BOUND, float(np.abs(coefs).sum())))

    def summed(backend, kind):
        results = [backend.result(p) for p in backend.submit(theta, keys, ids, keep=True)]
        assert all(isinstance(r.kept, kind) and r.vectors.shape == (0, theta.size) for r in results)
        where = {int(cid): (b, i) for b, r in enumerate(results) for i, cid in enumerate(r.client_ids.tolist())}
        for r in results:
            for name in ("accepted", "update_norm", "clip_norm", "loss_after"):
                np.testing.assert_array_equal(getattr(r, name), getattr(full, name)[r.client_ids], err_msg=name)
        sel = Selection(np.array([where[int(b)][0] for b in buffer]), np.array([where[int(b)][1] for b in buffer]),
                        red, keys[buffer])
        return backend.release_rows([r.kept for r in results], sel, Release(np.arange(len(buffer))), theta.size)

    with make_backend(cfg) as pool:
        np.testing.assert_array_equal(summed(pool, KeptRows), expected)
    auto = load_config(None, small_overrides(**{"system.actors": 1, "algorithm.name": "fedavg"}))
    with make_backend(auto) as pool:
        np.testing.assert_array_equal(summed(pool, np.ndarray), expected)
    with InlineBackend(spec, cfg.system) as inline:
        np.testing.assert_array_equal(summed(inline, np.ndarray), expected)


@pytest.mark.parametrize("backend", ["inline", "ray"])
def test_the_driver_runs_its_torch_work_at_the_workers_thread_count_and_gives_its_own_back(ray_session, tmp_path,
                                                                                          backend):
    """``fixed_threads``: during a run the driver's torch ops (server step, exact sums) run at ``system.threads``,
    whatever the backend (a Ray driver kept torch's default of a thread per core, next to busy actors), and the
    process's own count is back when the run ends."""
    cfg = load_config(None, small_overrides(rounds=2, **{"system.backend": backend, "system.actors": 1}))
    seen: list[int] = []
    threads = torch.get_num_threads()
    try:
        with make_backend(cfg) as pool:  # an in-process worker sets the count when it is built: 2 from here on
            torch.set_num_threads(2)
            run(cfg, pool, tmp_path / "run", on_round=lambda row: seen.append(torch.get_num_threads()))
            assert seen == [cfg.system.threads] * 2 == [1, 1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
