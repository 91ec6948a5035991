"""analysis.tables.setting_table on a real sweep: one row per setting, seeds aggregated with exact numbers."""

from __future__ import annotations

import math
import statistics

import pytest
from scipy.stats import t as student_t
from sweep_runs import KILLED, make_sweep

from analysis import load_run, load_runs
from analysis.tables import setting_table, status_counts, summary_table


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    return make_sweep(tmp_path_factory.mktemp("tables"))


def _final_losses(paths) -> list[float]:
    return [float(load_run(p).rounds["eval_loss_post"].dropna().iloc[-1]) for p in paths]


def test_setting_table_aggregates_the_seeds_of_each_setting(sweep):
    with pytest.warns(UserWarning, match="no rounds written yet"):
        rs = load_runs(sweep)
    table = setting_table(rs)
    assert table["setting"].tolist() == [1, 2] and table["n"].tolist() == [4, 2]
    assert table["label"].tolist() == [
        "algorithm.name=reptile, algorithm.server_lr=1.0, algorithm.server_optimizer=sgd",
        "algorithm.name=maml, algorithm.server_lr=0.003, algorithm.server_optimizer=adam"]
    assert table["status"].tolist() == ["3 completed, 1 running/killed", "2 completed"]
    assert table["rounds"].tolist() == ["4", "4"] and "accuracy" not in table  # sinusoid: regression
    reptile = sorted((sweep / "trials").glob("t000[0-3]-*"))
    assert table["runs"][0] == [p.name for p in reptile]
    losses = _final_losses(reptile)
    iv = table["loss"][0]
    assert iv.n == 4 and iv.mean == pytest.approx(statistics.fmean(losses), rel=1e-15)
    half = student_t.ppf(0.975, 3) * statistics.stdev(losses) / math.sqrt(4)
    assert iv.half_width == pytest.approx(half, rel=1e-12)
    minmax = setting_table(rs, "minmax")["loss"][1]
    maml = _final_losses(sorted((sweep / "trials").glob("t000[45]-*")))
    assert (minmax.low, minmax.high, minmax.half_width) == (min(maml), max(maml), None)
    per_run = summary_table(rs)
    walls = per_run.loc[per_run["run"].isin(table["runs"][1]), "wall_time_s"]
    assert table["wall_time_s"][1] == pytest.approx(walls.mean(), rel=1e-15)
    assert per_run.loc[per_run["run"] == KILLED, "status"].item() == "running or killed"


def test_status_counts():
    assert status_counts(["completed"] * 3) == "3 completed"
    assert status_counts(["failed", "completed", "completed"]) == "2 completed, 1 failed"
    assert status_counts(["stalled", "running or killed", "interrupted"]) == \
        "1 interrupted, 1 stalled, 1 running/killed"
