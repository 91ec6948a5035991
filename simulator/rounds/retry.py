"""Re-running client work that raised: the one retry rule of both modes.

Every client update and evaluation is a pure function of (model version, client id, seed), so work whose
client code raised (an error inside the worker or its Ray task: out of memory, a flaky data read) can
simply run again. ``with_retries`` tries it up to ``system.max_failures`` more times, logging each
failure; after that the run stops with ``WorkerFailure``, its last completed round checkpointed, so that
it can be resumed once the cause is fixed. Work lost with its worker (a dead actor) is the backend's to
recover (``actors.pool``), and a ``WorkerFailure`` it raises is never retried here.
"""

from __future__ import annotations

import logging
import re
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from simulator.contract import WorkerFailure

log = logging.getLogger("metafleet.driver")

T = TypeVar("T")


#: terminal colour codes, which Ray puts in its remote error messages
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def first_line(exc: BaseException) -> str:
    """``ErrorType: first line of its message``, without colour codes. For an error a Ray task re-raised,
    the client code's own exception (Ray's ``cause``), not the remote traceback around it."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException) and cause is not exc:
        exc = cause
    text = ANSI.sub("", str(exc)).strip()
    return f"{type(exc).__name__}: {(text.splitlines() or [''])[0][:300]}"


def with_retries(attempt: Callable[[], T], what: str, limit: int, resubmit: Callable[[], None] | None = None,
                 log_file: Path | None = None) -> T:
    """``attempt()``, re-run after a failure (``resubmit()`` first, when the work must be dispatched again) up
    to ``limit`` more times; ``what`` names the work in the log and in the ``WorkerFailure`` that ends it.
    Each failure's whole text (Ray's remote traceback included) is appended to ``log_file`` when given."""
    error = ""
    for i in range(limit + 1):
        try:
            return attempt()
        except WorkerFailure:
            raise
        except Exception as exc:  # an error inside the client's work (worker or Ray task)
            error = first_line(exc)
            log.warning("%s failed (attempt %d of %d): %s", what, i + 1, limit + 1, error)
            if log_file is not None:
                append_error(log_file, f"{what} failed (attempt {i + 1} of {limit + 1})", exc)
            if resubmit is not None and i < limit:
                resubmit()
    raise WorkerFailure(f"{what} failed {limit + 1} times, last with {error}; fix the cause (data, model, memory), "
                        "raise system.max_failures, then continue with `metafleet run --resume RUN_DIR`"
                        + (f" (details: {log_file})" if log_file is not None else ""))


def append_error(log_file: Path, what: str, exc: BaseException) -> None:
    """Append an error's whole text, tracebacks and all, without colour codes (a log: best effort)."""
    text = ANSI.sub("", "".join(traceback.format_exception(exc)))
    try:
        with open(log_file, "a", encoding="utf-8") as fh:
            fh.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {what}\n{text}\n")
    except OSError as err:
        log.warning("could not append to %s (%s)", log_file, err.strerror or err)
