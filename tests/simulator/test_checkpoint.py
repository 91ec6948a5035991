"""Checkpoints and exact resume: a run SIGKILLed anywhere and resumed equals an uninterrupted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import small_overrides

from actors.inline import InlineBackend
from simulator.config.schema import ConfigError
from simulator.contract import WorkerSpec
from simulator.experiment import load_config, replace
from simulator.rounds.run import run
from simulator.rundir import checkpoint
from simulator.rundir.metrics import WALL_CLOCK_COLUMNS

ROOT = Path(__file__).resolve().parents[2]
COMMON = {"rounds": 9, "checkpoint_every": 2, "metrics.flush_every": 3, "system.backend": "inline",
          "devices.dropout": 0.1, "devices.availability": 0.9, "eval.every": 3}
SYNC = small_overrides(**COMMON)
ASYNC = small_overrides(**COMMON, **{"system.mode": "async", "async.buffer_size": 3, "system.max_concurrency": 6})


def _run(overrides: list[str], run_dir: Path, resume: bool = False, **kw) -> dict:
    cfg = load_config(None, overrides)
    run_dir.mkdir(parents=True, exist_ok=True)
    with InlineBackend(WorkerSpec.from_config(cfg), cfg.system) as backend:
        return run(cfg, backend, run_dir, resume=resume, **kw)


def _tables(run_dir: Path) -> dict[str, pd.DataFrame]:
    out = {}
    for name, wall in WALL_CLOCK_COLUMNS.items():
        df = pd.read_parquet(run_dir / f"{name}.parquet").drop(columns=list(wall))
        out[name] = df.sort_values(list(df.columns[:2]), kind="stable").reset_index(drop=True)
    return out


def _assert_same_run(a: Path, b: Path) -> None:
    ta, tb = _tables(a), _tables(b)
    for name in ta:
        pd.testing.assert_frame_equal(ta[name], tb[name], check_exact=True, obj=name)
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    for key in ("status", "rounds_completed", "client_updates", "dropped", "final_eval", "first_eval",
                "final_train_loss", "sim_time_s"):
        assert sa[key] == sb[key], key
    ca, cb = checkpoint.load(a), checkpoint.load(b)
    assert torch.equal(ca["opt"]["theta"], cb["opt"]["theta"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("reference")
    refs = {"sync": base / "sync", "async": base / "async"}
    _run(SYNC, refs["sync"])
    _run(ASYNC, refs["async"])
    return refs


KILLS = [("sync", "round:4"), ("sync", "call:6"), ("sync", "flush:5"), ("sync", "save:3"),
         ("async", "round:5"), ("async", "call:9"), ("async", "save:2"), ("async", "flush:4")]


@pytest.mark.parametrize(("mode", "point"), KILLS)
def test_sigkill_anywhere_then_resume_equals_an_uninterrupted_run(tmp_path, reference, mode, point):
    overrides = SYNC if mode == "sync" else ASYNC
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(ROOT / "tests/simulator/killed_run.py"), str(run_dir), point,
                           *overrides], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not (run_dir / "summary.json").exists()  # a killed run never looks finished
    summary = _run(overrides, run_dir, resume=True)
    assert summary["status"] == "completed"
    _assert_same_run(reference[mode], run_dir)


class InterruptAt(InlineBackend):
    """Raises KeyboardInterrupt (as Ctrl-C would) when its ``stop``-th call starts, mid-round."""

    stop, calls = 7, 0

    def dispatch(self, method, theta, keys, client_ids, reduce=None):
        self.calls += 1
        if self.calls == self.stop:
            raise KeyboardInterrupt
        return super().dispatch(method, theta, keys, client_ids, reduce)


def _interrupted(overrides: list[str], run_dir: Path) -> tuple[Any, dict[str, Any]]:
    """A run stopped by Ctrl-C mid-round (``InterruptAt``): its config and checkpoint."""
    cfg = load_config(None, overrides)
    run_dir.mkdir()
    with InterruptAt(WorkerSpec.from_config(cfg), cfg.system) as backend:
        assert run(cfg, backend, run_dir)["status"] == "interrupted"
    return cfg, checkpoint.load(run_dir)


@pytest.mark.parametrize("overrides", [SYNC, ASYNC], ids=["sync", "async"])
def test_ctrl_c_mid_round_writes_a_checkpoint_and_resume_completes_exactly(tmp_path, reference, overrides):
    run_dir = tmp_path / "run"
    cfg, state = _interrupted(overrides, run_dir)
    done = state["next_round"]
    assert 1 <= done < cfg.rounds
    # the interrupted round's rows are rolled back; every completed round is on disk
    assert pd.read_parquet(run_dir / "rounds.parquet")["round"].tolist() == list(range(done))
    assert set(pd.read_parquet(run_dir / "clients.parquet")["round"]) == set(range(done))
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"
    assert _run(overrides, run_dir, resume=True)["status"] == "completed"
    _assert_same_run(reference["async" if overrides is ASYNC else "sync"], run_dir)


@pytest.mark.parametrize("rule", ["fedyogi", "fedadagrad"])
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_fedopt_moments_travel_in_the_checkpoint_and_resume_is_exact(tmp_path, rule, mode):
    overrides = (SYNC if mode == "sync" else ASYNC) + [f'algorithm.server_optimizer="{rule}"',
                                                       "algorithm.server_lr=0.05"]
    _run(overrides, tmp_path / "reference")
    run_dir = tmp_path / "run"
    cfg, state = _interrupted(overrides, run_dir)
    assert state["opt"]["exp_avg"] is not None and state["opt"]["exp_avg_sq"] is not None
    assert _run(overrides, run_dir, resume=True)["status"] == "completed"
    _assert_same_run(tmp_path / "reference", run_dir)


def test_checkpoint_holds_the_server_state_and_loads_weights_only(tmp_path):
    overrides = small_overrides(**{**COMMON, "algorithm.server_optimizer": "adam", "rounds": 4})
    _run(overrides, tmp_path)
    state = torch.load(tmp_path / checkpoint.FILE, weights_only=True)
    assert state["next_round"] == 4 and state["version"] >= 1
    assert state["opt"]["step"] == state["version"]
    assert state["opt"]["exp_avg"] is not None and state["opt"]["exp_avg_sq"] is not None
    assert state["config"]["rounds"] == 4
    assert not list(tmp_path.glob(".*.tmp"))


def test_resume_without_a_checkpoint_restarts_from_round_zero(tmp_path, reference):
    run_dir = tmp_path / "run"
    _run(SYNC, run_dir)
    (run_dir / checkpoint.FILE).unlink()  # as if killed before the first checkpoint
    _run(SYNC, run_dir, resume=True)
    _assert_same_run(reference["sync"], run_dir)


def test_resume_rejects_a_changed_config_and_accepts_execution_keys(tmp_path):
    _run(SYNC, tmp_path)
    cfg = load_config(None, SYNC)
    with pytest.raises(ConfigError, match=r"algorithm\.local_lr was 0\.02 .* now 0\.1"):
        checkpoint.check_compatible(cfg, replace(cfg, **{"algorithm.local_lr": 0.1}), tmp_path)
    checkpoint.check_compatible(cfg, replace(cfg, **{"system.actors": 2, "rounds": 20, "system.backend": "ray"}),
                                tmp_path)


def test_truncate_metrics_rewrites_parts_that_straddle_the_checkpoint(tmp_path):
    _run(small_overrides(**{**COMMON, "metrics.flush_every": 4, "rounds": 8, "checkpoint_every": 0}), tmp_path)
    checkpoint.truncate_metrics(tmp_path, 6)
    rounds = pd.read_parquet(tmp_path / "rounds.parquet")["round"].tolist()
    assert rounds == [0, 1, 2, 3, 4, 5]
    assert sorted(p.name for p in (tmp_path / "rounds.parquet").glob("*")) == ["part-00000.parquet",
                                                                             "part-00001.parquet"]
    assert np.all(pd.read_parquet(tmp_path / "clients.parquet")["round"] < 6)
    assert [h["round"] for h in checkpoint.history(tmp_path)] == rounds
