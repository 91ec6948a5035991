"""Run an experiment with its trackers in this process and SIGKILL it right after the trackers logged round R.

``python tracked_kill.py RUN_DIR R [key=value ...]`` (for the tracking resume test): the trackers are never
closed and no summary is written, as when a machine dies.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from actors.backends import make_backend
from actors.tracking import open_trackers
from simulator.experiment import load_config
from simulator.rounds.run import run


def main() -> None:
    run_dir, kill_round, *overrides = sys.argv[1:]
    cfg = load_config(None, overrides)
    trackers = open_trackers(cfg, Path(run_dir))

    def on_round(row: dict) -> None:
        trackers.on_round(row)
        if row["round"] == int(kill_round):
            os.kill(os.getpid(), signal.SIGKILL)

    with make_backend(cfg) as backend:
        run(cfg, backend, Path(run_dir), on_round=on_round)


if __name__ == "__main__":
    main()
