"""Asynchronous mode: a hand-computed 4-client FedBuff scenario, FedAsync, the sync limit, staleness drops, a buffer
whose kept rows were lost."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import small_overrides

from actors.inline import InlineBackend
from simulator.algorithms.aggregation import fedasync_mix, fedbuff_mean, staleness_weight
from simulator.algorithms.record import pseudo_gradient
from simulator.client.worker import ClientWorker
from simulator.contract import WorkerSpec
from simulator.experiment import load_config
from simulator.rounds.asynchronous import AsyncServer
from simulator.rounds.context import RunContext
from simulator.rounds.run import run
from simulator.rundir.metrics import WALL_CLOCK_COLUMNS

SPEEDS = (10.0, 20.0, 40.0, 80.0)  # samples per simulated second of clients 0..3


def _trace(tmp_path: Path) -> Path:
    path = tmp_path / "devices.csv"
    rows = [f"{c},{s},1000000,1000000" for c, s in enumerate(SPEEDS)]  # 1 Tbit/s: transfers take ~1e-7 s
    path.write_text("client_id,compute_speed,up_bw,down_bw\n" + "\n".join(rows) + "\n")
    return path


def _scenario(tmp_path: Path, rule: str, rounds: int = 3, algorithm: str = "reptile", **extra):
    # 4 clients, all in flight (max_concurrency = 4): a freed slot can only be refilled by the client
    # that just finished. Each update processes 2 steps x 10 samples = 20 samples: compute 2, 1, 0.5, 0.25 s.
    cfg = load_config(None, small_overrides(**{
        "rounds": rounds, "data.num_clients": 4, "clients.per_round": 4, "system.mode": "async",
        "system.max_concurrency": 4, "async.buffer_size": 2, "async.rule": rule, "async.staleness": "sqrt",
        "devices.trace": str(_trace(tmp_path)), "system.backend": "inline", "eval.every": 100,
        "algorithm.name": algorithm, **extra}))
    with InlineBackend(WorkerSpec.from_config(cfg), cfg.system) as backend:
        ctx = RunContext(cfg, backend, tmp_path / "run", None, None)
        theta0 = ctx.opt.params
        server = AsyncServer(ctx)
        server.run()
        ctx.writer.flush()
    clients = pd.read_parquet(tmp_path / "run" / "clients.parquet")
    rounds_df = pd.read_parquet(tmp_path / "run" / "rounds.parquet")
    return cfg, theta0, server, clients, rounds_df


def _update(cfg, theta: torch.Tensor, key: int, cid: int) -> torch.Tensor:
    """A client's update recomputed from scratch by a fresh worker."""
    worker = ClientWorker(WorkerSpec.from_config(cfg))
    return torch.from_numpy(worker.train(theta.numpy(), key, [cid]).vectors[0])


@pytest.mark.parametrize(("algorithm", "scale"), [("reptile", 1.0), ("fedavg", 1.0), ("maml", 1.5)])
def test_fedbuff_four_clients_hand_computed(tmp_path, algorithm, scale):
    # reptile and fedavg process 2 x 10 samples; maml 2 x 10 support + 10 query = 30: times x 1.5
    cfg, theta0, server, clients, rounds_df = _scenario(tmp_path, "fedbuff", algorithm=algorithm)
    # Timeline (c = one transfer, ~1e-7 s; refill group g = the key of the clients' batch streams):
    #   t=0      group 0 dispatches clients 0,1,2,3 on v0     (finish 2+2c, 1+2c, 0.5+2c, 0.25+2c)
    #   0.25+2c  client 3 (v0, tau 0) -> buffer; group 1 re-dispatches client 3 on v0   (finish 0.5+4c)
    #   0.5+2c   client 2 (v0, tau 0) -> buffer full: update v1; group 2 dispatches client 2 on v1
    #   0.5+4c   client 3 (v0, tau 1) -> buffer; group 3 dispatches client 3 on v1       (finish 0.75+6c)
    #   0.75+6c  client 3 (v1, tau 0) -> update v2; group 4: client 3 on v2
    #   1+2c     client 1 (v0, tau 2) -> buffer; group 5: client 1 on v2
    #   1+4c     client 2 (v1, tau 1) -> update v3 (the third and last)
    done = clients[clients["drop_reason"] == ""].sort_values(["sim_finish_s", "client_id"], ignore_index=True)
    assert done["client_id"].tolist() == [3, 2, 3, 3, 1, 2]
    assert done["start_version"].tolist() == [0, 0, 0, 1, 0, 1]
    assert done["staleness"].tolist() == [0, 0, 1, 0, 2, 1]
    assert done["round"].tolist() == [0, 0, 1, 1, 2, 2]
    c = 2 * 7044 / (1e6 * 125_000)  # one round trip of the 1,761-parameter float32 model
    x = scale
    np.testing.assert_allclose(done["sim_finish_s"], [0.25 * x + c, 0.5 * x + c, 0.5 * x + 2 * c, 0.75 * x + 3 * c,
                                                    x + c, x + 2 * c], rtol=1e-12)
    np.testing.assert_allclose(rounds_df["sim_time_s"], [0.5 * x + c, 0.75 * x + 3 * c, x + 2 * c], rtol=1e-12)
    assert rounds_df["model_version"].tolist() == [1, 2, 3]
    assert rounds_df["staleness_max"].tolist() == [0.0, 1.0, 2.0]
    assert rounds_df["staleness_mean"].tolist() == [0.0, 0.5, 1.5]
    np.testing.assert_allclose(done["staleness_weight"], [1, 1, 2 ** -0.5, 1, 3 ** -0.5, 2 ** -0.5], rtol=1e-15)

    # the server model, replayed by hand from client updates recomputed against their (stale) start versions
    lr, s = cfg.algorithm.server_lr, lambda tau: float(staleness_weight("sqrt", tau))

    def step(theta, updates):
        vectors = torch.stack([u for u, _ in updates]).double()
        weights = torch.tensor([s(t) for _, t in updates], dtype=torch.float64)
        return theta - lr * pseudo_gradient(server.ctx.algo, fedbuff_mean(vectors, weights).float())

    th1 = step(theta0, [(_update(cfg, theta0, 0, 3), 0), (_update(cfg, theta0, 0, 2), 0)])
    th2 = step(th1, [(_update(cfg, theta0, 1, 3), 1), (_update(cfg, th1, 3, 3), 0)])
    th3 = step(th2, [(_update(cfg, theta0, 0, 1), 2), (_update(cfg, th1, 2, 2), 1)])
    assert torch.equal(server.theta, th3)


@pytest.mark.parametrize("rho", [0.0, 0.5])
def test_fedasync_mixes_each_update_against_its_start_version(tmp_path, rho):
    # with async.proximal_rho > 0 each client's update (recomputed by a fresh worker of the same spec) is the
    # proximal one, pulled toward the start version it received (Xie et al. 2019, Alg. 1)
    cfg, theta0, server, clients, rounds_df = _scenario(tmp_path, "fedasync", rounds=3,
                                                        **{"async.proximal_rho": rho})
    assert WorkerSpec.from_config(cfg).proximal_rho == rho
    # every completion is a server update:
    #   0.25+2c  client 3 (v0, tau 0) -> v1; group 1 re-dispatches client 3 on v1 (finish 0.5+4c)
    #   0.5+2c   client 2 (v0, tau 1) -> v2; group 2: client 2 on v2
    #   0.5+4c   client 3 (v1, tau 1) -> v3
    done = clients[clients["drop_reason"] == ""].sort_values(["sim_finish_s", "client_id"], ignore_index=True)
    assert done["client_id"].tolist() == [3, 2, 3]
    assert done["start_version"].tolist() == [0, 0, 1]
    assert done["staleness"].tolist() == [0, 1, 1]
    a, lr, algo = cfg.async_.mixing, cfg.algorithm.server_lr, server.ctx.algo
    th1 = fedasync_mix(theta0, theta0 - lr * pseudo_gradient(algo, _update(cfg, theta0, 0, 3)), a, 1.0)
    th2 = fedasync_mix(th1, theta0 - lr * pseudo_gradient(algo, _update(cfg, theta0, 0, 2)), a, 2 ** -0.5)
    th = fedasync_mix(th2, th1 - lr * pseudo_gradient(algo, _update(cfg, th1, 1, 3)), a, 2 ** -0.5)
    assert torch.equal(server.theta, th)
    assert rounds_df["num_completed"].tolist() == [1, 1, 1]


def _tables(run_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    return pd.read_parquet(run_dir / "rounds.parquet"), pd.read_parquet(run_dir / "evals.parquet")


@pytest.mark.parametrize(("algorithm", "dataset", "extra"), [
    ("reptile", "sinusoid", {}),
    ("fedavg", "synthetic", {"data.samples_per_client": 30}),
    ("maml", "sinusoid", {"algorithm.server_optimizer": "adam", "algorithm.server_lr": 0.01}),
])
def test_async_with_full_buffer_and_equal_devices_is_sync(tmp_path, algorithm, dataset, extra):
    # K = per_round = max_concurrency and identical devices: every client of a refill group finishes at
    # the same instant, the buffer fills with exactly that cohort, and no update is stale
    base = {"algorithm.name": algorithm, "data.name": dataset, "system.backend": "inline", **extra}
    overrides = small_overrides(**base) + ['devices.speed={dist="constant", median=100.0}',
                                           'devices.bandwidth={dist="constant", median=20.0}']
    results = {}
    for mode, more in (("sync", []), ("async", ["system.max_concurrency=6", "async.buffer_size=6"])):
        cfg = load_config(None, overrides + [f'system.mode="{mode}"'] + more)
        with InlineBackend(WorkerSpec.from_config(cfg), cfg.system) as backend:
            assert run(cfg, backend, tmp_path / mode)["status"] == "completed"
        results[mode] = _tables(tmp_path / mode)
    (sr, se), (ar, ae) = results["sync"], results["async"]
    cols = ["round", "model_version", "sim_time_s", "num_completed", "train_loss", "train_loss_before", "update_norm",
            "staleness_max", "eval_loss_pre", "eval_loss_post"]
    pd.testing.assert_frame_equal(sr[cols], ar[cols], check_exact=True)
    pd.testing.assert_frame_equal(se.drop(columns="actor_id"), ae.drop(columns="actor_id"), check_exact=True)
    assert np.isfinite(sr["eval_loss_post"].dropna()).all()


def test_max_staleness_drops_exactly_the_stale_updates(tmp_path):
    cfg = load_config(None, small_overrides(**{
        "rounds": 8, "system.backend": "inline", "system.mode": "async", "system.max_concurrency": 6,
        "async.buffer_size": 2, "system.max_staleness": 1})
        + ['devices.speed={dist="pareto", median=100.0, shape=0.8}'])
    with InlineBackend(WorkerSpec.from_config(cfg), cfg.system) as backend:
        run(cfg, backend, tmp_path / "r")
    clients = pd.read_parquet(tmp_path / "r" / "clients.parquet")
    rounds_df = pd.read_parquet(tmp_path / "r" / "rounds.parquet")
    stale = clients[clients["drop_reason"] == "staleness"]
    kept = clients[clients["drop_reason"] == ""]
    assert len(stale) > 0, "the heavy-tailed devices should produce some stale updates"
    assert (stale["staleness"] > 1).all() and (kept["staleness"] <= 1).all()
    assert rounds_df["dropped_staleness"].sum() == len(stale)
    assert (rounds_df["staleness_max"] <= 1).all()
    assert not math.isnan(stale["loss_after"].iloc[0])  # trained and uploaded, then discarded by the server


class LosingRows(InlineBackend):
    """Loses a server update's kept rows at its first try (as a node's death would: ``PartialLost``)."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.tries, self.submits = 0, 0

    def submit(self, *args, **kwargs):
        self.submits += 1
        return super().submit(*args, **kwargs)

    def release_rows(self, blocks, selection, release, size):
        self.tries += 1
        if self.tries % 2:
            raise RuntimeError("the buffer's rows were lost (simulated)")
        return super().release_rows(blocks, selection, release, size)


def test_a_buffer_whose_rows_were_lost_trains_again_with_the_same_results(tmp_path):
    # the fast client 3 is buffered twice from version 0 (two refill groups); each update's first sum fails, the
    # buffer's clients train again from their start models (one submit per (version, refill group)), and the
    # run is the one without the loss
    cfg = load_config(None, small_overrides(**{
        "rounds": 3, "data.num_clients": 4, "clients.per_round": 4, "system.mode": "async",
        "system.max_concurrency": 4, "async.buffer_size": 3, "async.staleness": "sqrt", "algorithm.name": "fedavg",
        "devices.trace": str(_trace(tmp_path)), "system.backend": "inline", "eval.every": 100}))
    tables = {}
    for name, kind in (("plain", InlineBackend), ("losing", LosingRows)):
        with kind(WorkerSpec.from_config(cfg), cfg.system) as backend:
            assert run(cfg, backend, tmp_path / name)["status"] == "completed"
            if name == "losing":
                assert backend.tries == 6 and backend.submits > 0
        tables[name] = {t: pd.read_parquet(tmp_path / name / f"{t}.parquet").drop(columns=list(w))
                        for t, w in WALL_CLOCK_COLUMNS.items()}
    counted = tables["plain"]["clients"].query("drop_reason == ''")
    assert (counted.groupby(["round", "start_version"])["client_id"].value_counts() == 2).any()  # twice, one start
    for t in tables["plain"]:
        pd.testing.assert_frame_equal(tables["plain"][t], tables["losing"][t], check_exact=True, obj=t)
    log = (tmp_path / "losing" / "errors.log").read_text()
    assert "the buffer's rows were lost (simulated)" in log
    assert log.count("failed (attempt") == 3  # the 3 lost sums, and no training call that failed along the way
