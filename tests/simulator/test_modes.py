"""Round policies through the driver: who is dropped, who is trained, and what the tables say."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import small_overrides

from actors.inline import InlineBackend
from simulator.algorithms.record import planned_samples
from simulator.algorithms.registry import ALGORITHMS
from simulator.contract import WorkerSpec
from simulator.data.registry import make_dataset
from simulator.experiment import load_config
from simulator.rounds.run import run
from simulator.scheduling import Devices, client_durations, sample_cohort

PARETO = 'devices.speed={dist="pareto", median=100.0, shape=1.0}'


def _run(tmp_path, *extra: str, **kw):
    cfg = load_config(None, small_overrides(**{"system.backend": "inline", **kw}) + list(extra))
    with InlineBackend(WorkerSpec.from_config(cfg), cfg.system) as backend:
        summary = run(cfg, backend, tmp_path)
    rounds = pd.read_parquet(tmp_path / "rounds.parquet")
    clients = pd.read_parquet(tmp_path / "clients.parquet")
    return cfg, summary, rounds, clients


def _durations(cfg, ids: np.ndarray) -> np.ndarray:
    """Each client's simulated duration, recomputed from scratch."""
    ds = make_dataset(cfg.data, cfg.seed)
    algo = ALGORITHMS[cfg.algorithm.name]
    samples = [planned_samples(algo, cfg.algorithm, *ds.split_sizes(int(c))) for c in ids]
    return client_durations(Devices(cfg.devices, cfg.seed).profiles(ids), np.array(samples), 7044, 7044)


def test_deadline_drops_exactly_the_late_clients_and_does_not_train_them(tmp_path):
    cfg, summary, rounds, clients = _run(tmp_path, PARETO, **{"system.mode": "deadline", "system.deadline_s": 0.4})
    for r in range(cfg.rounds):
        ids = sample_cohort(cfg.seed, r, cfg.data.num_clients, cfg.clients.per_round)
        late = ids[_durations(cfg, ids) > 0.4]
        rows = clients[clients["round"] == r]
        assert sorted(rows.loc[rows["drop_reason"] == "deadline", "client_id"]) == sorted(late.tolist())
        assert rounds.loc[r, "dropped_deadline"] == len(late)
        assert rounds.loc[r, "num_completed"] == len(ids) - len(late)
    dropped = clients[clients["dropped"]]
    assert len(dropped) > 0 and (dropped["actor_id"] == -1).all() and dropped["loss_after"].isna().all()
    done = clients[~clients["dropped"]]
    assert (done["sim_finish_s"] <= done["sim_start_s"] + 0.4).all()
    # each round ends at the deadline when someone was late
    durations = rounds["round_sim_duration_s"].to_numpy()
    assert np.all(durations <= 0.4 + 1e-12)
    assert np.allclose(durations[rounds["dropped_deadline"] > 0], 0.4)
    assert summary["dropped"]["deadline"] == len(dropped)


def test_overselect_keeps_the_first_per_round_to_finish(tmp_path):
    cfg, _, rounds, clients = _run(tmp_path, PARETO, **{"system.mode": "overselect", "system.overselect": 1.5})
    for r in range(cfg.rounds):
        ids = sample_cohort(cfg.seed, r, cfg.data.num_clients, 9)  # ceil(1.5 x 6)
        d = _durations(cfg, ids)
        first = ids[np.lexsort((ids, d))[:6]]
        rows = clients[clients["round"] == r]
        assert sorted(rows.loc[~rows["dropped"], "client_id"]) == sorted(first.tolist())
        assert (rows.loc[rows["dropped"], "drop_reason"] == "overselect").all()
        assert rounds.loc[r, "num_sampled"] == 9 and rounds.loc[r, "dropped_overselect"] == 3
        assert rounds.loc[r, "round_sim_duration_s"] == pytest.approx(np.sort(d)[5], rel=1e-12)


def test_sync_round_lasts_as_long_as_its_slowest_client_and_counts_bytes(tmp_path):
    cfg, _, rounds, clients = _run(tmp_path, PARETO)
    for r in range(cfg.rounds):
        ids = sample_cohort(cfg.seed, r, cfg.data.num_clients, cfg.clients.per_round)
        assert rounds.loc[r, "round_sim_duration_s"] == pytest.approx(_durations(cfg, ids).max(), rel=1e-12)
    assert (rounds["bytes_up"] == 6 * 7044).all() and (rounds["bytes_down"] == 6 * 7044).all()
    assert np.allclose(rounds["sim_time_s"], np.cumsum(rounds["round_sim_duration_s"]))
    assert (clients["staleness"] == 0).all() and not clients["dropped"].any()
    assert clients["compute_speed"].nunique() > 1  # heterogeneous devices are recorded per client


def test_offline_and_dropout_clients_are_counted_and_not_aggregated(tmp_path):
    cfg, summary, rounds, clients = _run(tmp_path, "devices.availability=0.6", "devices.dropout=0.3", rounds=6)
    offline, dropout = clients[clients["drop_reason"] == "offline"], clients[clients["drop_reason"] == "dropout"]
    assert len(offline) > 0 and len(dropout) > 0
    assert (offline["sim_finish_s"] == offline["sim_start_s"]).all()
    assert (dropout["sim_finish_s"] < dropout["sim_start_s"] + _durations(cfg, dropout["client_id"].to_numpy())).all()
    per_round = clients.groupby("round")["dropped"].agg(["sum", "size"])
    assert (rounds["num_dropped"].to_numpy() == per_round["sum"].to_numpy()).all()
    assert (rounds["num_completed"] + rounds["num_dropped"] == rounds["num_sampled"]).all()
    # downloads: every online client; uploads: only the aggregated ones
    online = clients[clients["drop_reason"] != "offline"].groupby("round").size()
    assert (rounds["bytes_down"].to_numpy() == 7044 * online.reindex(range(6), fill_value=0).to_numpy()).all()
    assert summary["dropped"]["offline"] == len(offline) and summary["dropped"]["dropout"] == len(dropout)


def test_pooled_dataset_run_writes_its_label_histogram(tmp_path):
    _, summary, _, clients = _run(tmp_path, **{"data.name": "gaussian", "data.partition": "dirichlet",
                                               "data.dirichlet_alpha": 0.3})
    hist = pd.read_parquet(tmp_path / "label_histogram.parquet")
    assert list(hist.columns) == ["client_id", "label", "count"]
    assert hist["client_id"].nunique() == 24 + 4  # training and held-out clients
    sizes = hist.groupby("client_id")["count"].sum()
    seen = clients.drop_duplicates("client_id").set_index("client_id")["num_samples"]
    assert (sizes.loc[seen.index] == seen).all()
    assert summary["status"] == "completed" and np.isfinite(summary["final_eval"]["eval_metric_post"])


def test_async_run_stalls_cleanly_when_nobody_can_come_online(tmp_path):
    trace = tmp_path / "avail.csv"
    trace.write_text("client_id,start,end\n0,0,0.05\n1,0,0.05\n")  # everyone is offline after 0.05 s
    _, summary, rounds, _ = _run(tmp_path / "run", f'devices.availability_trace="{trace}"',
                                 **{"system.mode": "async", "async.buffer_size": 2, "rounds": 50})
    assert summary["status"] == "stalled"
    assert 0 < summary["rounds_completed"] < 50 == summary["rounds_planned"]
    assert len(rounds) == summary["rounds_completed"]
