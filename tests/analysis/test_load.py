"""analysis.load_run on a finished run and on a run killed before its summary."""

from __future__ import annotations

import shutil

import pytest
from conftest import small_overrides

from analysis import load_run
from simulator.cli import main


def test_load_finished_and_killed_runs(tmp_path):
    out = tmp_path / "run"
    argv = [a for o in small_overrides(**{"system.backend": "inline"}) for a in ("--set", o)]
    assert main(["run", "--out", str(out), "--no-progress", "--no-plots", *argv]) == 0
    run = load_run(out)
    assert run.complete and run.config["rounds"] == 4
    assert run.rounds["round"].tolist() == [0, 1, 2, 3]
    assert len(run.clients) == 24 and len(run.evals) == 12
    assert run.label_histogram is None  # sinusoid is not a partitioned pool
    # a killed run: no summary, the last part missing, a half-written temp file left behind
    killed = tmp_path / "killed"
    shutil.copytree(out, killed)
    (killed / "summary.json").unlink()
    parts = sorted((killed / "rounds.parquet").glob("part-*.parquet"))
    parts[-1].unlink()
    (killed / "rounds.parquet" / ".part-00001.parquet.tmp").write_bytes(b"PAR1 truncated")
    partial = load_run(killed)
    assert not partial.complete and partial.summary is None
    assert partial.rounds["round"].tolist() == [0, 1]  # flushed every 2 rounds
    assert list(partial.rounds.columns) == list(run.rounds.columns)


def test_load_rejects_a_directory_that_is_not_a_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a metafleet run"):
        load_run(tmp_path)


def test_load_reads_the_label_histogram_of_a_pooled_run(tmp_path):
    out = tmp_path / "run"
    overrides = small_overrides(**{"system.backend": "inline", "data.name": "gaussian", "data.partition": "shards",
                                   "rounds": 1})
    argv = [a for o in overrides for a in ("--set", o)]
    assert main(["run", "--out", str(out), "--no-progress", "--no-plots", *argv]) == 0
    hist = load_run(out).label_histogram
    assert hist is not None and hist["client_id"].nunique() == 28
    assert hist.groupby("client_id")["label"].nunique().max() <= 4  # 2 label-sorted shards: few classes
