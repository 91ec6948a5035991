"""Running an experiment into a run directory: the one entry point of the core (``run``).

It builds the run's context, runs the rounds of the configured mode (``rounds.sync`` or
``rounds.asynchronous``), and however the rounds end (completed, Ctrl-C, workers failing, no client able
to come online) keeps every completed round, writes a checkpoint and ``summary.json``. The backend is
passed in (``actors.backends.make_backend``); this package never imports Ray.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from simulator.client.worker import fixed_threads, frozen_heap, return_large_frees
from simulator.config.schema import ExperimentConfig
from simulator.config.toml import dumps_toml, to_dict
from simulator.contract import Backend, WorkerFailure
from simulator.privacy.mechanism import BudgetExhausted
from simulator.rounds.asynchronous import Stalled, async_rounds
from simulator.rounds.context import Prepared, RoundCallback, RunContext
from simulator.rounds.sync import sync_rounds
from simulator.rundir.files import (
    RunDirWriteError,
    atomic_write_bytes,
    write_client_ids,
    write_json,
    write_label_histogram,
)
from simulator.rundir.lock import exclusive
from simulator.rundir.summary import build_summary

log = logging.getLogger("metafleet.driver")

#: what to do after a write error, in the summary's one-line error
WRITE_FIX = ("free disk space (or fix the directory's permissions), then continue with "
             "`metafleet run --resume {run_dir}`")


def run(cfg: ExperimentConfig, backend: Backend, run_dir: Path, prepared: Prepared | None = None,
        on_round: RoundCallback | None = None, resume: bool = False) -> dict[str, Any]:
    """Run ``cfg.rounds`` rounds (in async mode: server updates) into ``run_dir``: its ``config.toml``,
    metrics, the label histogram of a partitioned dataset, checkpoints and ``summary.json``.

    The run holds the directory's lock (``rundir.lock``) from its first write to its last: a directory
    another process is writing is refused with a ``ConfigError`` before anything is touched. ``resume``:
    continue the run in ``run_dir`` from its checkpoint (``simulator.rundir.checkpoint``); the finished
    run is identical to one never interrupted. Ctrl-C (KeyboardInterrupt), workers failing beyond
    ``system.max_failures`` and a write that fails (a full disk) stop after the last completed round: its
    metrics are flushed and a checkpoint written where the disk allows, and the summary's status is
    "interrupted" or "failed" with a one-line ``error``.
    """
    return_large_frees()
    with exclusive(run_dir):
        atomic_write_bytes(run_dir / "config.toml", dumps_toml(to_dict(cfg)).encode())
        ctx = RunContext(cfg, backend, run_dir, prepared, on_round, resume)
        status, error = "completed", None
        try:
            hist = ctx.dataset.label_histogram()
            if hist is not None:
                write_label_histogram(run_dir, hist)
            if (keys := getattr(ctx.dataset, "client_keys", None)) is not None:  # file datasets: the user's ids
                write_client_ids(run_dir, *keys())
            # after its first full collection, what survived it is left out of collections; the driver's torch work runs
            # at the workers' thread count
            with frozen_heap(), fixed_threads(cfg.system.threads):
                if cfg.system.mode == "async":
                    try:
                        async_rounds(ctx)
                    except Stalled as exc:
                        log.warning("run stopped early: %s", exc)
                        status = "stalled"
                else:
                    sync_rounds(ctx)
        except BudgetExhausted as exc:
            log.warning("run stopped early: %s", exc)
            status = "budget_exhausted"
        except KeyboardInterrupt:
            status = "interrupted"
        except WorkerFailure as exc:
            status, error = "failed", str(exc)
            log.error("run stopped: %s", exc)
        except RunDirWriteError as exc:
            status, error = "failed", f"{exc}; {WRITE_FIX.format(run_dir=run_dir)}"
            log.error("run stopped: %s", error)
        finally:
            ctx.writer.rollback()  # rows of a round that did not complete
            ctx.history = ctx.committed_history()
            try:
                ctx.save_checkpoint()
            except RunDirWriteError as exc:  # the metrics and checkpoint of the last save stay as they were
                log.error("the last rounds' metrics and checkpoint could not be saved: %s", exc)
        summary = build_summary(cfg, ctx.history, status, time.perf_counter() - ctx.start, backend.describe(), error)
        try:
            write_json(run_dir / "summary.json", summary)
        except RunDirWriteError as exc:
            log.error("summary.json could not be written (%s); the run stopped with status %r%s", exc, status,
                      f": {error}" if error else "")
        return summary
