"""Loss of the run's own Ray GCS mid-run (SIGKILL of its gcs_server, found by the run's private temp dir):
the run stops within seconds as ``failed`` with a one-line cause, a checkpoint and ``summary.json``, no Ray
process of the run outlives it, and ``--resume`` completes it with the metrics of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
from conftest import small_overrides

from simulator.rundir.metrics import WALL_CLOCK_COLUMNS

ROOT = Path(__file__).resolve().parents[2]


def _processes_under(directory: str) -> dict[int, str]:
    found = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if directory in cmd:
            found[int(proc.name)] = cmd
    return found


def _cli(args: list[str], env: dict[str, str], **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "actors.cli", "run", "--no-progress", "--no-plots", *args],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _frames(run_dir: Path) -> dict[str, pd.DataFrame]:
    return {t: pd.read_parquet(run_dir / f"{t}.parquet").drop(columns=list(w)) for t, w in WALL_CLOCK_COLUMNS.items()}


def test_a_dead_gcs_ends_the_run_with_its_summary_and_it_resumes(tmp_path):
    temp = tempfile.mkdtemp(prefix="mf-gcs-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_USAGE_STATS_ENABLED": "0",
                                                                         "TMPDIR": temp}
    sets = [a for o in small_overrides(rounds=100_000, checkpoint_every=5, **{"system.actors": 1,
                                                                               "eval.every": 1000})
            for a in ("--set", o)]
    run_dir = tmp_path / "run"
    proc = _cli(["--out", str(run_dir), *sets], env)
    deadline = time.monotonic() + 120
    while not (run_dir / "checkpoint.pt").is_file() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    gcs = [pid for pid, cmd in _processes_under(temp).items() if "gcs_server" in cmd]
    assert len(gcs) == 1, proc.stderr.read() if proc.poll() is not None else "no gcs_server found"
    killed = time.monotonic()
    os.kill(gcs[0], signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    took = time.monotonic() - killed
    assert proc.returncode == 1, err[-3000:]
    assert took < 45, f"the run took {took:.0f} s to stop (Ray itself ends a driver after 60 s)"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "GCS" in summary["error"] and "\n" not in summary["error"]
    done = summary["rounds_completed"]
    assert done >= 5 and (run_dir / "checkpoint.pt").is_file()
    time.sleep(2)
    assert not _processes_under(temp), "a Ray process of the run outlived it"
    # continue to a few rounds past the checkpoint, and compare with a run never interrupted
    target = done + 3
    resume = [a for o in [f"rounds={target}"] for a in ("--set", o)]
    out, err = _cli(["--resume", str(run_dir), *resume], env).communicate(timeout=240)
    assert "completed" in out, err[-3000:]
    straight = tmp_path / "straight"
    plain = [a for o in small_overrides(rounds=target, checkpoint_every=5, **{"system.actors": 1, "eval.every": 1000,
                                                                              "system.backend": "inline"})
             for a in ("--set", o)]
    out, err = _cli(["--out", str(straight), *plain], env).communicate(timeout=240)
    assert "completed" in out, err[-3000:]
    for table, frame in _frames(straight).items():
        pd.testing.assert_frame_equal(_frames(run_dir)[table], frame, check_exact=True, obj=table)
