"""Standard figures for metafleet runs, drawn from the tidy frames of ``analysis.load.RunSet``.

Every function takes DataFrames and returns a ``matplotlib.figure.Figure`` built without pyplot, so
nothing is shown and nothing stays registered. A series is a run ``label`` (sorted, so colours are
stable); the seeds of a label are aggregated: mean line with a shaded band across seeds, the 95%
Student-t confidence interval of the mean or the min-max range (``analysis.stats``), none for one seed. Colours
come from the Okabe-Ito palette and every series also gets its own line style, marker or hatch.
``standard_figures`` picks the figures that apply to a ``RunSet``; ``save_figures`` writes them
byte-reproducibly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.layout_engine import PlaceHolderLayoutEngine

from analysis.load import RunSet
from analysis.stats import describe, interval
from analysis.styling import (
    HATCHES,
    PALETTE,
    X_NAMES,
    axis_name,
    compared,
    draw_lines,
    finish,
    legend_name,
    new_figure,
    series_labels,
    series_style,
    tidy,
    valid,
)

_METADATA: dict[str, dict[str, Any]] = {"png": {"Software": None}, "svg": {"Date": None},
                                        "pdf": {"CreationDate": None}}


def curves(rounds: pd.DataFrame, y: str = "eval_loss_post", x: str = "round", title: str | None = None,
           band: str = "t") -> Figure:
    """``y`` against ``x`` (round or sim_time_s), one line per label: the mean over its seeds with a shaded band,
    the 95% Student-t confidence interval of the mean (``band="t"``) or the min-max range (``"minmax"``)."""
    rounds = tidy(rounds)
    labels = series_labels(rounds)
    fig = new_figure()
    ax = fig.add_subplot()
    draw_lines(ax, valid(rounds, x, y), x, y, labels, band)
    xname, yname = X_NAMES.get(x, x), axis_name(y, rounds)
    finish(ax, xname, yname, title or f"{yname} by {xname}: {compared(labels)}{_band_note(rounds, band)}")
    return fig


def _band_note(frame: pd.DataFrame, band: str) -> str:
    """``"; band: 95% Student-t confidence interval ..."`` when a label has several seeds."""
    several = "run" in frame and frame.groupby("label")["run"].nunique().gt(1).any()
    return f"; band: {describe(band)} over seeds" if several else ""


def _errors(values: pd.Series, band: str) -> tuple[float, float, float]:
    """Mean and the distances below and above it of the interval over seeds (NaN without one: no error bar)."""
    iv = interval(values, band)
    if not iv.has_interval:
        return iv.mean, math.nan, math.nan
    return iv.mean, iv.mean - float(iv.low), float(iv.high) - iv.mean


def personalization_gain(rounds: pd.DataFrame, metric: str = "loss", band: str = "t") -> Figure:
    """Grouped bars per label at each run's final evaluation: before vs after adaptation (mean over
    seeds, error bars the 95% Student-t confidence interval, or with ``band="minmax"`` the min-max range,
    over seeds; none for a single seed), annotated with the gain (after - before)."""
    if metric not in ("loss", "accuracy"):
        raise ValueError(f"metric must be 'loss' or 'accuracy', not {metric!r}")
    rounds = tidy(rounds)
    what = "loss" if metric == "loss" else "metric"
    pre, post = f"eval_{what}_pre", f"eval_{what}_post"
    labels = series_labels(rounds)
    finals = valid(rounds, "round", pre, post).sort_values(["run", "round"]).groupby("run").tail(1)
    rows = {}
    for label, sub in finals.groupby("label"):
        (pre_mean, pre_down, pre_up), (post_mean, post_down, post_up) = _errors(sub[pre], band), \
            _errors(sub[post], band)
        rows[label] = {"pre": pre_mean, "pre_down": pre_down, "pre_up": pre_up, "post": post_mean,
                       "post_down": post_down, "post_up": post_up, "seeds": sub["run"].nunique()}
    stats = pd.DataFrame.from_dict(rows, orient="index",
                                   columns=["pre", "pre_down", "pre_up", "post", "post_down", "post_up", "seeds"])
    stats = stats.reindex([label for label in labels if label in stats.index])
    fig = new_figure(max(9.0, 3.5 + 0.9 * len(stats)), 5.5)
    ax = fig.add_subplot()
    where = np.arange(len(stats), dtype=float)
    width = 0.38
    for offset, key, name, index in ((-width / 2, "pre", "before adaptation", 0),
                                     (width / 2, "post", "after adaptation", 1)):
        errors = stats[[f"{key}_down", f"{key}_up"]].to_numpy(dtype=float).T
        ax.bar(where + offset, stats[key].to_numpy(dtype=float), width, label=name, color=PALETTE[index],
               hatch=HATCHES[index * 2], edgecolor="white", capsize=4,
               yerr=errors if (stats["seeds"] > 1).any() else None)
    for position, (_, row) in zip(where, stats.iterrows(), strict=True):
        top = max(row["pre"] + np.nan_to_num(row["pre_up"]), row["post"] + np.nan_to_num(row["post_up"]))
        ax.annotate(f"gain\n{row['post'] - row['pre']:+.3g}", (position, top), xytext=(0, 3),
                    textcoords="offset points", ha="center", va="bottom", fontsize="x-small")
    ax.set_xticks(where, [legend_name(str(label), int(n)) for label, n in stats["seeds"].items()],
                  rotation=30 if len(stats) > 2 else 0, ha="right" if len(stats) > 2 else "center",
                  rotation_mode="anchor", fontsize="small")
    ax.margins(y=0.15)
    final_rounds = sorted(finals["round"].unique().tolist()) if not finals.empty else []
    at = f"round {final_rounds[0]}" if len(final_rounds) == 1 else "each run's final evaluation"
    base = axis_name(post, rounds).replace(" after adaptation", "")
    bars = f"; error bars: {describe(band)} over seeds" if (stats["seeds"] > 1).any() else ""
    finish(ax, "setting", base, f"personalization gain at {at}: {base} before vs after adaptation "
                                 f"(gain = after - before), {compared(labels)}{bars}")
    return fig


def client_cdf(evals: pd.DataFrame, column: str = "loss_post", eval_round: int | None = None) -> Figure:
    """Empirical CDF over held-out clients of ``column`` at each run's last evaluation (or ``eval_round``),
    pooled over the seeds of a label."""
    evals = tidy(evals)
    labels = series_labels(evals)
    data = valid(evals, "round", column)
    if eval_round is None:
        data = data[data["round"] == data.groupby("run")["round"].transform("max")]
    else:
        data = data[data["round"] == eval_round]
    fig = new_figure()
    ax = fig.add_subplot()
    for index, label in enumerate(labels):
        sub = data[data["label"] == label]
        if sub.empty:
            continue
        values = np.sort(sub[column].to_numpy(dtype=float))
        fraction = np.arange(1, len(values) + 1) / len(values)
        ax.step(np.r_[values[0], values], np.r_[0.0, fraction], where="post", markersize=5,
                markevery=max(1, len(values) // 8), label=legend_name(label, sub["run"].nunique()),
                **series_style(index))
    ax.set_ylim(0, 1.02)
    rounds = sorted(data["round"].unique().tolist()) if not data.empty else []
    at = f"round {rounds[0]}" if len(rounds) == 1 else "each run's last evaluation"
    name = axis_name(column, evals)
    finish(ax, name, "fraction of held-out clients", f"distribution over held-out clients of {name} at {at}: "
                                                       f"{compared(labels)}")
    return fig


def _integer_histogram(ax: Axes, groups: list[tuple[str, np.ndarray, int]], labels: list[str],
                       log: bool = False) -> str:
    """Histogram with integer bins, counts averaged over seeds: side-by-side bars for up to 30 bins,
    step outlines beyond (on a log scale with ``log``, for long tails). Returns a note for the y label
    when the counts are per-run means."""
    values = [v for _, v, _ in groups if len(v)]
    if not values:
        return ""
    low, high = int(min(v.min() for v in values)), int(max(v.max() for v in values))
    edges = np.arange(low, high + 2) - 0.5
    bars = high - low + 1 <= 30
    width = 0.8 / len(groups)
    for j, (label, vals, seeds) in enumerate(groups):
        counts = np.histogram(vals, edges)[0] / max(seeds, 1)
        style, index = series_style(labels.index(label)), labels.index(label)
        if bars:
            centers = np.arange(low, high + 1) - 0.4 + width * (j + 0.5)
            ax.bar(centers, counts, width, color=style["color"], hatch=HATCHES[index % len(HATCHES)],
                   edgecolor="white", label=legend_name(label, seeds))
        else:
            ax.stairs(counts, edges, color=style["color"], linestyle=style["linestyle"], linewidth=1.5,
                      label=legend_name(label, seeds))
            ax.set_yscale("log" if log else "linear")
    if bars and high - low <= 15:
        ax.set_xticks(np.arange(low, high + 1))
    return " (mean per run over seeds)" if any(seeds > 1 for _, _, seeds in groups) else ""


def _aggregated(clients: pd.DataFrame) -> pd.DataFrame:
    """Rows of client updates that were aggregated (``drop_reason == ""``)."""
    data = valid(clients, "drop_reason")
    return data[data["drop_reason"].astype(str) == ""] if "drop_reason" in data else data


def staleness_histogram(clients: pd.DataFrame) -> Figure:
    """Histogram (integer bins) of the staleness of aggregated client updates, one series per label."""
    clients = tidy(clients)
    labels = series_labels(clients)
    data = valid(_aggregated(clients), "staleness")
    groups = [(label, sub["staleness"].to_numpy(dtype=float), sub["run"].nunique())
              for label, sub in data.groupby("label", sort=True)]
    fig = new_figure()
    ax = fig.add_subplot()
    note = _integer_histogram(ax, groups, labels, log=True)  # the rare large staleness stays visible
    finish(ax, "staleness (model versions behind)", "client updates" + note,
            f"staleness of aggregated client updates: {compared(labels)}")
    return fig


def participation(clients: pd.DataFrame) -> Figure:
    """Per label, a histogram of how many times each client (of those sampled at least once) was aggregated."""
    clients = tidy(clients)
    labels = series_labels(clients)
    data = valid(clients, "client_id", "drop_reason")
    kept = data.assign(_kept=data["drop_reason"].astype(str) == "")
    counts = kept.groupby(["label", "run", "client_id"], sort=True)["_kept"].sum()
    groups = [(str(label), sub.to_numpy(dtype=float), sub.index.get_level_values("run").nunique())
              for label, sub in counts.groupby(level="label", sort=True)]
    fig = new_figure()
    ax = fig.add_subplot()
    note = _integer_histogram(ax, groups, labels)
    finish(ax, "times a client was aggregated", "clients" + note,
            f"participation: how often each sampled client was aggregated, {compared(labels)}")
    return fig


def drops(rounds: pd.DataFrame, x: str = "round") -> Figure:
    """Per label (at most 8 subplots, summed over seeds by round): dropped updates per round stacked by
    reason, and the completed updates as a line."""
    rounds = tidy(rounds)
    labels = series_labels(rounds)
    data = valid(rounds, "round", x, "num_completed")
    reasons = [c for c in data.columns if c.startswith("dropped_") and data[c].fillna(0).gt(0).any()]
    shown = labels[:8]
    ncols = 1 if len(shown) <= 1 else 2
    nrows = max(1, math.ceil(len(shown) / ncols))
    fig = new_figure(11.0 if ncols == 2 else 9.0, 1.0 + 2.6 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True).ravel()
    for ax, label in zip(axes, shown, strict=False):
        sub = data[data["label"] == label]
        by_round = sub.groupby("round", sort=True)
        totals = by_round[[*reasons, "num_completed"]].sum()
        xs = totals.index.to_numpy(dtype=float) if x == "round" else by_round[x].mean().to_numpy(dtype=float)
        if reasons:
            areas = ax.stackplot(xs, *[totals[c].to_numpy(dtype=float) for c in reasons], alpha=0.85,
                                 labels=[c.removeprefix("dropped_") for c in reasons], colors=PALETTE[1:])
            for i, area in enumerate(areas):
                area.set_hatch(HATCHES[(i + 1) % len(HATCHES)])
        ax.plot(xs, totals["num_completed"].to_numpy(dtype=float), color="black", linewidth=1.2, label="completed")
        ax.set_title(legend_name(label, sub["run"].nunique()), fontsize="small")
        ax.set_xlabel(X_NAMES.get(x, x))
        ax.set_ylabel("client updates per round")
        ax.grid(True, alpha=0.3)
    for ax in axes[len(shown):]:
        ax.remove()
    more = f" (first 8 of {len(labels)} settings)" if len(labels) > 8 else ""
    fig.suptitle(f"Client updates per round: dropped by reason (stacked) vs completed, summed over seeds{more}",
                 fontsize="medium")
    if shown:
        handles, names = axes[0].get_legend_handles_labels()
        fig.legend(handles, names, loc="outside lower center", ncols=len(names), fontsize="small")
    else:
        axes[0].text(0.5, 0.5, "no data", ha="center", va="center", transform=axes[0].transAxes, color="gray")
    return fig


def throughput(rounds: pd.DataFrame, band: str = "t") -> Figure:
    """Client updates per wall-clock second, per round: num_completed / diff(wall_time_s), one line per label."""
    rounds = tidy(rounds)
    labels = series_labels(rounds)
    data = valid(rounds, "round", "wall_time_s", "num_completed").sort_values(["run", "round"])
    step = data.groupby("run")["wall_time_s"].diff().fillna(data["wall_time_s"])
    data = data.assign(_throughput=data["num_completed"] / step.where(step > 0))
    fig = new_figure()
    ax = fig.add_subplot()
    draw_lines(ax, valid(data, "_throughput"), "round", "_throughput", labels, band)
    finish(ax, "round", "client updates per wall-clock second",
            f"throughput in wall-clock (real, not simulated) time: {compared(labels)}")
    return fig


def loss_and_epsilon(rounds: pd.DataFrame) -> Figure:
    """Differential privacy (``privacy.mode`` on): held-out loss after adaptation by round, and next to it the
    privacy spent, ``dp_epsilon`` at the run's delta, by round (finite values; sigma = 0 spends infinity)."""
    rounds = tidy(rounds)
    labels = series_labels(rounds)
    fig = new_figure(13.0, 5.0)
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    draw_lines(left, valid(rounds, "round", "eval_loss_post"), "round", "eval_loss_post", labels)
    finish(left, "round", axis_name("eval_loss_post", rounds), f"held-out loss by round: {compared(labels)}")
    spent = valid(rounds, "round", "dp_epsilon")
    draw_lines(right, spent[np.isfinite(spent["dp_epsilon"])], "round", "dp_epsilon", labels)
    finish(right, "round", "epsilon spent (at the run's delta)", f"privacy spent by round: {compared(labels)}")
    return fig


def _any(frame: pd.DataFrame, column: str, positive: bool = False) -> bool:
    """Whether ``column`` exists and has a non-NaN (or, with ``positive``, a > 0) value."""
    if frame is None or frame.empty or column not in frame:
        return False
    values = frame[column]
    return bool((values.fillna(0) > 0).any() if positive else values.notna().any())


def _compressed(rounds: pd.DataFrame) -> bool:
    """Uploads smaller than downloads somewhere: a compressor is on (``[compression]``), so bytes sent per
    round is worth a figure of its own."""
    if not {"bytes_up", "bytes_down"} <= set(rounds.columns) or rounds.empty:
        return False
    return bool((rounds["bytes_up"] < rounds["bytes_down"]).any())


def standard_figures(runset: RunSet, band: str = "t") -> dict[str, Figure]:
    """The standard figures that apply to ``runset``, keyed by file stem; figures without data are skipped.
    Seeds of a setting are drawn as their mean with ``band`` (``"t"`` or ``"minmax"``, ``analysis.stats``)."""
    rounds, clients, evals = tidy(runset.rounds), tidy(runset.clients), tidy(runset.evals)
    loss, accuracy = _any(rounds, "eval_loss_post"), _any(rounds, "eval_metric_post")
    timed = _any(rounds, "sim_time_s")
    plans: list[tuple[str, bool, Any]] = [
        ("loss_by_round", loss, lambda: curves(rounds, "eval_loss_post", "round", band=band)),
        ("loss_by_sim_time", loss and timed, lambda: curves(rounds, "eval_loss_post", "sim_time_s", band=band)),
        ("accuracy_by_round", accuracy, lambda: curves(rounds, "eval_metric_post", "round", band=band)),
        ("accuracy_by_sim_time", accuracy and timed,
         lambda: curves(rounds, "eval_metric_post", "sim_time_s", band=band)),
        ("personalization_gain", loss and _any(rounds, "eval_loss_pre"),
         lambda: personalization_gain(rounds, band=band)),
        ("personalization_gain_accuracy", accuracy and _any(rounds, "eval_metric_pre"),
         lambda: personalization_gain(rounds, "accuracy", band)),
        ("client_cdf", _any(evals, "loss_post"), lambda: client_cdf(evals, "loss_post")),
        ("client_cdf_accuracy", _any(evals, "metric_post"), lambda: client_cdf(evals, "metric_post")),
        ("staleness", _any(_aggregated(clients), "staleness", positive=True), lambda: staleness_histogram(clients)),
        ("drops", _any(rounds, "num_dropped", positive=True) and _any(rounds, "num_completed"),
         lambda: drops(rounds)),
        ("participation", _any(_aggregated(clients), "client_id"), lambda: participation(clients)),
        ("throughput", _any(rounds, "wall_time_s") and _any(rounds, "num_completed"), lambda: throughput(rounds, band)),
        ("train_loss", _any(rounds, "train_loss"), lambda: curves(rounds, "train_loss", "round", band=band)),
        ("loss_and_epsilon", loss and _any(rounds, "dp_epsilon"), lambda: loss_and_epsilon(rounds)),
        ("bytes_up", _compressed(rounds), lambda: curves(rounds, "bytes_up", "round", band=band)),
    ]
    return {stem: make() for stem, applies, make in plans if applies}


def save_figures(figures: Mapping[str, Figure], out_dir: str | Path, fmt: str = "png") -> list[Path]:
    """Write each figure as ``<out_dir>/<stem>.<fmt>`` (png at 150 dpi, svg or pdf), without dates or
    random ids, so that the same figures give byte-identical files. Returns the paths, sorted.

    The constrained layout refines itself a little at every draw, so each figure's layout is computed
    once here and then fixed (its layout engine turned off): saving it again gives the same bytes."""
    if fmt not in _METADATA:
        raise ValueError(f"fmt must be one of {sorted(_METADATA)}, not {fmt!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    with matplotlib.rc_context({"svg.hashsalt": "metafleet", "svg.fonttype": "path"}):
        for stem in sorted(figures):
            path, figure = out / f"{stem}.{fmt}", figures[stem]
            engine = figure.get_layout_engine()
            if engine is not None and not isinstance(engine, PlaceHolderLayoutEngine):
                figure.draw_without_rendering()
                figure.set_layout_engine("none")
            figure.savefig(path, format=fmt, dpi=150, metadata=dict(_METADATA[fmt]))
            paths.append(path)
    return sorted(paths)
