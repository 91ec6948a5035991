"""``metafleet sweep`` on a real Ray (the session's, 2 CPUs): every trial completes into its own run
directory, a trial equals the same config run alone, a killed trial leaves the others complete and
``--resume`` completes it with the metrics of an uninterrupted run; bad input is one line, exit 2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from actors import api, sweep
from actors.cli import main
from simulator.rundir import lock
from simulator.rundir.metrics import WALL_CLOCK_COLUMNS
from simulator.study import expand

BASE = {"rounds": 4, "checkpoint_every": 2, "data": {"num_clients": 24, "eval_clients": 4},
        "clients": {"per_round": 6}, "eval": {"every": 2, "clients": 4, "adapt_steps": 2},
        "algorithm": {"local_steps": 2}, "system": {"backend": "inline"}}


def frames(run_dir: Path) -> dict[str, pd.DataFrame]:
    return {t: pd.read_parquet(run_dir / f"{t}.parquet").drop(columns=list(w)) for t, w in WALL_CLOCK_COLUMNS.items()}


def assert_same_metrics(a: Path, b: Path) -> None:
    for table, frame in frames(a).items():
        pd.testing.assert_frame_equal(frame, frames(b)[table], check_exact=True, obj=table)


def test_every_trial_completes_and_equals_the_same_run_alone(ray_session, tmp_path):
    study = expand(BASE, {"grid": {"algorithm.name": ["reptile", "fomaml"]}, "seeds": [0, 1]})
    result = sweep.run_sweep(study, tmp_path / "sw", progress=False)
    assert result.counts == {"completed": 4}
    index = json.loads((tmp_path / "sw" / "index.json").read_text())["trials"]
    assert [(t["keys"], t["seed"], t["status"]) for t in index] == [
        ({"algorithm.name": a}, s, "completed") for a in ("reptile", "fomaml") for s in (0, 1)]
    assert all(t["node"] for t in index)  # the Ray node each trial ran on
    for t in index:
        summary = json.loads((tmp_path / "sw" / t["dir"] / "summary.json").read_text())
        assert summary["rounds_completed"] == 4 and summary["algorithm"] == t["keys"]["algorithm.name"]
    alone = api.run(study.trials[3].config, tmp_path / "alone", plots=False)
    assert alone.status == "completed"
    assert_same_metrics(tmp_path / "sw" / index[3]["dir"], alone.run_dir)
    again = sweep.run_sweep(sweep.open_sweep(tmp_path / "sw"), resume=tmp_path / "sw", progress=False)
    assert again.counts == {"completed": 4}  # nothing left to run: nothing re-run
    assert_same_metrics(tmp_path / "sw" / index[3]["dir"], alone.run_dir)


def _kill_when_checkpointed(trial_dir: Path, killed: list[int], timeout_s: float = 120.0) -> None:
    """SIGKILL the trial's driver (the lock holder) once it has written a checkpoint."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        who = lock.holder(trial_dir) if trial_dir.is_dir() else None
        if who and (trial_dir / "checkpoint.pt").is_file():
            pid = int(who.split()[1])
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            return
        time.sleep(0.05)


def test_a_killed_trial_leaves_the_others_complete_and_resumes_identical(ray_session, tmp_path):
    # 600 rounds of about 6 ms: the watcher kills at the first checkpoint (round 10), seconds before the end
    base = {**BASE, "rounds": 600, "checkpoint_every": 10, "eval": {"every": 300, "clients": 4, "adapt_steps": 2}}
    study = expand(base, {"seeds": [0, 1]})
    out = tmp_path / "sw"
    killed: list[int] = []
    watcher = threading.Thread(target=_kill_when_checkpointed, args=(out / "trials" / study.trials[0].name, killed))
    watcher.start()
    first = sweep.run_sweep(study, out, progress=False)
    watcher.join()
    assert killed, "the trial finished before it could be killed"
    statuses = {t["name"]: t["status"] for t in first.trials}
    assert statuses == {study.trials[0].name: "killed", study.trials[1].name: "completed"}
    resumed = sweep.run_sweep(sweep.open_sweep(out), resume=out, progress=False)
    assert resumed.counts == {"completed": 2}
    alone = api.run(study.trials[0].config, tmp_path / "alone", plots=False)
    assert_same_metrics(out / "trials" / study.trials[0].name, alone.run_dir)


def test_a_bad_grid_key_is_one_line_and_writes_nothing(tmp_path, capsys):
    study = tmp_path / "study.toml"
    study.write_text('[sweep]\ngrid = {"algorithm.nmae" = ["maml"]}\n')
    code = main(["sweep", str(study), "--out", str(tmp_path / "never")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "unknown key 'algorithm.nmae'" in err
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("argv, needle", [
    (["sweep"], "needs a STUDY.toml"),
    (["sweep", "--resume", "{tmp}"], "is not a sweep directory"),
    (["sweep", "{tmp}/missing.toml"], "missing.toml"),
])
def test_bad_sweep_arguments(tmp_path, capsys, argv, needle):
    code = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and err.count("\n") == 1


def test_a_sweep_spreads_over_the_nodes_of_a_cluster(tmp_path):
    """A head and a worker node of 1 CPU each: 1-CPU trials run on both, all complete."""
    script = Path(__file__).with_name("sweep_cluster.py")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "sw")], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [status for status, _ in out["trials"]] == ["completed"] * 4
    assert {node for _, node in out["trials"]} == set(out["nodes"]) and out["worker"] in out["nodes"]
