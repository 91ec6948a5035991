"""The summary tables of ``metafleet compare`` and ``metafleet report``: one row per run, one row per setting.

``summary_table`` has, per run, the final and best held-out metrics, simulated and wall time, client
updates per second and drops, computed from its rounds table (so runs in progress or killed are
included). ``setting_table`` aggregates the seeds of each setting (``analysis.settings``): the final
held-out post-adaptation loss and accuracy as a mean with a Student-t confidence interval or a min-max
band over seeds (``analysis.stats``), the rounds completed, how many runs ended how, and the wall time.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import pandas as pd

from analysis.load import RunSet
from analysis.settings import Grouping, group_settings
from analysis.stats import Interval, format_interval, interval

#: (column, header, format) of the summary table, in order
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("run", "run", "s"),
    ("label", "setting", "s"),
    ("seed", "seed", "d"),
    ("status", "status", "s"),
    ("rounds", "rounds", "d"),
    ("client_updates", "client updates", "d"),
    ("final_loss_pre", "final loss pre", ".4g"),
    ("final_loss_post", "final loss post", ".4g"),
    ("best_loss_post", "best loss post", ".4g"),
    ("final_acc_pre", "final acc pre", ".3f"),
    ("final_acc_post", "final acc post", ".3f"),
    ("sim_time_s", "simulated s", ".1f"),
    ("wall_time_s", "wall s", ".1f"),
    ("updates_per_s", "updates/s (steady)", ".0f"),
    ("dropped", "dropped", "d"),
)


def summary_table(runset: RunSet) -> pd.DataFrame:
    """One row per run, computed from its rounds table (so runs in progress or killed are included)."""
    rows = []
    for run, (_, meta) in zip(runset.runs, runset.summary.iterrows(), strict=True):
        r = run.rounds
        evals = r.dropna(subset=["eval_loss_post"]) if len(r) else r
        last = evals.iloc[-1] if len(evals) else None
        summary = run.summary or {}

        def final(col: str, last: Any = last) -> float:
            return float(last[col]) if last is not None else math.nan

        rows.append({
            "run": meta["run"], "label": meta["label"], "seed": int(run.config.get("seed", 0)),
            "status": summary.get("status", "running or killed"), "rounds": len(r),
            "client_updates": int(r["num_completed"].sum()) if len(r) else 0,
            "final_loss_pre": final("eval_loss_pre"), "final_loss_post": final("eval_loss_post"),
            "best_loss_post": float(evals["eval_loss_post"].min()) if len(evals) else math.nan,
            "final_acc_pre": final("eval_metric_pre"), "final_acc_post": final("eval_metric_post"),
            "sim_time_s": float(r["sim_time_s"].iloc[-1]) if len(r) else 0.0,
            "wall_time_s": float(summary.get("wall_time_s") or (r["wall_time_s"].iloc[-1] if len(r) else 0.0)),
            "updates_per_s": summary.get("steady_updates_per_s") or math.nan,
            "dropped": int(r["num_dropped"].sum()) if len(r) else 0,
        })
    table = pd.DataFrame(rows, columns=[c for c, _, _ in COLUMNS])
    if table["final_acc_post"].isna().all():  # regression: no accuracy columns
        table = table.drop(columns=["final_acc_pre", "final_acc_post"])
    return table


def format_cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if fmt == "d":
        return f"{int(value):,}"
    if fmt == "s":
        return str(value)
    return format(float(value), fmt)


def formatted_rows(table: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """Headers and formatted cells of a ``summary_table`` (shared by the terminal and HTML renderers)."""
    spec = [(c, h, f) for c, h, f in COLUMNS if c in table.columns]
    rows = [[format_cell(row[c], f) for c, _, f in spec] for _, row in table.iterrows()]
    return [h for _, h, _ in spec], rows


#: the order in which status counts are written; others follow alphabetically
STATUS_ORDER = ("completed", "interrupted", "failed", "stalled", "running/killed")


def grouping_of(runset: RunSet) -> Grouping:
    """The settings of a run set (computed from its configs when it was built by hand)."""
    return runset.grouping or group_settings([r.config for r in runset.runs])


def status_counts(statuses: list[str]) -> str:
    """``"3 completed"``, ``"2 completed, 1 failed"``; a run without a summary counts as running/killed."""
    counts = Counter("running/killed" if s == "running or killed" else s for s in statuses)
    order = [s for s in STATUS_ORDER if s in counts] + sorted(set(counts) - set(STATUS_ORDER))
    return ", ".join(f"{counts[s]} {s}" for s in order)


def _span(values: list[int]) -> str:
    low, high = min(values), max(values)
    return f"{low:,}" if low == high else f"{low:,}-{high:,}"


def setting_table(runset: RunSet, kind: str = "t") -> pd.DataFrame:
    """One row per setting: ``setting`` (its number), ``label``, ``short_label``, ``n`` (runs), ``runs`` (their
    names), ``loss`` and ``accuracy`` (``Interval`` over seeds of the final held-out post-adaptation values;
    no ``accuracy`` column for regression), ``rounds`` (completed, a range when the seeds differ),
    ``status`` (counts) and ``wall_time_s`` (mean over seeds)."""
    per_run = summary_table(runset)
    classification = "final_acc_post" in per_run.columns
    rows = []
    for setting in grouping_of(runset).settings:
        runs = per_run.iloc[list(setting.runs)]
        row: dict[str, Any] = {
            "setting": setting.number, "label": setting.label, "short_label": setting.short_label,
            "n": setting.n, "runs": runs["run"].tolist(), "loss": interval(runs["final_loss_post"], kind),
            "rounds": _span(runs["rounds"].astype(int).tolist()), "status": status_counts(runs["status"].tolist()),
            "wall_time_s": float(runs["wall_time_s"].mean()),
        }
        if classification:
            row["accuracy"] = interval(runs["final_acc_post"], kind)
        rows.append(row)
    columns = ["setting", "label", "short_label", "n", "runs", "loss", *(["accuracy"] if classification else []),
               "rounds", "status", "wall_time_s"]
    return pd.DataFrame(rows, columns=columns)


#: (column, header) of the formatted setting table, in order
SETTING_COLUMNS: tuple[tuple[str, str], ...] = (
    ("setting", "#"), ("label", "setting"), ("n", "n"), ("loss", "final loss post"),
    ("accuracy", "final acc post"), ("rounds", "rounds"), ("status", "status"), ("wall_time_s", "wall s (mean)"),
)


def setting_cells(table: pd.DataFrame, label: str = "label") -> tuple[list[str], list[list[str]]]:
    """Headers and formatted cells of a ``setting_table``; ``label="short_label"`` for the short labels,
    ``label=""`` for none (a separate listing)."""
    spec = [(c, h) for c, h in SETTING_COLUMNS if c in table.columns and (c != "label" or label)]
    rows = []
    for _, row in table.iterrows():
        cells = []
        for column, _ in spec:
            value = row[label] if column == "label" else row[column]
            if isinstance(value, Interval):
                cells.append(format_interval(value, ".4g" if column == "loss" else ".3f"))
            elif column == "wall_time_s":
                cells.append(format_cell(value, ".1f"))
            else:
                cells.append(str(value))
        rows.append(cells)
    return [h for _, h in spec], rows
