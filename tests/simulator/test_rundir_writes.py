"""One writer per run directory (the lock) and write errors (a full disk): refused writers touch nothing,
and a run whose disk fills stops with a failed summary and resumes to the uninterrupted result."""

from __future__ import annotations

import errno
import logging
import os

import pandas as pd
import pytest
from conftest import run_with_backend, small_overrides

from simulator.config.schema import ConfigError
from simulator.experiment import load_config
from simulator.rundir import lock
from simulator.rundir.metrics import WALL_CLOCK_COLUMNS

OVERRIDES = small_overrides(**{"rounds": 8, "checkpoint_every": 2, "metrics.flush_every": 2,
                               "system.backend": "inline"})


def _cfg():
    return load_config(None, OVERRIDES)


def _tables(run_dir) -> dict[str, pd.DataFrame]:
    return {t: pd.read_parquet(run_dir / f"{t}.parquet").drop(columns=list(w)) for t, w in WALL_CLOCK_COLUMNS.items()}


def _snapshot(run_dir) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    assert run_with_backend(_cfg(), out)["status"] == "completed"
    return out


def test_a_second_writer_is_refused_and_touches_nothing(tmp_path, reference):
    run_dir = tmp_path / "run"
    with lock.exclusive(run_dir):
        assert lock.holder(run_dir) == f"process {os.getpid()} on {os.uname().nodename}"
        before = _snapshot(run_dir)
        with pytest.raises(ConfigError, match=f"is being written by process {os.getpid()}"):
            run_with_backend(_cfg(), run_dir)  # another open file description: flock refuses it
        assert _snapshot(run_dir) == before
    assert lock.holder(run_dir) is None  # released with the holder
    assert run_with_backend(_cfg(), run_dir)["status"] == "completed"


def test_a_run_started_while_another_writes_the_directory_is_refused(tmp_path, reference):
    run_dir, refused = tmp_path / "run", []

    def second_writer(row):  # while the first run holds the directory, after its first round
        if row["round"] == 0:
            before = _snapshot(run_dir)
            with pytest.raises(ConfigError, match="is being written by") as err:
                run_with_backend(_cfg(), run_dir)
            refused.append((str(err.value), _snapshot(run_dir) == before))

    assert run_with_backend(_cfg(), run_dir, on_round=second_writer)["status"] == "completed"
    assert len(refused) == 1 and refused[0][1], refused  # refused, and the directory was left as it was
    for name, table in _tables(reference).items():  # the first run's tables are whole, not mixed
        pd.testing.assert_frame_equal(table, _tables(run_dir)[name], check_exact=True)


def _full_disk(monkeypatch, first: int, last: int | None) -> None:
    """fsync fails with ENOSPC from its ``first``-th call (counting from 1) to its ``last``-th (None: for good)."""
    calls = {"n": 0}
    real = os.fsync

    def fsync(fd):
        calls["n"] += 1
        if calls["n"] >= first and (last is None or calls["n"] <= last):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr("simulator.rundir.files.os.fsync", fsync)


@pytest.mark.parametrize("persistent", [False, True], ids=["disk full once", "disk full for good"])
def test_a_full_disk_stops_with_a_failed_summary_and_resumes_exactly(tmp_path, reference, monkeypatch, caplog,
                                                                     persistent):
    run_dir = tmp_path / "run"
    _full_disk(monkeypatch, 9, None if persistent else 9)  # mid-run: after some rounds' flushes and checkpoints
    with caplog.at_level(logging.ERROR, logger="metafleet.driver"):
        summary = run_with_backend(_cfg(), run_dir)
    assert summary["status"] == "failed" and 0 < summary["rounds_completed"] < 8
    assert "No space left on device" in summary["error"] and "--resume" in summary["error"]
    assert "\n" not in summary["error"]
    assert not list(run_dir.rglob(".*.tmp"))  # no half-written temporary file holds the space
    if persistent:
        assert not (run_dir / "summary.json").exists()
        assert "summary.json could not be written" in caplog.text
    else:
        assert '"status": "failed"' in (run_dir / "summary.json").read_text()
    monkeypatch.undo()  # space freed
    assert run_with_backend(_cfg(), run_dir, resume=True)["status"] == "completed"
    for name, table in _tables(reference).items():
        pd.testing.assert_frame_equal(table, _tables(run_dir)[name], check_exact=True)
