"""Run an experiment in this process and SIGKILL it at a chosen point (for the resume tests).

``python killed_run.py RUN_DIR KILL_POINT [key=value ...]``; KILL_POINT is one of
``round:R`` (right after round R's row is recorded), ``call:N`` (when the N-th backend call starts,
mid-round), ``flush:N`` (after the N-th metrics part file is written, mid-flush) or ``save:N`` (just
before the N-th checkpoint is written, after its flush).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from actors.inline import InlineBackend
from simulator.contract import WorkerSpec
from simulator.experiment import load_config
from simulator.rounds.run import run
from simulator.rundir import checkpoint, metrics


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    run_dir, point, *overrides = sys.argv[1:]
    kind, n = point.split(":")
    n = int(n)
    cfg = load_config(None, overrides)
    calls = {"call": 0, "flush": 0, "save": 0}

    class Backend(InlineBackend):  # every backend call counts: train, evaluate and the async mode's submit
        def dispatch(self, *args):
            calls["call"] += 1
            if kind == "call" and calls["call"] == n:
                die()
            return super().dispatch(*args)

    if kind == "flush":
        write = metrics.atomic_write_bytes

        def flushing(path, data):
            write(path, data)
            calls["flush"] += 1
            if calls["flush"] == n:
                die()

        metrics.atomic_write_bytes = flushing
    if kind == "save":
        save = checkpoint.save

        def saving(directory, state):
            calls["save"] += 1
            if calls["save"] == n:
                die()
            save(directory, state)

        checkpoint.save = saving

    def on_round(row):
        if kind == "round" and row["round"] == n:
            die()

    Path(run_dir).mkdir(parents=True, exist_ok=True)
    with Backend(WorkerSpec.from_config(cfg), cfg.system) as backend:
        run(cfg, backend, Path(run_dir), on_round=on_round)


if __name__ == "__main__":
    main()
