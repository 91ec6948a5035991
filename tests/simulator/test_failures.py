"""The driver's side of failures: non-finite updates are rejected, failing client work is re-run up to
``system.max_failures`` times, and beyond that the run stops cleanly and resumes exactly."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import small_overrides

from actors.inline import InlineBackend
from simulator.client.reduce import reduce_result
from simulator.contract import TrainResult, WorkerSpec
from simulator.experiment import load_config
from simulator.rounds.run import run
from simulator.rundir import checkpoint

BASE = {"rounds": 5, "system.backend": "inline", "checkpoint_every": 2}
ASYNC = {"system.mode": "async", "async.buffer_size": 3, "system.max_concurrency": 6}


class Poison(InlineBackend):
    """Makes the updates of ``bad`` clients NaN (or all updates of round ``bad_round``)."""

    bad: set[int] = set()
    bad_round = -1

    def dispatch(self, method, theta, keys, client_ids, reduce=None):
        pending = super().dispatch(method, theta, keys, client_ids)  # unreduced: poisoned first, reduced after
        for p in pending:
            if method == "train" and (np.isscalar(keys) and keys == self.bad_round
                                      or set(map(int, p.client_ids)) & self.bad):
                inner = p.thunk
                p.thunk = lambda inner=inner, key=keys: self._poison(inner(), key)
            if reduce is not None:
                inner = p.thunk
                key = np.broadcast_to(np.asarray(keys, np.int64), (len(p.client_ids),))
                p.thunk = lambda inner=inner, key=key: reduce_result(inner(), reduce, self.worker.spec.seed, key)
        return pending

    def _poison(self, res: TrainResult, key) -> TrainResult:
        vectors = res.vectors.copy()
        for i, c in enumerate(res.client_ids):
            if int(c) in self.bad or (np.isscalar(key) and key == self.bad_round):
                vectors[i, 0] = np.nan if i % 2 == 0 else np.inf
        return TrainResult(res.worker_id, res.client_ids, vectors, res.num_samples, res.samples_processed,
                           res.loss_before, res.loss_after, res.compute_time_s)


class Flaky(InlineBackend):
    """Raises from the result of its ``fail_calls``-th train calls (as a crashing client step would)."""

    fail_calls: set[int] = set()
    calls = 0

    def dispatch(self, method, theta, keys, client_ids, reduce=None):
        pending = super().dispatch(method, theta, keys, client_ids, reduce)
        if method == "train":
            self.calls += 1
            if self.calls in self.fail_calls:
                for p in pending:
                    p.thunk = _raise
        return pending


def _raise():
    raise MemoryError("CUDA out of memory (simulated)\nsecond line")


def _go(backend_cls, run_dir, resume=False, **extra):
    cfg = load_config(None, small_overrides(**{**BASE, **extra}))
    run_dir.mkdir(parents=True, exist_ok=True)
    with backend_cls(WorkerSpec.from_config(cfg), cfg.system) as backend:
        return run(cfg, backend, run_dir, resume=resume)


def test_a_round_of_nonfinite_updates_leaves_the_model_untouched(tmp_path):
    backend = type("AllBad", (Poison,), {"bad_round": 1, "bad": set()})
    _go(backend, tmp_path)
    rounds = pd.read_parquet(tmp_path / "rounds.parquet").set_index("round")
    assert rounds.loc[1, "dropped_nonfinite"] == 6 and rounds.loc[1, "num_completed"] == 0
    assert rounds.loc[1, "model_version"] == rounds.loc[0, "model_version"] == 1
    assert np.isnan(rounds.loc[1, "update_norm"]) and np.isnan(rounds.loc[1, "train_loss"])
    assert rounds["model_version"].tolist() == [1, 1, 2, 3, 4]
    clients = pd.read_parquet(tmp_path / "clients.parquet")
    bad = clients[clients["round"] == 1]
    assert (bad["drop_reason"] == "nonfinite").all() and bad["dropped"].all() and bad["weight"].isna().all()
    assert json.loads((tmp_path / "summary.json").read_text())["dropped"]["nonfinite"] == 6


@pytest.mark.parametrize("extra", [{}, ASYNC], ids=["sync", "async"])
def test_one_nonfinite_client_is_rejected_and_counted(tmp_path, extra):
    ref = _go(InlineBackend, tmp_path / "ref", **extra)
    clients = pd.read_parquet(tmp_path / "ref" / "clients.parquet")
    victim = int(clients["client_id"].value_counts().index[0])  # the most often sampled client
    backend = type("OneBad", (Poison,), {"bad": {victim}, "bad_round": -1})
    summary = _go(backend, tmp_path / "bad", **extra)
    got = pd.read_parquet(tmp_path / "bad" / "clients.parquet")
    hits = got[got["client_id"] == victim]
    assert (hits.loc[~hits["drop_reason"].isin(["offline", "dropout"]), "drop_reason"] == "nonfinite").all()
    assert summary["dropped"]["nonfinite"] >= 1
    assert summary["dropped"]["nonfinite"] == (got["drop_reason"] == "nonfinite").sum()
    assert np.isfinite(summary["final_train_loss"]) and ref["status"] == summary["status"] == "completed"


def test_failing_client_work_is_rerun_and_the_results_are_unchanged(tmp_path):
    _go(InlineBackend, tmp_path / "ref")
    flaky = type("Twice", (Flaky,), {"fail_calls": {2, 3}})  # round 1 fails twice, then succeeds
    assert _go(flaky, tmp_path / "flaky", **{"system.max_failures": 2})["status"] == "completed"
    a, b = (pd.read_parquet(tmp_path / d / "rounds.parquet").drop(columns="wall_time_s") for d in ("ref", "flaky"))
    pd.testing.assert_frame_equal(a, b, check_exact=True)


@pytest.mark.parametrize("extra", [{}, ASYNC], ids=["sync", "async"])
def test_failures_beyond_the_limit_stop_the_run_cleanly_and_it_resumes_exactly(tmp_path, extra):
    _go(InlineBackend, tmp_path / "ref", **extra)
    broken = type("Broken", (Flaky,), {"fail_calls": set(range(4, 100))})
    summary = _go(broken, tmp_path / "run", **{"system.max_failures": 1, **extra})
    assert summary["status"] == "failed"
    assert "failed 2 times, last with MemoryError: CUDA out of memory (simulated)" in summary["error"]
    assert "--resume" in summary["error"] and "second line" not in summary["error"]
    log = (tmp_path / "run" / "errors.log").read_text()  # each failure's whole text, for the details
    assert log.count("failed (attempt") == 2 and "MemoryError: CUDA out of memory (simulated)\nsecond line" in log
    assert "Traceback (most recent call last)" in log and str(tmp_path / "run" / "errors.log") in summary["error"]
    state = checkpoint.load(tmp_path / "run")
    assert state is not None and state["next_round"] == summary["rounds_completed"]
    assert _go(InlineBackend, tmp_path / "run", resume=True, **extra)["status"] == "completed"
    a, b = (pd.read_parquet(tmp_path / d / "rounds.parquet").drop(columns="wall_time_s").sort_values("round")
            .reset_index(drop=True) for d in ("ref", "run"))
    pd.testing.assert_frame_equal(a, b, check_exact=True)
