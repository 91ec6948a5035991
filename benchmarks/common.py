"""Shared plumbing of the studies in ``benchmarks.run``: run specs, a process pool, tables, outputs.

Every run goes through ``benchmarks.stragglers.run_one`` (one run directory with ``config.toml``,
the Parquet metrics and ``summary.json``), on the in-process ``inline`` backend with one torch thread,
so a run is a pure function of its config and seed: the simulated-time and metric columns are
bit-identical from one invocation to the next; only wall-clock columns vary.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.plots import save_figures
from benchmarks.stragglers import run_one

#: evaluation columns of ``rounds.parquet`` (NaN on rounds without an evaluation)
EVAL_COLUMNS = ("eval_loss_pre", "eval_loss_post", "eval_metric_pre", "eval_metric_post")


@dataclass(frozen=True)
class Spec:
    """One planned run: its directory name, its ``--set`` overrides, and a relative cost (longest first)."""

    name: str
    overrides: tuple[str, ...]
    cost: float = 1.0
    meta: tuple[tuple[str, Any], ...] = ()   # study-specific fields copied into the table (algorithm, seed, ...)


def default_jobs() -> int:
    """Runs at once: 2, or 1 on a 1-CPU machine (each run is single-threaded)."""
    return min(2, os.cpu_count() or 1)


def run_specs(specs: Sequence[Spec], runs_dir: Path, jobs: int,
              log: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
    """Run every spec into ``runs_dir/<name>`` (replacing an earlier run of that name), ``jobs`` at a time
    in spawned single-threaded processes (longest first, to balance them); returns summaries by name."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    order = sorted(specs, key=lambda s: -s.cost)
    summaries: dict[str, dict[str, Any]] = {}

    def done(spec: Spec, summary: dict[str, Any]) -> None:
        summaries[spec.name] = summary
        log(f"  done {spec.name} ({summary['wall_time_s']:.1f} s wall, {len(summaries)}/{len(specs)})")

    if jobs > 1:
        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(run_one, s.overrides, str(runs_dir / s.name)): s for s in order}
            for future in as_completed(futures):
                done(futures[future], future.result()[0])
    else:
        for spec in order:
            done(spec, run_one(spec.overrides, str(runs_dir / spec.name))[0])
    return summaries


def final_evals(rounds: pd.DataFrame) -> pd.DataFrame:
    """One row per run: its last round (always an evaluation round: the driver evaluates after the last
    one), with ``round``, ``sim_time_s`` and the eval columns, plus ``finite``: whether the run's training
    losses and its evaluated losses stayed finite (a diverged run has NaN or inf there)."""
    rows = []
    for run, r in rounds.sort_values(["run", "round"]).groupby("run", sort=False):
        last = r.iloc[-1]
        evaluated = r[["eval_loss_pre", "eval_loss_post"]].to_numpy(dtype=float)
        finite = (bool(np.isfinite(r["train_loss"].to_numpy(dtype=float)).all())
                  and bool(np.isfinite(evaluated[-1]).all()) and not bool(np.isinf(evaluated).any()))
        rows.append({"run": run, "round": int(last["round"]), "sim_time_s": float(last["sim_time_s"]),
                     **{c: float(last[c]) for c in EVAL_COLUMNS}, "finite": finite})
    return pd.DataFrame(rows)


def mean_std(frame: pd.DataFrame, by: list[str], columns: Iterable[str]) -> pd.DataFrame:
    """Mean and standard deviation (over seeds, ddof 1) of ``columns`` per group, as ``<col>_mean`` and
    ``<col>_std``, plus ``seeds`` (runs per group); groups keep their first-seen order."""
    columns = list(columns)
    grouped = frame.groupby(by, sort=False)
    stats = grouped[columns].agg(["mean", "std"])
    stats.columns = [f"{c}_{s}" for c, s in stats.columns]
    stats["seeds"] = grouped.size()
    return stats.reset_index()


def pm(mean: float, std: float, fmt: str = "{:.3f}") -> str:
    """``mean ± std`` (std omitted when NaN, e.g. a single seed; "-" when the mean is NaN)."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    if std is None or (isinstance(std, float) and math.isnan(std)):
        return fmt.format(mean)
    return f"{fmt.format(mean)} ± {fmt.replace('+', '').format(std)}"


def markdown(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    """A GitHub markdown table from already formatted cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_outputs(out: Path, stem: str, table: pd.DataFrame, text: str, settings: dict[str, Any]) -> list[Path]:
    """``<stem>.csv`` (the numeric table), ``<stem>.md`` (the printed markdown) and ``<stem>.json``
    (settings and rows) in ``out``; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.csv", out / f"{stem}.md", out / f"{stem}.json"]
    table.to_csv(paths[0], index=False)
    paths[1].write_text(text + "\n", encoding="utf-8")
    paths[2].write_text(json.dumps({"settings": settings, "table": json.loads(table.to_json(orient="records"))},
                                   indent=2, default=str) + "\n", encoding="utf-8")
    return paths


def save(figures: dict[str, Any], out: Path) -> list[Path]:
    """Save figures (PNG) with ``analysis.plots.save_figures`` and release them."""

    paths = save_figures(figures, out, fmt="png")
    figures.clear()
    return paths


class Timer:
    """Wall-clock seconds since construction."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.start
