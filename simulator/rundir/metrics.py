"""Per-round, per-client and per-evaluation metrics, appended to Parquet as the run goes.

Each table (``rounds.parquet``, ``clients.parquet``, ``evals.parquet``) is a Parquet *dataset*:
a directory of part files, each written whole to a hidden temporary name and renamed into
place. A run that is killed therefore leaves only complete, readable parts, and
``pandas.read_parquet("RUN/rounds.parquet")`` reads the table whether the run is finished,
in progress or dead. Parts are flushed every ``metrics.flush_every`` rounds.

A value that was not measured (the evaluation columns of a round without evaluation, accuracy on a
regression task, the staleness of a round that aggregated nothing, privacy columns with privacy off, the
training columns of a client that never trained) is NaN in the driver's rows and null in the files, so
``IS NOT NULL`` (DuckDB) and ``null_count`` (polars, Arrow) see it as missing; pandas reads it as NaN.
Every column that holds seconds ends in ``_s``; ``RENAMED`` maps the names of older run directories
(before the convention) to today's, for readers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from simulator.client.evaluation import STATS
from simulator.rundir.files import atomic_write_bytes
from simulator.scheduling.policies import DROP_REASONS

_F, _I, _B, _S = pa.float64(), pa.int64(), pa.bool_(), pa.string()
_NUMPY = {_F: np.float64, _I: np.int64, _B: np.bool_}  # build columns from numpy: pyarrow then needs no pandas

_EVAL_COLUMNS = [f"eval_{what}_{when}{'' if s == 'mean' else '_' + s}"
                 for what in ("loss", "metric") for when in ("pre", "post") for s in STATS]

ROUNDS_SCHEMA = pa.schema(
    [("round", _I), ("model_version", _I), ("sim_time_s", _F), ("round_sim_duration_s", _F), ("wall_time_s", _F),
     ("num_sampled", _I), ("num_completed", _I), ("num_dropped", _I)]
    + [(f"dropped_{r}", _I) for r in DROP_REASONS]
    + [("staleness_mean", _F), ("staleness_max", _F), ("bytes_up", _I), ("bytes_down", _I),
       ("train_loss", _F), ("train_loss_before", _F), ("update_norm", _F)]
    + [(c, _F) for c in _EVAL_COLUMNS]
    + [("dp_epsilon", _F), ("dp_clip", _F)]  # simulator.privacy: null with privacy off
)

CLIENTS_SCHEMA = pa.schema(
    [("round", _I), ("client_id", _I), ("actor_id", _I), ("num_samples", _I), ("samples_processed", _I),
     ("weight", _F), ("loss_before", _F), ("loss_after", _F), ("update_norm", _F), ("compute_time_s", _F),
     ("sim_start_s", _F), ("sim_duration_s", _F), ("sim_finish_s", _F), ("start_version", _I), ("staleness", _I),
     ("staleness_weight", _F), ("dropped", _B), ("drop_reason", _S), ("compute_speed", _F), ("up_bw", _F),
     ("down_bw", _F)]
)

EVALS_SCHEMA = pa.schema(
    [("round", _I), ("client_id", _I), ("actor_id", _I), ("loss_pre", _F), ("loss_post", _F),
     ("metric_pre", _F), ("metric_post", _F)]
)

#: old column name -> today's, per table: run directories written before every seconds column ended in ``_s``
RENAMED = {"rounds": {"sim_time": "sim_time_s", "round_sim_duration": "round_sim_duration_s",
                      "wall_time": "wall_time_s"},
           "clients": {"sim_start": "sim_start_s", "sim_finish": "sim_finish_s"},
           "evals": {}}

TABLES = {"rounds": ROUNDS_SCHEMA, "clients": CLIENTS_SCHEMA, "evals": EVALS_SCHEMA}
#: columns that measure real time: they differ between otherwise identical runs
WALL_CLOCK_COLUMNS = {"rounds": ("wall_time_s",), "clients": ("compute_time_s", "actor_id"), "evals": ("actor_id",)}


def upgrade(table: pa.Table, name: str) -> pa.Table:
    """A part file's table with the old column names of ``RENAMED`` replaced by today's (as it is otherwise)."""
    old = RENAMED[name]
    if not old.keys() & set(table.column_names):
        return table
    return table.rename_columns([old.get(c, c) for c in table.column_names])


def conform(table: pa.Table, name: str) -> pa.Table:
    """A part file's table in today's schema of table ``name``: old names upgraded, columns cast, and a column
    the file lacks (written before it existed) all null."""
    table = upgrade(table, name)
    schema = TABLES[name]
    columns = [table[f.name].cast(f.type) if f.name in table.column_names else pa.nulls(len(table), f.type)
               for f in schema]
    return pa.table(columns, schema=schema)


class PartitionedTable:
    """Buffered rows of one table; ``flush`` writes them as the next part file.

    Each column is buffered as a list of chunks: a copy of each array ``extend`` is given (a round's clients, in
    one piece: no Python object per value), and lists of the values ``append`` adds a row at a time."""

    def __init__(self, directory: Path, schema: pa.Schema) -> None:
        self.directory, self.schema = directory, schema
        self.directory.mkdir(parents=True, exist_ok=True)
        self._chunks: dict[str, list[Any]] = {name: [] for name in schema.names}
        self._rows = 0
        self._parts = len(list(directory.glob("part-*.parquet")))

    def append(self, row: dict[str, Any]) -> None:
        missing = self.schema.names - row.keys()
        extra = row.keys() - set(self.schema.names)
        if missing or extra:
            raise KeyError(f"{self.directory.name}: missing {sorted(missing)}, unexpected {sorted(extra)}")
        for name in self.schema.names:
            chunks = self._chunks[name]
            if not chunks or not isinstance(chunks[-1], list):
                chunks.append([])
            chunks[-1].append(row[name])
        self._rows += 1

    def extend(self, columns: dict[str, Any]) -> None:
        """Append many rows given as equal-length columns (lists or numpy arrays)."""
        sizes = {len(columns[name]) for name in self.schema.names}
        if len(sizes) != 1:
            raise ValueError(f"{self.directory.name}: columns of different lengths {sorted(sizes)}")
        for name in self.schema.names:
            values = columns[name]
            self._chunks[name].append(values.copy() if isinstance(values, np.ndarray) else list(values))
        self._rows += sizes.pop()

    def flush(self) -> None:
        if not self._rows:
            return
        table = pa.table({n: self._array(n) for n in self.schema.names}, schema=self.schema)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        atomic_write_bytes(self.directory / f"part-{self._parts:05d}.parquet", sink.getvalue().to_pybytes())
        self._parts += 1
        self._chunks = {name: [] for name in self.schema.names}
        self._rows = 0

    @property
    def buffered(self) -> int:
        """Rows appended since the last flush."""
        return self._rows

    def truncate(self, rows: int) -> None:
        """Keep only the first ``rows`` buffered rows."""
        if rows >= self._rows:
            return
        for name, chunks in self._chunks.items():
            kept, left = [], rows
            for chunk in chunks:
                if left <= 0:
                    break
                kept.append(chunk[:left])
                left -= len(chunk)
            self._chunks[name] = kept
        self._rows = rows

    def _array(self, name: str) -> pa.Array:
        kind = self.schema.field(name).type
        chunks = self._chunks[name]
        if kind == _S:
            return pa.array([str(v) for chunk in chunks for v in chunk], type=_S)
        dtype = _NUMPY[kind]
        values = np.concatenate([np.asarray(chunk, dtype=dtype) for chunk in chunks])
        if kind == _F:  # NaN is "not measured" in the driver's rows: null in the file (DuckDB, polars, Spark)
            return pa.array(values, mask=np.isnan(values))
        return pa.array(values)


class MetricsWriter:
    """The three tables of a run, committed a round at a time and flushed every ``flush_every`` rounds.

    ``committed`` is (the last committed round, the buffered rows of each table that belong to committed
    rounds), replaced in one assignment: a round is committed whole or not at all, wherever a
    KeyboardInterrupt (Ctrl-C, SIGTERM) lands, so the rows on disk after a stop are exactly those of the
    rounds the summary counts. ``last_round``: the last round already on disk (a resumed run)."""

    def __init__(self, run_dir: Path, flush_every: int, last_round: int = -1) -> None:
        self.flush_every = flush_every
        self.tables = {name: PartitionedTable(run_dir / f"{name}.parquet", schema) for name, schema in TABLES.items()}
        self.committed: tuple[int, dict[str, int]] = (last_round, dict.fromkeys(self.tables, 0))

    @property
    def committed_round(self) -> int:
        return self.committed[0]

    def end_round(self, round_idx: int) -> None:
        """The round's rows are complete: commit them, and flush every ``flush_every`` rounds."""
        self.committed = (round_idx, {name: table.buffered for name, table in self.tables.items()})
        if (round_idx + 1) % self.flush_every == 0:
            self.flush()

    def rollback(self) -> None:
        """Forget the rows of a round that did not complete (Ctrl-C or a worker failure mid-round)."""
        for name, table in self.tables.items():
            table.truncate(self.committed[1][name])

    def flush(self) -> None:
        """Write the committed rows (the caller never flushes a round's rows before ``end_round``)."""
        self.rollback()
        for table in self.tables.values():
            table.flush()
        self.committed = (self.committed[0], dict.fromkeys(self.tables, 0))
