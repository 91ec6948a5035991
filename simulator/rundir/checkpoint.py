"""Checkpoints of a run's server state, and exact resume.

Every ``checkpoint_every`` rounds (async: server updates), on Ctrl-C and when workers fail beyond
``system.max_failures``, the driver first flushes its metrics and then writes ``checkpoint.pt``
atomically (temporary file, fsync, rename): the server model and optimizer moments, the round /
model version, the virtual clock, and in async mode the in-flight clients, their start-version
models and the metrics window. Everything else a round needs (samples, device profiles,
availability, batches) is a pure function of (seed, round, client id), so no sampler state is kept.

``torch.load(weights_only=True)`` reads it: a checkpoint holds only tensors, numbers, strings,
lists and dicts, never pickled objects. A resumed run first truncates each metrics table to the
rows of rounds before the checkpoint (rows written after it are recomputed), so the finished run
is identical to one that was never interrupted.
"""

from __future__ import annotations

import dataclasses
import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from simulator.config.schema import ConfigError, ExperimentConfig, TrackingConfig
from simulator.config.toml import flatten
from simulator.rundir.files import atomic_write_bytes
from simulator.rundir.metrics import RENAMED, TABLES

FILE = "checkpoint.pt"
FORMAT = 1

#: keys that may differ when a run is resumed: they change how the run executes, never its numbers
RESUMABLE_KEYS = frozenset({
    "rounds", "checkpoint_every", "metrics.flush_every", "system.backend", "system.actors",
    "system.cpus_per_actor", "system.gpus_per_actor", "system.gpu_memory_fraction", "system.clients_per_actor",
    "system.address", "system.ship_code", "system.shard_cache", "system.shard_cache_mb", "system.max_failures",
    "system.call_timeout_s", "system.prefetch", "system.combine",
    *(f"tracking.{f.name}" for f in dataclasses.fields(TrackingConfig)),
})


def save(run_dir: Path, state: dict[str, Any]) -> None:
    """Write ``state`` (tensors, numbers, strings, lists, dicts) as the run's checkpoint, atomically."""
    buf = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buf)
    atomic_write_bytes(run_dir / FILE, buf.getvalue())


def load(run_dir: Path) -> dict[str, Any] | None:
    """The run's checkpoint, or None if it has none yet (killed before its first one)."""
    path = run_dir / FILE
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a checkpoint is written by rename: unreadable means corrupted by hand
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ConfigError(f"--resume {str(run_dir)!r}: {FILE} cannot be read ({type(exc).__name__}: {first}); "
                          f"delete it to restart the run from round 0") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ConfigError(f"--resume {str(run_dir)!r}: {FILE} is not a metafleet checkpoint of format {FORMAT}; "
                          "delete it to restart the run from round 0")
    return state


def plain(obj: Any) -> Any:
    """``obj`` with numpy scalars and arrays made Python numbers and tensors (``weights_only`` loadable)."""
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    return obj


def dataclass_state(obj: Any) -> dict[str, Any]:
    """A frozen dataclass of tensors and numbers as a plain dict (for ``weights_only`` loading)."""
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def check_compatible(old: ExperimentConfig, new: ExperimentConfig, run_dir: Path) -> None:
    """A resumed run must keep every key that affects its numbers; only ``RESUMABLE_KEYS`` may change."""
    before, after = flatten(old), flatten(new)
    for key in sorted(before.keys() | after.keys()):
        if key in RESUMABLE_KEYS or before.get(key) == after.get(key):
            continue
        raise ConfigError(
            f"--resume {str(run_dir)!r}: {key} was {before.get(key)!r} when the run started, now "
            f"{after.get(key)!r}; a resumed run keeps its config (only {', '.join(sorted(RESUMABLE_KEYS))} may "
            "change): drop the change, or start a new run with --out")


def check_resumable(run_dir: Path) -> None:
    """Everything a resume will read or replace, checked before it touches anything: the checkpoint (and any
    temporary file of a killed write) is a regular file, and every metrics part file is a readable Parquet
    file with a ``round`` column. A ``ConfigError`` names the first broken file and what to do."""
    where = f"--resume {str(run_dir)!r}"
    path = run_dir / FILE
    if path.exists() and not path.is_file():
        raise ConfigError(f"{where}: {FILE} is not a regular file; remove it to restart the run from round 0")
    for tmp in run_dir.glob(".*.tmp"):
        if not tmp.is_file():
            raise ConfigError(f"{where}: {tmp.name} (a temporary file of an interrupted write) is not a regular "
                              "file; remove it, then resume")
    for name in TABLES:
        directory = run_dir / f"{name}.parquet"
        if directory.exists() and not directory.is_dir():
            raise ConfigError(f"{where}: {directory.name} is not a directory of part files; the run's metrics are "
                              "damaged, start a new run with --out")
        for part in sorted(directory.glob("part-*.parquet")) if directory.is_dir() else []:
            try:
                pq.read_table(part, columns=["round"])
                columns = pq.read_schema(part).names
            except Exception as exc:  # truncated, replaced or not Parquet at all
                first = (str(exc).strip().splitlines() or [""])[0][:160]
                raise ConfigError(f"{where}: {name}.parquet/{part.name} cannot be read ({type(exc).__name__}: "
                                  f"{first}); restore it from a copy, or start the run again with --out "
                                  "(nothing was changed)") from None
            old = sorted(RENAMED[name].keys() & set(columns))
            if old:
                raise ConfigError(f"{where}: {name}.parquet was written by an older metafleet (column {old[0]!r}, "
                                  f"now {RENAMED[name][old[0]]!r}); such a run can be analysed (plot, report, "
                                  "compare) but not resumed: start it again with --out (nothing was changed)")


def truncate_metrics(run_dir: Path, next_round: int) -> None:
    """Keep only rows of rounds < ``next_round`` in every metrics table: part files holding later rows
    are rewritten (atomically) without them, and leftover temporary files are removed."""
    for name in TABLES:
        directory = run_dir / f"{name}.parquet"
        if not directory.is_dir():
            continue
        for tmp in directory.glob(".*.tmp"):
            tmp.unlink()
        for part in sorted(directory.glob("part-*.parquet")):
            table = pq.read_table(part)
            rounds = table.column("round").to_numpy()
            if not len(rounds) or rounds.max() < next_round:
                continue
            keep = rounds < next_round
            if not keep.any():
                part.unlink()
                continue
            sink = io.BytesIO()
            pq.write_table(table.filter(keep), sink, compression="zstd")
            atomic_write_bytes(part, sink.getvalue())
        _renumber(directory)


def _renumber(directory: Path) -> None:
    """Part files are numbered 0..n-1 without gaps (the writer numbers new parts from the count)."""
    for i, part in enumerate(sorted(directory.glob("part-*.parquet"))):
        target = directory / f"part-{i:05d}.parquet"
        if part != target:
            part.rename(target)


def history(run_dir: Path) -> list[dict[str, Any]]:
    """The rounds rows already written (after ``truncate_metrics``), in round order, as the driver keeps them."""
    directory = run_dir / "rounds.parquet"
    if not directory.is_dir() or not any(directory.glob("part-*.parquet")):
        return []
    table = pq.read_table(directory).sort_by("round")
    floats = [f.name for f in TABLES["rounds"] if f.type == pa.float64()]
    rows = table.to_pylist()
    for row in rows:  # null in the file is NaN ("not measured") in the driver's rows, as in a run never stopped
        for name in floats:
            if row.get(name, 0.0) is None:
                row[name] = math.nan
    return rows


__all__ = ["FILE", "RESUMABLE_KEYS", "check_compatible", "check_resumable", "dataclass_state", "history", "load",
           "save", "truncate_metrics"]
