"""Load a run directory (finished, in progress, or killed) into pandas DataFrames."""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.dataset as ds

from simulator.metrics import TABLES


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
    directory = path / f"{name}.parquet"
    files = sorted(directory.glob("part-*.parquet")) if directory.is_dir() else []
    if not files:
        return TABLES[name].empty_table().to_pandas()
    frame = ds.dataset([str(f) for f in files], schema=TABLES[name], format="parquet").to_table().to_pandas()
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
