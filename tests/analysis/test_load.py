"""analysis.load_run on a finished run and on a run killed before its summary."""

from __future__ import annotations

import shutil

import pytest
from conftest import small_overrides

from actors.cli import main
from analysis import load_run


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


def test_load_hand_made_tables_with_a_truncated_part(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from simulator.rundir.metrics import ROUNDS_SCHEMA

    run_dir = tmp_path / "hand"
    (run_dir / "rounds.parquet").mkdir(parents=True)
    (run_dir / "config.toml").write_text('name = "hand"\nseed = 3\n\n[algorithm]\nname = "reptile"\n')
    rows = {name: [0, 1] if field.type == pa.int64() else [0.5, 1.5] for name, field in
            zip(ROUNDS_SCHEMA.names, ROUNDS_SCHEMA, strict=True)}
    rows["round"] = [1, 0]  # out of order on disk: the loader sorts
    pq.write_table(pa.table(rows, schema=ROUNDS_SCHEMA), run_dir / "rounds.parquet" / "part-00000.parquet")
    whole = (run_dir / "rounds.parquet" / "part-00000.parquet").read_bytes()
    (run_dir / "rounds.parquet" / "part-00001.parquet").write_bytes(whole[: len(whole) // 2])  # truncated copy
    with pytest.warns(UserWarning, match="unreadable part skipped"):
        run = load_run(run_dir)
    assert run.rounds["round"].tolist() == [0, 1] and run.rounds["train_loss"].tolist() == [1.5, 0.5]
    assert run.clients.empty and list(run.clients.columns)[:2] == ["round", "client_id"]
    assert run.summary is None and not run.complete and run.config["seed"] == 3
