"""The house style of every metafleet figure, and the pieces the figures are drawn with.

The Okabe-Ito colour-blind-safe palette with a line style and marker per series as a second cue, axis
and legend names for the metrics columns, and the aggregation of a setting's seeds (runs with the same
``label``): a mean line with a shaded band, the 95% Student-t confidence interval of the mean or the
min-max range (``analysis.stats``), runs aligned on integer axes and interpolated on continuous ones.
``analysis.plots`` draws the standard figures with these.
"""

from __future__ import annotations

import textwrap
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from analysis.stats import band

#: Okabe-Ito colour-blind-safe palette, ordered so that the pale yellow comes late
PALETTE: tuple[str, ...] = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")
LINESTYLES: tuple[Any, ...] = ("-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)), (0, (1, 3)), (0, (8, 3)))
MARKERS: tuple[str, ...] = ("o", "s", "^", "D", "v", "P", "X", "*")
HATCHES: tuple[str, ...] = ("", "//", "..", "xx", "\\\\", "++", "oo", "--")

ALIGNED_X = ("round", "model_version")  # integer axes: seeds align on the value, no interpolation
X_NAMES = {"round": "round", "model_version": "model version", "sim_time_s": "simulated time (s)",
            "wall_time_s": "wall-clock time (s)"}
NAMES = {
    "eval_loss_post": "held-out loss after adaptation", "eval_loss_pre": "held-out loss before adaptation",
    "eval_metric_post": "held-out accuracy after adaptation", "eval_metric_pre": "held-out accuracy before adaptation",
    "loss_post": "held-out loss after adaptation", "loss_pre": "held-out loss before adaptation",
    "metric_post": "held-out accuracy after adaptation", "metric_pre": "held-out accuracy before adaptation",
    "train_loss": "training loss of aggregated clients", "train_loss_before": "training loss before local steps",
    "staleness_mean": "mean staleness (model versions)", "staleness_max": "max staleness (model versions)",
    "num_completed": "client updates per round", "num_dropped": "dropped client updates per round",
    "update_norm": "norm of the global update", "bytes_up": "bytes uploaded per round",
    "bytes_down": "bytes downloaded per round", "round_sim_duration_s": "simulated round duration (s)",
}
STAT_SUFFIXES = {"_p10": " (10th percentile over clients)", "_p50": " (median over clients)",
                  "_p90": " (90th percentile over clients)"}
def series_style(index: int) -> dict[str, Any]:
    """Colour, line style and marker of the ``index``-th series (colours repeat after 8, combos do not)."""
    return {"color": PALETTE[index % len(PALETTE)], "linestyle": LINESTYLES[index % len(LINESTYLES)],
            "marker": MARKERS[(index + index // len(MARKERS)) % len(MARKERS)]}


def tidy(frame: pd.DataFrame | None) -> pd.DataFrame:
    """The frame with string ``run`` and ``label`` columns (each filled from the other when missing)."""
    if frame is None:
        return pd.DataFrame(columns=["run", "label"])
    out = frame.copy()
    if "label" not in out:
        out["label"] = out["run"] if "run" in out else "run"
    if "run" not in out:
        out["run"] = out["label"]
    return out.assign(run=out["run"].astype(str), label=out["label"].astype(str))


def series_labels(frame: pd.DataFrame) -> list[str]:
    return sorted(frame["label"].dropna().unique().tolist()) if "label" in frame else []


def legend_name(label: str, seeds: int, width: int = 48) -> str:
    """A series' legend entry: its label and its number of seeds, ``"algorithm.name=maml (n=3)"``, wrapped
    after a key=value pair when longer than ``width``."""
    text = f"{label} (n={seeds})"
    return "\n".join(textwrap.wrap(text, width, break_long_words=False, break_on_hyphens=False)) or text


def valid(frame: pd.DataFrame, *columns: str) -> pd.DataFrame:
    """Rows where all ``columns`` are present and not NaN (no rows, but all the columns, when one is missing)."""
    missing = [c for c in dict.fromkeys(columns) if c not in frame]
    if missing:
        return frame.iloc[0:0].reindex(columns=[*frame.columns, *missing])
    return frame.dropna(subset=list(dict.fromkeys(columns)))


def loss_kind(frame: pd.DataFrame) -> str:
    """"MSE" for regression runs (losses but no accuracy), "cross-entropy" for classification runs."""
    metric = next((c for c in ("eval_metric_post", "metric_post", "eval_metric_pre", "metric_pre") if c in frame), None)
    loss = next((c for c in ("eval_loss_post", "loss_post", "eval_loss_pre", "loss_pre") if c in frame), None)
    if frame.empty or metric is None or loss is None:
        return "MSE or cross-entropy"
    has_metric = frame[metric].notna().groupby(frame["run"]).any()
    has_loss = frame[loss].notna().groupby(frame["run"]).any()
    regression, classification = bool((has_loss & ~has_metric).any()), bool(has_metric.any())
    if regression == classification:
        return "MSE or cross-entropy"
    return "MSE" if regression else "cross-entropy"


def axis_name(column: str, frame: pd.DataFrame) -> str:
    """A readable axis name with units for a metric column."""
    base, suffix = column, ""
    for end, text in STAT_SUFFIXES.items():
        if column.endswith(end):
            base, suffix = column[: -len(end)], text
    name = NAMES.get(base, X_NAMES.get(base, base))
    if "loss" in base:
        name += f" ({loss_kind(frame)})"
    return name + suffix


def compared(labels: list[str]) -> str:
    """What the series compare: the config keys in the labels, e.g. "4 settings of algorithm.name"."""
    keys: list[str] = []
    for label in labels:
        for part in label.split(", "):
            key = part.split("=", 1)[0] if "=" in part else None
            if key and key not in keys:
                keys.append(key)
    count = f"{len(labels)} setting{'s' if len(labels) != 1 else ''}"
    return f"{count} of {', '.join(keys)}" if keys else count


def new_figure(width: float = 9.0, height: float = 5.0) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def finish(ax: Axes, xlabel: str, ylabel: str, title: str) -> None:
    """Axis labels, a wrapped title, a legend outside the axes (or a note when nothing was drawn)."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel("\n".join(textwrap.wrap(ylabel, 45, break_on_hyphens=False)))
    ax.set_title("\n".join(textwrap.wrap(title[:1].upper() + title[1:], 70, break_on_hyphens=False)),
                 fontsize="medium")
    ax.grid(True, alpha=0.3)
    handles, names = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, names, fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")


def aggregate(frame: pd.DataFrame, x: str, y: str) -> tuple[np.ndarray, np.ndarray, int]:
    """x grid, the (points x runs) values of ``y`` on it (NaN where a run has none) and the number of runs.

    Runs align on the value of integer axes (round); on continuous axes (simulated time) each run is
    interpolated linearly onto the union of all runs' points within the range they share."""
    series = [run.groupby(x, sort=True)[y].mean() for _, run in frame.groupby("run", sort=True)]
    if x in ALIGNED_X or len(series) == 1:
        table = pd.concat(series, axis=1).sort_index()
        grid, values = table.index.to_numpy(dtype=float), table.to_numpy(dtype=float)
    else:
        grid = np.unique(np.concatenate([s.index.to_numpy(dtype=float) for s in series]))
        values = np.column_stack([np.interp(grid, s.index.to_numpy(dtype=float), s.to_numpy(dtype=float),
                                            left=np.nan, right=np.nan) for s in series])
        shared = ~np.isnan(values).any(axis=1)
        if shared.any():
            grid, values = grid[shared], values[shared]
    keep = ~np.isnan(values).all(axis=1)
    return grid[keep], values[keep], len(series)


def draw_lines(ax: Axes, frame: pd.DataFrame, x: str, y: str, labels: list[str], band_kind: str = "t") -> None:
    """One line per label: the mean over its seeds, with a shaded band (``band_kind``: the 95% Student-t
    confidence interval of the mean, or ``"minmax"``) where at least 2 seeds have a value; a single seed
    gets no band."""
    for index, label in enumerate(labels):
        sub = frame[frame["label"] == label]
        if sub.empty:
            continue
        grid, values, seeds = aggregate(sub, x, y)
        mean, low, high, _ = band(values, band_kind)
        style = series_style(index)
        ax.plot(grid, mean, label=legend_name(label, seeds), markevery=max(1, len(grid) // 10), markersize=5,
                **style)
        has_band = np.isfinite(low) & np.isfinite(high)
        if has_band.any():
            ax.fill_between(grid, low, high, where=has_band, color=style["color"], alpha=0.18, linewidth=0)
