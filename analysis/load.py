"""Load run directories (finished, in progress, or killed) into tidy pandas DataFrames.

``load_run`` reads one directory; ``load_runs`` reads many (directories or glob patterns) and
stacks their tables with a ``run`` column, the run's flattened config as columns
(``algorithm.name``, ``seed``, ``devices.speed.dist``, ...), a ``label`` naming every config key on which
its setting differs from the others and the ``setting``'s number (``analysis.settings``: runs that differ
only in the seed and execution-only keys are one setting), so that a setting's seeds aggregate under one
label. A directory that is not a run directory itself (a sweep's) stands for the run directories under it.
"""

from __future__ import annotations

import glob
import json
import os
import tomllib
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from analysis.settings import Grouping, flat_config, group_settings
from simulator.rundir.metrics import TABLES, conform


@dataclass(frozen=True)
class Run:
    path: Path
    config: dict[str, Any]
    summary: dict[str, Any] | None   # None while the run is in progress or after it was killed
    rounds: pd.DataFrame
    clients: pd.DataFrame
    evals: pd.DataFrame
    label_histogram: pd.DataFrame | None = None  # client_id, label, count (pooled datasets only)

    @property
    def complete(self) -> bool:
        return bool(self.summary) and self.summary.get("status") == "completed"


def _table(path: Path, name: str) -> pd.DataFrame:
    """A metrics table from its part files; a part that cannot be read (truncated by a copy or a full
    disk: metafleet itself only ever renames complete parts into place) is skipped with a warning."""
    directory = path / f"{name}.parquet"
    files = sorted(directory.glob("part-*.parquet")) if directory.is_dir() else []
    schema = TABLES[name]
    tables = []
    for f in files:
        try:
            tables.append(conform(pq.read_table(f), name))  # older runs' column names mapped to today's
        except (pa.ArrowException, OSError) as exc:
            warnings.warn(f"{f}: unreadable part skipped ({exc})", stacklevel=3)
    if not tables:
        return schema.empty_table().to_pandas()
    frame = pa.concat_tables(tables).to_pandas()
    keys = ["round"] + (["client_id"] if "client_id" in frame.columns else [])
    return frame.sort_values(keys, ignore_index=True)


def load_run(path: str | Path) -> Run:
    """Read ``config.toml``, ``summary.json`` (if present), the three metric tables of a run, and the
    label histogram of a partitioned pooled dataset."""
    p = Path(path)
    if not (p / "config.toml").is_file():
        raise FileNotFoundError(f"{p} is not a metafleet run directory (no config.toml)")
    config = tomllib.loads((p / "config.toml").read_text(encoding="utf-8"))
    summary_path = p / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    hist_path = p / "label_histogram.parquet"
    hist = pd.read_parquet(hist_path) if hist_path.is_file() else None
    return Run(p, config, summary, _table(p, "rounds"), _table(p, "clients"), _table(p, "evals"), hist)


def _has_rounds(path: Path) -> bool:
    return any((path / "rounds.parquet").glob("part-*.parquet"))


def find_runs(root: str | Path) -> tuple[list[Path], list[Path]]:
    """Run directories (those with a ``config.toml``) under ``root``, recursively and sorted, as (with rounds,
    without rounds yet). A run directory is not searched further; hidden directories are skipped."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        if "config.toml" in filenames:
            found.append(Path(dirpath))
            dirnames.clear()
        else:
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    found.sort()
    return [p for p in found if _has_rounds(p)], [p for p in found if not _has_rounds(p)]


def _paths(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    """Run directories named by ``paths``: run directories, glob patterns, and directories that are not run
    directories themselves (a sweep), searched recursively; a found run without rounds is skipped with a
    warning. A named path that is neither is kept, for ``load_run`` to refuse."""
    items = [paths] if isinstance(paths, str | Path) else list(paths)
    out: list[Path] = []
    for item in items:
        text = str(item)
        magic = glob.has_magic(text)
        for match in sorted(glob.glob(text)) if magic else [text]:
            path = Path(match)
            if (path / "config.toml").is_file():
                out.append(path)
            elif path.is_dir():
                runs, empty = find_runs(path)
                for skipped in empty:
                    warnings.warn(f"{skipped}: skipped, no rounds written yet", stacklevel=3)
                if not runs and not magic:
                    raise FileNotFoundError(f"{text!r} is not a metafleet run directory and holds none with rounds "
                                            f"({len(empty)} without rounds yet)")
                out += runs
            elif not magic:
                out.append(path)
    if not out:
        raise FileNotFoundError(f"no run directories match {paths!r}")
    unique: dict[Path, Path] = {}
    for path in out:
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


def run_labels(configs: list[dict[str, Any]]) -> list[str]:
    """A label per run naming every config key on which its setting differs from the others, e.g.
    ``"algorithm.name=maml, algorithm.server_optimizer=adam, algorithm.server_lr=0.003"``; the seed and
    execution-only keys never count (``analysis.settings.group_settings``). The algorithm's name when
    every run is one setting."""
    return group_settings(configs).run_labels()


@dataclass(frozen=True)
class RunSet:
    """Several runs as tidy frames: every row carries ``run``, ``label`` and the flattened config."""

    runs: list[Run]
    labels: list[str]
    summary: pd.DataFrame   # one row per run: run, label, setting, path, complete, status, summary fields, config
    rounds: pd.DataFrame
    clients: pd.DataFrame
    evals: pd.DataFrame
    grouping: Grouping | None = None   # the runs' settings (``analysis.settings``); None for hand-made frames


def load_runs(paths: str | Path | Iterable[str | Path]) -> RunSet:
    """Load run directories (paths or glob patterns such as ``"runs/sweep-*"``) into one ``RunSet``."""
    runs = [load_run(p) for p in _paths(paths)]
    grouping = group_settings([r.config for r in runs])
    labels = grouping.run_labels()
    names = [r.path.name for r in runs]
    if len(set(names)) < len(names):  # same directory name under different parents: use the paths
        names = [str(r.path) for r in runs]
    meta = []
    for index, (run, name, label) in enumerate(zip(runs, names, labels, strict=True)):
        row: dict[str, Any] = {"run": name, "label": label, "setting": grouping.setting_of(index).number,
                               "path": str(run.path), "complete": run.complete}
        for key, value in (run.summary or {}).items():
            if not isinstance(value, dict | list):
                row[key] = value
        row.update({f"summary.{k}": v for k, v in ((run.summary or {}).get("dropped") or {}).items()})
        meta.append((row, flat_config(run.config)))

    def stack(table: str) -> pd.DataFrame:
        frames = []
        for run, (row, flat) in zip(runs, meta, strict=True):
            frame = getattr(run, table).copy()
            extra = {"run": row["run"], "label": row["label"], "setting": row["setting"],
                     **{k: v for k, v in flat.items()
                                                                  if k not in frame.columns}}
            frames.append(frame.assign(**{k: [v] * len(frame) for k, v in extra.items()}))
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    summary = pd.DataFrame([{**flat, **row} for row, flat in meta])
    return RunSet(runs, labels, summary, stack("rounds"), stack("clients"), stack("evals"), grouping)
