"""A self-contained HTML report of one or several runs.

The page has, in order: per setting (``analysis.settings``: runs that differ only in the seed and
execution-only keys) the final held-out metrics as a mean with a 95% Student-t confidence interval or a
min-max range over seeds (``analysis.tables.setting_table``); each setting's config differences from the
base, and the base config itself once; one row per run (``analysis.tables.summary_table``) with a
relative link to its run directory and to its own ``report.html`` and ``figures/`` where they exist; and
every figure, embedded as a base64 PNG. The page fetches nothing: no external files, scripts or fonts
(the links lead to the runs' directories, relative to the report's own).
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

from matplotlib.figure import Figure

from analysis.load import Run, RunSet
from analysis.settings import Grouping, format_value
from analysis.stats import describe
from analysis.tables import formatted_rows, grouping_of, setting_cells, setting_table, summary_table
from simulator.rundir.files import atomic_write_bytes


def figure_png(fig: Figure, dpi: int = 110) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    return base64.b64encode(buf.getvalue()).decode("ascii")


_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1100px;
       color: #1b1b1b; padding: 0 1rem; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.15rem; margin-top: 2rem; }
table { border-collapse: collapse; font-size: 0.85rem; margin: 0.5rem 0; }
th, td { border-bottom: 1px solid #ddd; padding: 0.3rem 0.6rem; text-align: right; }
th { background: #f3f3f3; } td:nth-child(-n+2), th:nth-child(-n+2) { text-align: left; }
table.config td, table.config th { text-align: left; }
figure { margin: 1.5rem 0; } img { max-width: 100%; } figcaption { color: #555; font-size: 0.85rem; }
code { background: #f3f3f3; padding: 0 0.2rem; } p.note { color: #555; font-size: 0.85rem; }
"""

esc = html.escape


def href(target: Path, base: Path, directory: bool = False) -> str:
    """``target`` relative to the directory ``base`` (the report's), URL-quoted, ``/``-ended for a directory."""
    relative = Path(os.path.relpath(target.resolve(), base.resolve())).as_posix()
    return quote(relative) + ("/" if directory and not relative.endswith("/") else "")


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], ident: str, cls: str = "",
           raw: bool = False) -> str:
    """An HTML table; cells are escaped unless ``raw`` (cells already HTML)."""
    cell = (lambda c: c) if raw else esc
    attrs = f' id="{ident}"' + (f' class="{cls}"' if cls else "")
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in row) + "</tr>\n" for row in rows)
    return f"<table{attrs}><thead><tr>{head}</tr></thead><tbody>\n{body}</tbody></table>"


def run_links(run: Run, base: Path) -> list[str]:
    """HTML links to a run's directory and, when present, its own report and figures."""
    links = [f'<a href="{esc(href(run.path, base, directory=True))}">run directory</a>']
    if (run.path / "report.html").is_file():
        links.append(f'<a href="{esc(href(run.path / "report.html", base))}">report</a>')
    if (run.path / "figures").is_dir():
        links.append(f'<a href="{esc(href(run.path / "figures", base, directory=True))}">figures</a>')
    return links


def _settings_section(runset: RunSet, kind: str) -> list[str]:
    headers, rows = setting_cells(setting_table(runset, kind), "label")
    return ["<h2>Settings</h2>",
            f"<p class=\"note\">Runs that differ only in the seed and execution-only keys are one setting; final "
            f"held-out values after adaptation, mean and {esc(describe(kind))} over its n seeds "
            "(none for a single seed).</p>", _table(headers, rows, "settings")]


def _config_section(runset: RunSet, grouping: Grouping, base: Path) -> list[str]:
    """The differences of each setting from the base (with links to its runs), then the base itself."""
    parts = ["<h2>Configuration</h2>"]
    if grouping.differing:
        names = [r.path.name for r in runset.runs]
        rows = []
        for setting in grouping.settings:
            values = dict(setting.values)
            links = ", ".join(f'<a href="{esc(href(runset.runs[i].path, base, directory=True))}">{esc(names[i])}</a>'
                              for i in setting.runs)
            rows.append([esc(str(setting.number)), *[esc(format_value(values[k])) for k in grouping.differing],
                         esc(str(setting.n)), links])
        parts += ["<p>What each setting changes from the base configuration below:</p>",
                  _table(["#", *grouping.differing, "n", "runs"], rows, "differences", "config", raw=True)]
    if grouping.varying:
        parts.append("<p class=\"note\">Differing between runs without making settings (seeds are aggregated, "
                     "execution-only keys change no numbers): " + ", ".join(f"<code>{esc(k)}</code>"
                                                                           for k in grouping.varying) + "</p>")
    title = "Base configuration (common to all runs)" if len(runset.runs) > 1 else "Configuration of the run"
    parts += [f"<h3>{title}</h3>",
              _table(["key", "value"], [[k, format_value(v)] for k, v in grouping.base], "base", "config")]
    return parts


def _runs_section(runset: RunSet, grouping: Grouping, base: Path) -> list[str]:
    headers, rows = formatted_rows(summary_table(runset))
    cells = []
    for index, (run, row) in enumerate(zip(runset.runs, rows, strict=True)):
        linked = [f'<a href="{esc(href(run.path, base, directory=True))}">{esc(row[0])}</a>',
                  *[esc(c) for c in row[1:]]]
        cells.append([*linked, esc(str(grouping.setting_of(index).number)), " ".join(run_links(run, base))])
    return ["<h2>Runs</h2>", _table([*headers, "#", "links"], cells, "summary", raw=True)]


def html_report(runset: RunSet, figures: dict[str, Figure], title: str = "metafleet report",
                base: Path | None = None, kind: str = "t") -> str:
    """The self-contained HTML page; links are relative to ``base``, the directory the page is written to
    (default: the current directory). ``kind``: the interval over seeds, ``"t"`` or ``"minmax"``."""
    base = Path.cwd() if base is None else base
    grouping = grouping_of(runset)
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{esc(title)}</title>",
             f"<style>{_STYLE}</style></head><body>", f"<h1>{esc(title)}</h1>",
             f"<p>{len(runset.runs)} run(s) in {len(grouping.settings)} setting(s): "
             + ", ".join(f"<code>{esc(str(r.path))}</code>" for r in runset.runs) + "</p>"]
    if len(runset.runs) > 1:
        parts += _settings_section(runset, kind)
    parts += _config_section(runset, grouping, base)
    parts += _runs_section(runset, grouping, base)
    parts.append("<h2>Figures</h2>")
    for stem, fig in figures.items():
        caption = fig.get_suptitle() or next((ax.get_title() for ax in fig.axes if ax.get_title()), stem)
        parts.append(f"<figure id=\"{esc(stem)}\"><img alt=\"{esc(caption)}\" "
                     f"src=\"data:image/png;base64,{figure_png(fig)}\"><figcaption>{esc(stem)}: {esc(caption)}"
                     "</figcaption></figure>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_report(runset: RunSet, figures: dict[str, Figure], path: Path, title: str = "metafleet report",
                 kind: str = "t") -> Path:
    """The self-contained HTML report, written atomically to ``path`` (links relative to its directory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, html_report(runset, figures, title, path.parent, kind).encode("utf-8"))
    return path
