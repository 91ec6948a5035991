"""Load run directories (finished, in progress, or killed) into tidy pandas DataFrames.

``load_run`` reads one directory; ``load_runs`` reads many (directories or glob patterns) and
stacks their tables with a ``run`` column, the run's flattened config as columns
(``algorithm.name``, ``seed``, ``devices.speed.dist``, ...), and a ``label`` naming what differs
between the runs apart from the seed, so that seeds of one setting aggregate under one label.
"""

from __future__ import annotations

import glob
import json
import tomllib
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from simulator.config.toml import flatten_dict
from simulator.rundir.metrics import TABLES


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
            tables.append(pq.read_table(f, schema=schema))
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


#: config keys that never distinguish settings: the seed (aggregated over), the run's name, run
#: length and execution keys (they change speed, never results)
_NOT_A_SETTING = ("seed", "name", "rounds", "eval.every", "metrics.", "system.backend", "system.actors",
                  "system.cpus_per_actor", "system.gpus_per_actor", "system.clients_per_actor", "system.address",
                  "system.threads", "system.ship_code", "system.shard_cache")

#: keys that name a setting first, when several differ
_PRIORITY = ("algorithm.name", "system.mode", "async.rule", "data.name", "data.partition", "data.dirichlet_alpha")


def _flatten(config: dict[str, Any]) -> dict[str, Any]:
    """A run's config as flat columns; lists (model.hidden) become tuples so they can be compared."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in flatten_dict(config).items()}


def _paths(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    items = [paths] if isinstance(paths, str | Path) else list(paths)
    out: list[Path] = []
    for item in items:
        text = str(item)
        matches = sorted(glob.glob(text)) if glob.has_magic(text) else [text]
        out += [Path(m) for m in matches if (Path(m) / "config.toml").is_file() or not glob.has_magic(text)]
    if not out:
        raise FileNotFoundError(f"no run directories match {paths!r}")
    return out


def run_labels(configs: list[dict[str, Any]]) -> list[str]:
    """A label per run from the config keys whose values differ across runs, e.g.
    ``"algorithm.name=maml, data.name=synthetic"``. The seed, run length and execution keys never
    count, and a key is left out when the keys before it already tell its runs apart (a deadline
    that comes with ``system.mode=deadline``). The algorithm name alone when nothing differs."""
    flats = [_flatten(c) for c in configs]
    keys = {k for f in flats for k in f if not any(k == n or (n.endswith(".") and k.startswith(n))
                                                   for n in _NOT_A_SETTING)}
    ordered = [k for k in _PRIORITY if k in keys] + sorted(keys - set(_PRIORITY))
    chosen: list[str] = []
    groups = len({() for _ in flats})
    for key in ordered:
        split = len({tuple(repr(f.get(k)) for k in [*chosen, key]) for f in flats})
        if split > groups:
            chosen, groups = [*chosen, key], split
    if not chosen:
        return [str(f.get("algorithm.name", "run")) for f in flats]
    return [", ".join(f"{k}={_fmt(f.get(k))}" for k in chosen) for f in flats]


def _fmt(value: Any) -> str:
    if isinstance(value, tuple):
        return "[" + ",".join(map(str, value)) + "]"
    return str(value)


@dataclass(frozen=True)
class RunSet:
    """Several runs as tidy frames: every row carries ``run``, ``label`` and the flattened config."""

    runs: list[Run]
    labels: list[str]
    summary: pd.DataFrame   # one row per run: run, label, path, complete, status, summary fields, config
    rounds: pd.DataFrame
    clients: pd.DataFrame
    evals: pd.DataFrame


def load_runs(paths: str | Path | Iterable[str | Path]) -> RunSet:
    """Load run directories (paths or glob patterns such as ``"runs/sweep-*"``) into one ``RunSet``."""
    runs = [load_run(p) for p in _paths(paths)]
    labels = run_labels([r.config for r in runs])
    names = [r.path.name for r in runs]
    if len(set(names)) < len(names):  # same directory name under different parents: use the paths
        names = [str(r.path) for r in runs]
    meta = []
    for run, name, label in zip(runs, names, labels, strict=True):
        row: dict[str, Any] = {"run": name, "label": label, "path": str(run.path), "complete": run.complete}
        for key, value in (run.summary or {}).items():
            if not isinstance(value, dict | list):
                row[key] = value
        row.update({f"summary.{k}": v for k, v in ((run.summary or {}).get("dropped") or {}).items()})
        meta.append((row, _flatten(run.config)))

    def stack(table: str) -> pd.DataFrame:
        frames = []
        for run, (row, flat) in zip(runs, meta, strict=True):
            frame = getattr(run, table).copy()
            extra = {"run": row["run"], "label": row["label"], **{k: v for k, v in flat.items()
                                                                  if k not in frame.columns}}
            frames.append(frame.assign(**{k: [v] * len(frame) for k, v in extra.items()}))
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    summary = pd.DataFrame([{**flat, **row} for row, flat in meta])
    return RunSet(runs, labels, summary, stack("rounds"), stack("clients"), stack("evals"))
