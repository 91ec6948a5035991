"""Per-round, per-client and per-evaluation metrics, appended to Parquet as the run goes.

Each table (``rounds.parquet``, ``clients.parquet``, ``evals.parquet``) is a Parquet *dataset*:
a directory of part files, each written whole to a hidden temporary name and renamed into
place. A run that is killed therefore leaves only complete, readable parts, and
``pandas.read_parquet("RUN/rounds.parquet")`` reads the table whether the run is finished,
in progress or dead. Parts are flushed every ``metrics.flush_every`` rounds.
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
    [("round", _I), ("model_version", _I), ("sim_time", _F), ("round_sim_duration", _F), ("wall_time", _F),
     ("num_sampled", _I), ("num_completed", _I), ("num_dropped", _I)]
    + [(f"dropped_{r}", _I) for r in DROP_REASONS]
    + [("staleness_mean", _F), ("staleness_max", _F), ("bytes_up", _I), ("bytes_down", _I),
       ("train_loss", _F), ("train_loss_before", _F), ("update_norm", _F)]
    + [(c, _F) for c in _EVAL_COLUMNS]
    + [("dp_epsilon", _F), ("dp_clip", _F)]  # simulator.privacy: NaN with privacy off
)

CLIENTS_SCHEMA = pa.schema(
    [("round", _I), ("client_id", _I), ("actor_id", _I), ("num_samples", _I), ("samples_processed", _I),
     ("weight", _F), ("loss_before", _F), ("loss_after", _F), ("update_norm", _F), ("compute_time_s", _F),
     ("sim_start", _F), ("sim_duration_s", _F), ("sim_finish", _F), ("start_version", _I), ("staleness", _I),
     ("staleness_weight", _F), ("dropped", _B), ("drop_reason", _S), ("compute_speed", _F), ("up_bw", _F),
     ("down_bw", _F)]
)

EVALS_SCHEMA = pa.schema(
    [("round", _I), ("client_id", _I), ("actor_id", _I), ("loss_pre", _F), ("loss_post", _F),
     ("metric_pre", _F), ("metric_post", _F)]
)

TABLES = {"rounds": ROUNDS_SCHEMA, "clients": CLIENTS_SCHEMA, "evals": EVALS_SCHEMA}
#: columns that measure real time: they differ between otherwise identical runs
WALL_CLOCK_COLUMNS = {"rounds": ("wall_time",), "clients": ("compute_time_s", "actor_id"), "evals": ("actor_id",)}


class PartitionedTable:
    """Buffered rows of one table; ``flush`` writes them as the next part file."""

    def __init__(self, directory: Path, schema: pa.Schema) -> None:
        self.directory, self.schema = directory, schema
        self.directory.mkdir(parents=True, exist_ok=True)
        self._columns: dict[str, list[Any]] = {name: [] for name in schema.names}
        self._parts = len(list(directory.glob("part-*.parquet")))

    def append(self, row: dict[str, Any]) -> None:
        missing = self.schema.names - row.keys()
        extra = row.keys() - set(self.schema.names)
        if missing or extra:
            raise KeyError(f"{self.directory.name}: missing {sorted(missing)}, unexpected {sorted(extra)}")
        for name in self.schema.names:
            self._columns[name].append(row[name])

    def extend(self, columns: dict[str, Any]) -> None:
        """Append many rows given as equal-length columns (lists or numpy arrays)."""
        for name in self.schema.names:
            self._columns[name].extend(list(columns[name]))

    def flush(self) -> None:
        if not self._columns[self.schema.names[0]]:
            return
        table = pa.table({n: self._array(n) for n in self.schema.names}, schema=self.schema)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        atomic_write_bytes(self.directory / f"part-{self._parts:05d}.parquet", sink.getvalue().to_pybytes())
        self._parts += 1
        self._columns = {name: [] for name in self.schema.names}

    @property
    def buffered(self) -> int:
        """Rows appended since the last flush."""
        return len(self._columns[self.schema.names[0]])

    def truncate(self, rows: int) -> None:
        """Keep only the first ``rows`` buffered rows."""
        for values in self._columns.values():
            del values[rows:]

    def _array(self, name: str) -> pa.Array:
        kind = self.schema.field(name).type
        if kind == _S:
            return pa.array([str(v) for v in self._columns[name]], type=_S)
        return pa.array(np.asarray(self._columns[name], dtype=_NUMPY[kind]))


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
