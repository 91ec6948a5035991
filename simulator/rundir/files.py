"""Files of a run directory written whole: atomically (temporary name, fsync, rename), so that a reader or a
killed run never sees half a file; ``summary.json`` and the label histogram of a partitioned dataset."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, allow_nan=True) + "\n").encode())


def write_label_histogram(run_dir: Path, hist: np.ndarray) -> None:
    """``label_histogram.parquet``: client_id, label, count (non-zero counts) of a partitioned dataset."""
    client, label = np.nonzero(hist)
    table = pa.table({"client_id": client.astype(np.int64), "label": label.astype(np.int64),
                      "count": hist[client, label].astype(np.int64)})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    atomic_write_bytes(run_dir / "label_histogram.parquet", sink.getvalue().to_pybytes())
