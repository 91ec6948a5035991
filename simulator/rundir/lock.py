"""One writer per run directory: an exclusive lock on ``RUN_DIR/.lock``, held for the whole run.

``exclusive`` takes an ``fcntl.flock`` lock before anything is written (``rounds.run.run`` holds it from
the first write of ``config.toml`` to the last of ``summary.json``), so a second ``metafleet run --out``
of the same directory, a ``--resume`` of a run that is still going, or any other writer is refused
before it touches the directory, with the process that holds it named. The kernel releases the lock when
its process ends, however it ends, so a SIGKILLed run leaves no stale lock. Readers (``plot``,
``report``, ``compare``, ``analysis.load_run``) never take it and keep working on a live run. On file
systems without ``flock`` (some network file systems) the lock cannot be taken and the run is refused
with that cause named.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from simulator.config.schema import ConfigError

#: the lock file, hidden from the run directory's listing
LOCK_FILE = ".lock"


def _holder(fd: int) -> str:
    """Who holds the lock, as its holder wrote it: "process PID on HOST"."""
    with contextlib.suppress(OSError, ValueError):
        pid, host = os.pread(fd, 256, 0).decode().split()[:2]
        return f"process {int(pid)} on {host}"
    return "another process"


def holder(run_dir: Path) -> str | None:
    """Who writes ``run_dir`` now ("process PID on HOST"), or None: a probe that creates and changes nothing."""
    try:
        fd = os.open(run_dir / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return None  # no lock file: nobody has ever written this directory as a run
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except OSError:
        return _holder(fd)
    finally:
        os.close(fd)


def is_unused(directory: Path) -> bool:
    """An empty directory, or one holding only a lock file (a run killed before its first write)."""
    return all(p.name == LOCK_FILE for p in directory.iterdir())


@contextlib.contextmanager
def exclusive(run_dir: Path) -> Iterator[None]:
    """Hold the run directory's lock (creating the directory if needed) for the body of the ``with``;
    a directory another process writes is a ``ConfigError`` naming it and that process."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ConfigError(f"run directory {str(run_dir)!r} cannot be written ({exc.strerror or exc}); "
                          "choose a writable --out") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"run directory {str(run_dir)!r} is being written by {_holder(fd)} (it holds "
                              f"{LOCK_FILE}); wait for that run to end, or write to another --out") from None
        except OSError as exc:
            raise ConfigError(f"run directory {str(run_dir)!r}: its file system cannot lock {LOCK_FILE} "
                              f"({exc.strerror or exc}); write runs to a local disk") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race a waiting writer)
