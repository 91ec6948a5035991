"""analysis.load_run on a finished run and on a run killed before its summary; run directories found under
a directory that is not one (a sweep's)."""

from __future__ import annotations

import shutil

import pytest
from conftest import small_overrides
from sweep_runs import PENDING, TRIALS, make_sweep

from actors.cli import main
from analysis import load_run, load_runs
from analysis.load import find_runs


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


def test_directories_that_are_not_runs_stand_for_the_runs_under_them(tmp_path, capsys):
    sweep = make_sweep(tmp_path)
    capsys.readouterr()
    nested = tmp_path / "more" / "deeper" / "r"
    shutil.copytree(sweep / "trials" / "t0000-reptile-s0", nested)
    (nested / "figures").mkdir()  # a run directory is not searched further
    shutil.copytree(sweep / "trials" / "t0001-reptile-s1", nested / "figures" / "inner")
    shutil.copytree(sweep / "trials" / "t0002-reptile-s2", tmp_path / "more" / ".hidden" / "r")
    runs, pending = find_runs(tmp_path)
    assert runs == sorted([*(sweep / "trials" / name for name, _ in TRIALS), nested])
    assert pending == [sweep / "trials" / PENDING]
    with pytest.warns(UserWarning, match=f"{PENDING}: skipped, no rounds written yet"):
        rs = load_runs([sweep, sweep / "trials" / "t0004-maml-s0", str(tmp_path / "mor*")])
    assert [r.path.name for r in rs.runs] == [name for name, _ in TRIALS] + ["r"]  # each run once
    assert sorted(set(rs.summary["setting"])) == [1, 2] and rs.grouping is not None
    assert rs.rounds.groupby("setting")["run"].nunique().tolist() == [5, 2]
    # a directory with no runs with rounds is refused, on the command line with exit code 2
    empty = tmp_path / "empty"
    shutil.copytree(sweep / "trials" / PENDING, empty / "only-pending")
    with pytest.raises(FileNotFoundError, match="holds none with rounds"), pytest.warns(UserWarning):
        load_runs(empty)
    assert main(["compare", str(empty)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("metafleet: warning:") and err[-1].startswith("metafleet: error:")
    assert "is not a metafleet run directory and holds none with rounds (1 without rounds yet)" in err[-1]


def _tree(path):
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_runs_written_with_the_old_column_names_load_under_the_new_ones_and_refuse_to_resume(tmp_path, capsys):
    import pyarrow.parquet as pq

    from simulator.rundir.metrics import RENAMED

    out = tmp_path / "run"
    argv = [a for o in small_overrides(**{"system.backend": "inline"}) for a in ("--set", o)]
    assert main(["run", "--out", str(out), "--no-progress", "--no-plots", *argv]) == 0
    new = load_run(out)
    old = tmp_path / "old"
    shutil.copytree(out, old)
    back = {name: {v: k for k, v in names.items()} for name, names in RENAMED.items()}
    for name in ("rounds", "clients"):  # as metafleet wrote them before every seconds column ended in _s
        for part in (old / f"{name}.parquet").glob("part-*.parquet"):
            table = pq.read_table(part)
            pq.write_table(table.rename_columns([back[name].get(c, c) for c in table.column_names]), part)
        assert "sim_time" in pq.read_schema(next((old / "rounds.parquet").glob("part-*"))).names
    loaded = load_run(old)
    for name in ("rounds", "clients", "evals"):
        assert list(getattr(loaded, name).columns) == list(getattr(new, name).columns)
        assert getattr(loaded, name).equals(getattr(new, name))
    assert "sim_time_s" in load_runs([old]).rounds.columns
    before = _tree(old)
    capsys.readouterr()
    assert main(["run", "--resume", str(old), "--set", "rounds=6"]) == 2
    err = capsys.readouterr().err.strip()
    assert "written by an older metafleet (column 'round_sim_duration', now 'round_sim_duration_s')" in err
    assert "not resumed" in err and "\n" not in err
    assert _tree(old) == before  # a refused resume touches nothing
