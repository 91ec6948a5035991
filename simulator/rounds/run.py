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

from simulator.config.schema import ExperimentConfig
from simulator.contract import Backend, WorkerFailure
from simulator.rounds.asynchronous import Stalled, async_rounds
from simulator.rounds.context import Prepared, RoundCallback, RunContext
from simulator.rounds.sync import sync_rounds
from simulator.rundir.files import write_json, write_label_histogram
from simulator.rundir.summary import build_summary

log = logging.getLogger("metafleet.driver")


def run(cfg: ExperimentConfig, backend: Backend, run_dir: Path, prepared: Prepared | None = None,
        on_round: RoundCallback | None = None, resume: bool = False) -> dict[str, Any]:
    """Run ``cfg.rounds`` rounds (in async mode: server updates); write metrics, the label
    histogram of a partitioned dataset, checkpoints and ``summary.json`` into ``run_dir``.

    ``resume``: continue the run in ``run_dir`` from its checkpoint (``simulator.rundir.checkpoint``); the
    finished run is identical to one never interrupted. Ctrl-C (KeyboardInterrupt) and workers
    failing beyond ``system.max_failures`` stop after the last completed round: its metrics are
    flushed, a checkpoint is written, and the summary's status is "interrupted" or "failed".
    """
    ctx = RunContext(cfg, backend, run_dir, prepared, on_round, resume)
    hist = ctx.dataset.label_histogram()
    if hist is not None:
        write_label_histogram(run_dir, hist)
    status, error = "completed", None
    try:
        if cfg.system.mode == "async":
            try:
                async_rounds(ctx)
            except Stalled as exc:
                log.warning("run stopped early: %s", exc)
                status = "stalled"
        else:
            sync_rounds(ctx)
    except KeyboardInterrupt:
        status = "interrupted"
    except WorkerFailure as exc:
        status, error = "failed", str(exc)
        log.error("run stopped: %s", exc)
    finally:
        ctx.writer.rollback()  # rows of a round that did not complete
        ctx.save_checkpoint()
    summary = build_summary(cfg, ctx.history, status, time.perf_counter() - ctx.start, backend.describe(), error)
    write_json(run_dir / "summary.json", summary)
    return summary
