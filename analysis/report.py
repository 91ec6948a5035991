"""Summary tables and a self-contained HTML report of one or several runs.

``summary_table`` is the table ``metafleet compare`` prints and the report opens with: per run,
the final and best held-out metrics, simulated and wall time, client updates per second and
drops. ``html_report`` embeds every figure (PNG, base64) and the table in one HTML file that can
be shared on its own: no external files, scripts or fonts.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from analysis.load import RunSet
from simulator.rundir.files import atomic_write_bytes

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
            "sim_time_s": float(r["sim_time"].iloc[-1]) if len(r) else 0.0,
            "wall_time_s": float(summary.get("wall_time_s") or (r["wall_time"].iloc[-1] if len(r) else 0.0)),
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


def figure_png(fig: Figure, dpi: int = 110) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    return base64.b64encode(buf.getvalue()).decode("ascii")


_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1100px;
       color: #1b1b1b; padding: 0 1rem; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.15rem; margin-top: 2rem; }
table { border-collapse: collapse; font-size: 0.85rem; }
th, td { border-bottom: 1px solid #ddd; padding: 0.3rem 0.6rem; text-align: right; }
th { background: #f3f3f3; } td:nth-child(-n+2), th:nth-child(-n+2) { text-align: left; }
figure { margin: 1.5rem 0; } img { max-width: 100%; } figcaption { color: #555; font-size: 0.85rem; }
code { background: #f3f3f3; padding: 0 0.2rem; }
"""


def html_report(runset: RunSet, figures: dict[str, Figure], title: str = "metafleet report") -> str:
    """A self-contained HTML page: the summary table, then every figure embedded as a PNG."""
    headers, rows = formatted_rows(summary_table(runset))
    esc = html.escape
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{esc(title)}</title>",
             f"<style>{_STYLE}</style></head><body>", f"<h1>{esc(title)}</h1>",
             f"<p>{len(runset.runs)} run(s): " + ", ".join(f"<code>{esc(str(r.path))}</code>" for r in runset.runs)
             + "</p>", "<h2>Summary</h2>", "<table id=\"summary\"><thead><tr>"
             + "".join(f"<th>{esc(h)}</th>" for h in headers) + "</tr></thead><tbody>"]
    parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows]
    parts.append("</tbody></table>")
    parts.append("<h2>Figures</h2>")
    for stem, fig in figures.items():
        caption = fig.get_suptitle() or next((ax.get_title() for ax in fig.axes if ax.get_title()), stem)
        parts.append(f"<figure id=\"{esc(stem)}\"><img alt=\"{esc(caption)}\" "
                     f"src=\"data:image/png;base64,{figure_png(fig)}\"><figcaption>{esc(stem)}: {esc(caption)}"
                     "</figcaption></figure>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_report(runset: RunSet, figures: dict[str, Figure], path: Path, title: str = "metafleet report") -> Path:
    """The self-contained HTML report, written atomically to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, html_report(runset, figures, title).encode("utf-8"))
    return path
