"""Differential privacy through whole runs: sigma = 0 with a huge clip is the plain run bit for bit, the budget
stop fires before the round that would exceed the target (and a resume stops there again), and DP runs are
identical with the inline backend and Ray with 2 actors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import small_overrides

from actors.backends import make_backend
from actors.inline import InlineBackend
from analysis import load_runs
from analysis.plots import standard_figures
from simulator.contract import WorkerSpec
from simulator.experiment import load_config
from simulator.privacy.accounting import planned_epsilon
from simulator.rounds.run import run
from simulator.rundir.metrics import WALL_CLOCK_COLUMNS

DP_COLUMNS = ("dp_epsilon", "dp_clip")


def _run(path, overrides, resume=False):
    cfg = load_config(None, overrides)
    with make_backend(cfg) if cfg.system.backend == "ray" else InlineBackend(WorkerSpec.from_config(cfg),
                                                                             cfg.system) as backend:
        summary = run(cfg, backend, path, resume=resume)
    tables = {}
    for name, wall in WALL_CLOCK_COLUMNS.items():
        df = pd.read_parquet(path / f"{name}.parquet").drop(columns=list(wall))
        tables[name] = df.sort_values(["round"] if name == "rounds" else ["round", "client_id"], ignore_index=True)
    return summary, tables


INLINE = ['system.backend="inline"']
HUGE = ['privacy.mode="central"', "privacy.clip=1e30", "privacy.noise_multiplier=0.0"]


@pytest.mark.parametrize("extra", [[], ['system.mode="async"', "async.buffer_size=3", "system.max_concurrency=6"]],
                         ids=["sync", "fedbuff"])
def test_no_noise_and_a_huge_clip_is_the_plain_run_bit_for_bit(tmp_path, extra):
    base = small_overrides() + INLINE + extra
    _, plain = _run(tmp_path / "plain", base)
    summary, dp = _run(tmp_path / "dp", base + HUGE)
    assert summary["dp_epsilon"] == "inf" and (dp["rounds"]["dp_clip"] == 1e30).all()  # strict JSON: no Infinity
    assert plain["rounds"]["dp_epsilon"].isna().all()
    for name in plain:
        a, b = plain[name], dp[name]
        if name == "rounds":
            a, b = a.drop(columns=list(DP_COLUMNS)), b.drop(columns=list(DP_COLUMNS))
        pd.testing.assert_frame_equal(a, b, check_exact=True)


def test_the_budget_stop_fires_before_the_round_that_would_exceed_it(tmp_path):
    base = small_overrides(rounds=8) + INLINE + ['privacy.mode="central"', "privacy.noise_multiplier=3.0"]
    cfg = load_config(None, base)
    eps = [planned_epsilon(cfg, t) for t in range(1, 9)]
    target = (eps[2] + eps[3]) / 2  # three rounds fit, the fourth would not
    stop = base + [f"privacy.target_epsilon={target}"]
    summary, tables = _run(tmp_path / "run", stop)
    assert summary["status"] == "budget_exhausted" and summary["rounds_completed"] == 3
    assert summary["dp_epsilon"] == pytest.approx(eps[2], rel=1e-12) and summary["dp_epsilon"] <= target
    assert np.allclose(tables["rounds"]["dp_epsilon"], eps[:3], rtol=1e-12)
    assert sorted(tables["clients"]["round"].unique()) == [0, 1, 2]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "budget_exhausted"
    # a resume of the stopped run stops at the same place, with the same rows
    again, tables2 = _run(tmp_path / "run", stop, resume=True)
    assert again["status"] == "budget_exhausted" and again["rounds_completed"] == 3
    pd.testing.assert_frame_equal(tables["rounds"], tables2["rounds"], check_exact=True)
    # the standard figures put epsilon by round next to the loss curve when DP is on, and only then
    fig = standard_figures(load_runs(str(tmp_path / "run")))["loss_and_epsilon"]
    assert [len(ax.lines) for ax in fig.axes] == [1, 1]
    assert np.allclose(fig.axes[1].lines[0].get_ydata(), eps[:3], rtol=1e-12)
    _run(tmp_path / "plain", small_overrides() + INLINE)
    assert "loss_and_epsilon" not in standard_figures(load_runs(str(tmp_path / "plain")))


DP_CASES = [
    ("central-adaptive", ['privacy.mode="central"', "privacy.noise_multiplier=0.5", "privacy.clip=0.5",
                          "privacy.adaptive_quantile=0.5", "devices.dropout=0.3"]),
    ("local-fedbuff", ['privacy.mode="local"', "privacy.noise_multiplier=0.2", 'system.mode="async"',
                       "async.buffer_size=3", "system.max_concurrency=6"]),
]


@pytest.mark.parametrize(("name", "extra"), DP_CASES, ids=[c[0] for c in DP_CASES])
def test_dp_runs_are_identical_inline_and_ray_with_2_actors(ray_session, tmp_path, name, extra):
    base = small_overrides() + extra
    _, inline = _run(tmp_path / "inline", base + INLINE)
    _, ray2 = _run(tmp_path / "ray2", base + ['system.backend="ray"', "system.actors=2"])
    assert np.isfinite(inline["rounds"]["dp_epsilon"]).all()
    for table in inline:
        pd.testing.assert_frame_equal(inline[table], ray2[table], check_exact=True)
