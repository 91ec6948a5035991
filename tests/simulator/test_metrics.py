"""Parquet metric tables: part files written atomically, readable at any time with pandas."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from conftest import small_overrides

from actors.cli import main
from simulator.rundir.files import atomic_write_bytes, write_json
from simulator.rundir.metrics import (
    CLIENTS_SCHEMA,
    EVALS_SCHEMA,
    ROUNDS_SCHEMA,
    TABLES,
    MetricsWriter,
    PartitionedTable,
)
from simulator.rundir.summary import json_value


def eval_row(i: int) -> dict:
    return {"round": i // 2, "client_id": 100 + i, "actor_id": i % 3, "loss_pre": 1.0 + i, "loss_post": 0.5 * i,
            "metric_pre": 0.125 * i, "metric_post": math.nan if i == 3 else 0.25}


def full_row(schema, i: int) -> dict:
    return {name: (i if str(schema.field(name).type) == "int64" else i + 0.5) for name in schema.names}


def test_rows_flushed_as_parts_read_back_with_pandas(tmp_path):
    table = PartitionedTable(tmp_path / "evals.parquet", EVALS_SCHEMA)
    rows = [eval_row(i) for i in range(5)]
    for row in rows[:3]:
        table.append(row)
    assert list((tmp_path / "evals.parquet").iterdir()) == []  # nothing written before a flush
    table.flush()
    for row in rows[3:]:
        table.append(row)
    table.flush()
    table.flush()  # nothing buffered: no empty part
    parts = sorted(p.name for p in (tmp_path / "evals.parquet").iterdir())
    assert parts == ["part-00000.parquet", "part-00001.parquet"]
    got = pd.read_parquet(tmp_path / "evals.parquet")
    expected = pd.DataFrame(rows, columns=EVALS_SCHEMA.names)
    pd.testing.assert_frame_equal(got.reset_index(drop=True), expected)
    assert str(got["client_id"].dtype) == "int64"


def test_reopened_table_continues_numbering(tmp_path):
    d = tmp_path / "evals.parquet"
    first = PartitionedTable(d, EVALS_SCHEMA)
    first.append(eval_row(0))
    first.flush()
    second = PartitionedTable(d, EVALS_SCHEMA)
    second.append(eval_row(1))
    second.flush()
    assert sorted(p.name for p in d.iterdir()) == ["part-00000.parquet", "part-00001.parquet"]
    assert pd.read_parquet(d)["client_id"].tolist() == [100, 101]


def test_leftover_temp_file_does_not_break_reading(tmp_path):
    d = tmp_path / "evals.parquet"
    table = PartitionedTable(d, EVALS_SCHEMA)
    table.append(eval_row(0))
    table.append(eval_row(1))
    table.flush()
    (d / ".part-00009.parquet.tmp").write_bytes(b"\x00garbage, not parquet\xff" * 10)
    got = pd.read_parquet(d)
    assert got["client_id"].tolist() == [100, 101]
    # and a writer reopening the directory does not count the temp file as a part
    again = PartitionedTable(d, EVALS_SCHEMA)
    again.append(eval_row(2))
    again.flush()
    assert (d / "part-00001.parquet").is_file()
    assert pd.read_parquet(d)["client_id"].tolist() == [100, 101, 102]


def test_append_rejects_missing_and_unexpected_keys(tmp_path):
    table = PartitionedTable(tmp_path / "evals.parquet", EVALS_SCHEMA)
    row = eval_row(0)
    del row["loss_post"]
    with pytest.raises(KeyError, match="loss_post"):
        table.append(row)
    with pytest.raises(KeyError, match="bogus"):
        table.append({**eval_row(0), "bogus": 1})
    table.flush()
    assert list((tmp_path / "evals.parquet").iterdir()) == []  # rejected rows were not buffered


def test_extend_appends_columns(tmp_path):
    table = PartitionedTable(tmp_path / "evals.parquet", EVALS_SCHEMA)
    rows = [eval_row(i) for i in range(4)]
    table.extend({name: [r[name] for r in rows] for name in EVALS_SCHEMA.names})
    table.flush()
    got = pd.read_parquet(tmp_path / "evals.parquet")
    pd.testing.assert_frame_equal(got, pd.DataFrame(rows, columns=EVALS_SCHEMA.names))


def test_rows_appended_and_extended_in_chunks_keep_their_order_and_truncate_anywhere(tmp_path):
    """Rows added one at a time and as numpy columns are buffered as chunks: the file holds them in the order they
    came, an array changed by its caller after ``extend`` is not, and ``truncate`` cuts inside any chunk."""
    table = PartitionedTable(tmp_path / "evals.parquet", EVALS_SCHEMA)
    rows = [eval_row(i) for i in range(9)]
    table.append(rows[0])
    block = {name: np.array([r[name] for r in rows[1:4]]) for name in EVALS_SCHEMA.names}
    table.extend(block)
    block["loss_pre"][:] = -1.0  # the caller reuses its array: the buffered rows keep their values
    table.append(rows[4])
    table.append(rows[5])
    table.extend({name: [r[name] for r in rows[6:9]] for name in EVALS_SCHEMA.names})
    assert table.buffered == 9
    table.truncate(9)
    assert table.buffered == 9
    table.truncate(5)  # inside the second appended chunk: rows 0-4 stay
    assert table.buffered == 5
    table.append(rows[8])
    with pytest.raises(ValueError, match="different lengths"):
        table.extend({name: [0] * (2 if name == "loss_pre" else 1) for name in EVALS_SCHEMA.names})
    table.flush()
    assert table.buffered == 0
    table.flush()  # nothing buffered: no second part
    got = pd.read_parquet(tmp_path / "evals.parquet")
    pd.testing.assert_frame_equal(got, pd.DataFrame(rows[:5] + rows[8:], columns=EVALS_SCHEMA.names))
    assert len(list((tmp_path / "evals.parquet").glob("part-*.parquet"))) == 1


def test_metrics_writer_flushes_every_n_rounds(tmp_path):
    writer = MetricsWriter(tmp_path, flush_every=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{n}.parquet" for n in TABLES)
    for round_idx in range(3):
        writer.tables["rounds"].append(full_row(ROUNDS_SCHEMA, round_idx))
        writer.tables["clients"].append(full_row(CLIENTS_SCHEMA, round_idx))
        writer.end_round(round_idx)
        n_parts = len(list((tmp_path / "rounds.parquet").glob("part-*.parquet")))
        assert n_parts == (0 if round_idx == 0 else 1)
    writer.flush()
    rounds = pd.read_parquet(tmp_path / "rounds.parquet")
    assert rounds["round"].tolist() == [0, 1, 2]
    assert rounds["sim_time_s"].tolist() == [0.5, 1.5, 2.5]
    assert list(rounds.columns) == ROUNDS_SCHEMA.names
    assert pd.read_parquet(tmp_path / "clients.parquet")["client_id"].tolist() == [0, 1, 2]
    assert list((tmp_path / "evals.parquet").iterdir()) == []  # nothing appended, nothing written


def _strict(text: str):
    """json.loads refusing NaN and Infinity, as strict parsers (JavaScript, jq, Go) do."""
    def refuse(name: str):
        raise ValueError(f"not JSON: {name}")
    return json.loads(text, parse_constant=refuse)


def test_write_json_and_atomic_write(tmp_path):
    path = tmp_path / "summary.json"
    with pytest.raises(ValueError):  # a bare NaN is never written
        write_json(path, {"b": [0.5, math.nan]})
    assert not path.exists()
    write_json(path, json_value({"a": 1, "b": [0.5, math.nan, math.inf, -math.inf], "c": {"d": np.float64("nan")}}))
    assert _strict(path.read_text()) == {"a": 1, "b": [0.5, None, "inf", "-inf"], "c": {"d": None}}
    atomic_write_bytes(path, b"replaced")
    assert path.read_bytes() == b"replaced"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temp file left behind


def test_a_flush_killed_before_the_rename_leaves_a_readable_table(tmp_path, monkeypatch):
    d = tmp_path / "evals.parquet"
    table = PartitionedTable(d, EVALS_SCHEMA)
    table.append(eval_row(0))
    table.flush()
    table.append(eval_row(1))

    def killed(src, dst):
        raise KeyboardInterrupt("killed between write and rename")

    monkeypatch.setattr("simulator.rundir.files.os.replace", killed)
    with pytest.raises(KeyboardInterrupt):
        table.flush()
    monkeypatch.undo()
    leftovers = sorted(p.name for p in d.iterdir())
    assert leftovers == [".part-00001.parquet.tmp", "part-00000.parquet"]  # the partial part is hidden
    assert pd.read_parquet(d)["client_id"].tolist() == [100]


def test_not_measured_is_null_in_parquet_and_in_summary_json(tmp_path):
    """Rounds without evaluation, accuracy of a regression task, privacy off and clients never trained: null in
    the files (Arrow's null count, DuckDB's IS NULL), NaN in pandas; summary.json is strict JSON."""
    out = tmp_path / "run"
    argv = [a for o in small_overrides(**{"system.backend": "inline", "devices.dropout": 0.3})
            for a in ("--set", o)]
    assert main(["run", "--out", str(out), "--no-progress", "--no-plots", *argv]) == 0
    rounds = pq.read_table(out / "rounds.parquet").sort_by("round")
    evaluated = sorted(set(pq.read_table(out / "evals.parquet").column("round").to_pylist()))
    assert evaluated == [0, 2, 3]  # eval.every = 2, and the last round
    for name in ("eval_loss_pre", "eval_loss_post", "eval_loss_post_p90"):
        column = rounds.column(name)
        assert [i for i, v in enumerate(column.to_pylist()) if v is not None] == evaluated
        assert pc.is_nan(column.drop_null()).to_pylist() == [False] * 3  # real numbers where measured
    for name in ("eval_metric_pre", "eval_metric_post", "dp_epsilon", "dp_clip"):  # regression; privacy off
        assert rounds.column(name).null_count == 4
    clients = pq.read_table(out / "clients.parquet")
    untrained = pc.equal(clients.column("actor_id"), -1)
    assert pc.any(untrained).as_py()  # drop-outs are never trained
    for name in ("loss_after", "compute_time_s", "weight"):
        assert clients.column(name).filter(untrained).null_count == pc.sum(untrained).as_py()
    frame = pd.read_parquet(out / "rounds.parquet")  # pandas: the nulls are NaN, as before
    assert frame["eval_loss_post"].dtype == np.float64 and frame["eval_loss_post"].isna().sum() == 1
    summary = _strict((out / "summary.json").read_text())
    assert summary["final_eval"]["eval_metric_post"] is None and summary["dp_epsilon"] is None
    assert isinstance(summary["final_eval"]["eval_loss_post"], float)
