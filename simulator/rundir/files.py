"""Files of a run directory written whole: atomically (temporary name, fsync, rename), so that a reader or a
killed run never sees half a file; ``summary.json`` and the label histogram of a partitioned dataset.

A write that fails (a full disk, a file system turned read-only, a permission taken away) removes its
temporary file and raises ``RunDirWriteError``: the run then stops after its last complete round with a
``failed`` summary, and ``metafleet run --resume`` continues it exactly once the cause is fixed.

Also here: ``label_histogram.parquet`` and, for datasets read from the user's files, ``client_ids.parquet``
(metafleet's client id -> the user's own key of that client)."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from simulator.config.schema import ConfigError


class RunDirWriteError(RuntimeError):
    """A file of the run directory could not be written (its ``errno`` is the cause's: ENOSPC for a full disk)."""

    def __init__(self, path: Path, exc: OSError) -> None:
        super().__init__(f"could not write {path} ({exc.strerror or exc})")
        self.errno = exc.errno


def check_creatable(path: Path, key: str) -> None:
    """That the run directory ``path`` can be created and written here, before anything is: not at a
    dangling link, not under a regular file, and its nearest existing parent takes a new directory (a probe
    directory is made and removed: read-only and virtual file systems refuse it). A ``ConfigError`` naming
    ``key`` otherwise."""
    if path.is_symlink() and not path.exists():
        raise ConfigError(f"{key} {str(path)!r} is a link to nothing ({os.readlink(path)!r}); choose another "
                          "directory or remove the link")
    parent = path if path.exists() else path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{key} {str(path)!r} is under {str(parent)!r}, which is a file, not a directory; "
                          "choose another directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".metafleet-probe-", dir=parent))
    except OSError as exc:
        raise ConfigError(f"{key} {str(path)!r} cannot be written: {str(parent)!r} refuses new files "
                          f"({exc.strerror or exc}); choose a writable directory") from None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` whole: a temporary file, fsync, then rename over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):  # a half-written temporary file must not hold the space
            tmp.unlink()
        raise RunDirWriteError(path, exc) from exc


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as strict JSON: NaN or infinity in it is a ValueError (``summary.json_value`` writes them as
    null and "inf"), never a bare ``NaN`` that strict parsers refuse."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n").encode())


#: metafleet's client ids -> the user's own keys (a table's ``client_column`` values, LEAF's user names)
CLIENT_IDS = "client_ids.parquet"


def write_client_ids(run_dir: Path, column: str, values: np.ndarray) -> None:
    """``client_ids.parquet``: ``client_id`` (0 .. n-1: training clients, then the held-out ones) and ``column``,
    the value that names client ``client_id`` in the user's data."""
    ids = np.arange(len(values), dtype=np.int64)
    keys = pa.array(values) if values.dtype.kind in "biuf" else pa.array([str(v) for v in values], pa.string())
    table = pa.table({"client_id": ids, column: keys}) if column != "client_id" else \
        pa.table({"client_id": ids, "client_id_in_data": keys})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    atomic_write_bytes(run_dir / CLIENT_IDS, sink.getvalue().to_pybytes())


def write_label_histogram(run_dir: Path, hist: np.ndarray) -> None:
    """``label_histogram.parquet``: client_id, label, count (non-zero counts) of a partitioned dataset."""
    client, label = np.nonzero(hist)
    table = pa.table({"client_id": client.astype(np.int64), "label": label.astype(np.int64),
                      "count": hist[client, label].astype(np.int64)})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    atomic_write_bytes(run_dir / "label_histogram.parquet", sink.getvalue().to_pybytes())
