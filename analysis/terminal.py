"""Plain-text tables for the terminal that fit a given width, and the lines ``metafleet compare`` prints.

``layout`` puts a table in ``width`` columns by wrapping the widest cells onto following lines (at spaces;
run names may also break inside a word), and gives up (None) when even the narrowest wrapping is too wide.
``compare_lines`` prints one row per setting: when the labels do not fit beside the numbers, the table
names each setting by its number and the labels follow, wrapped, keyed by that number. With
``width=None`` (``--wide``) every setting is one line whatever its length.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

from analysis.load import RunSet
from analysis.stats import LEVEL
from analysis.tables import formatted_rows, grouping_of, setting_cells, setting_table, summary_table

GAP = 2
#: the narrowest a breakable column (run names) is wrapped to
BREAK_MIN = 12
#: headers of right-aligned (numeric) columns, whose cells never wrap
RIGHT = frozenset({"#", "n", "seed", "rounds", "final loss post", "final acc post", "wall s (mean)", "wall s",
                   "final loss pre", "best loss post", "final acc pre", "simulated s", "updates/s (steady)",
                   "client updates", "dropped"})
#: per-run columns that fit beside each other in 80 columns (``--wide`` prints all of ``COLUMNS``)
NARROW_RUN_COLUMNS = ("run", "seed", "status", "rounds", "final loss post", "final acc post", "wall s",
                      "updates/s (steady)")


def _longest_word(cell: str) -> int:
    return max((len(w) for w in cell.split()), default=0)


def layout(headers: Sequence[str], rows: Sequence[Sequence[str]], width: int | None,
           breakable: frozenset[int] = frozenset(), narrowest: int = BREAK_MIN) -> list[str] | None:
    """The table's lines, none longer than ``width`` (any length with None), or None when it cannot fit.

    Headers wrap first, then cells at spaces, except the numbers of ``RIGHT`` columns; columns in
    ``breakable`` also break inside words, down to ``narrowest``, when that is not enough. At each stage the
    widest column that can still shrink shrinks first. A dashed rule follows the header."""
    table = [list(headers), *[list(r) for r in rows]]
    count = len(headers)
    widths = [max(len(r[c]) for r in table) for c in range(count)]
    if width is not None:
        headers_only = [max(_longest_word(table[0][c]), *(len(r[c]) for r in table[1:])) for c in range(count)]
        words = [headers_only[c] if table[0][c] in RIGHT else max(_longest_word(r[c]) for r in table)
                 for c in range(count)]
        broken = [min(words[c], narrowest) if c in breakable else words[c] for c in range(count)]
        # wrap the headers first, then cells at spaces, and break inside words only when that is not enough
        for floor in (headers_only, words, broken):
            while sum(widths) + GAP * (count - 1) > width:
                shrinkable = [c for c in range(count) if widths[c] > floor[c]]
                if not shrinkable:
                    break
                widths[max(shrinkable, key=lambda c: (widths[c], -c))] -= 1
        if sum(widths) + GAP * (count - 1) > width:
            return None
    lines = []
    for index, row in enumerate(table):
        wrapped = [textwrap.wrap(cell, widths[c], break_long_words=c in breakable, break_on_hyphens=False) or [""]
                   if width is not None else [cell] for c, cell in enumerate(row)]
        for k in range(max(len(w) for w in wrapped)):
            parts = [(w[k] if k < len(w) else "") for w in wrapped]
            lines.append((" " * GAP).join(p.rjust(widths[c]) if table[0][c] in RIGHT else p.ljust(widths[c])
                                          for c, p in enumerate(parts)).rstrip())
        if index == 0:
            lines.append((" " * GAP).join("-" * w for w in widths))
    return lines


def _wrap(text: str, width: int | None, indent: str = "") -> list[str]:
    if width is None:
        return [text]
    return textwrap.wrap(text, width, subsequent_indent=indent, break_on_hyphens=False) or [""]


def _force(headers: Sequence[str], rows: Sequence[Sequence[str]], width: int | None) -> list[str]:
    """``layout``, breaking every column inside words when wrapping at spaces is not enough."""
    every = frozenset(range(len(headers)))
    for breakable, narrowest in ((frozenset(), BREAK_MIN), (every, BREAK_MIN), (every, 1)):
        fitted = layout(headers, rows, width, breakable, narrowest)
        if fitted is not None:
            return fitted
    return layout(headers, rows, None) or []


def setting_lines(runset: RunSet, kind: str = "t", width: int | None = 80) -> list[str]:
    """One row per setting (number, label, seeds, final held-out loss and accuracy over seeds, rounds,
    status counts, wall time), fitted to ``width``; ``None``: one line per setting with the full labels."""
    table = setting_table(runset, kind)
    grouping = grouping_of(runset)
    what = f"mean ± half-width of the {LEVEL:.0%} Student-t confidence interval" if kind == "t" else "mean [min, max]"
    lines = _wrap(f"{len(table)} setting(s) of {len(runset.runs)} run(s). Final held-out values after adaptation: "
                  f"{what} over the n seeds", width)
    if grouping.varying:
        lines += _wrap(f"runs of a setting differ only in: {', '.join(grouping.varying)}", width, "  ")
    lines.append("")
    if width is None:
        headers, rows = setting_cells(table, "label")
        return lines + (layout(headers, rows, None) or [])
    headers, rows = setting_cells(table, "short_label")
    fitted = layout(headers, rows, width)
    if fitted is not None:
        return lines + fitted
    headers, rows = setting_cells(table, "")
    lines += _force(headers, rows, width)
    lines += ["", "settings (the keys on which they differ):"]
    number = max(len(str(n)) for n in table["setting"]) + 2
    for _, row in table.iterrows():
        head = f"{row['setting']:>{number}}  "
        wrapped = textwrap.wrap(row["short_label"], width - len(head), break_on_hyphens=False) or [""]
        lines += [head + wrapped[0], *[" " * len(head) + w for w in wrapped[1:]]]
    return lines


def run_lines(runset: RunSet, width: int | None = 80) -> list[str]:
    """One row per run with its setting's number; with ``width`` only ``NARROW_RUN_COLUMNS``."""
    table = summary_table(runset)
    grouping = grouping_of(runset)
    numbers = [str(grouping.setting_of(i).number) for i in range(len(runset.runs))]
    headers, rows = formatted_rows(table)
    keep = [i for i, h in enumerate(headers) if h != "setting" and (width is None or h in NARROW_RUN_COLUMNS)]
    headers = ["#", *[headers[i] for i in keep]]
    rows = [[n, *[row[i] for i in keep]] for n, row in zip(numbers, rows, strict=True)]
    fitted = layout(headers, rows, width, frozenset({1})) if width is not None else layout(headers, rows, None)
    return [f"{len(rows)} run(s):", *(fitted if fitted is not None else _force(headers, rows, width))]


def compare_lines(runset: RunSet, kind: str = "t", width: int | None = 80, runs: bool = False) -> list[str]:
    """What ``metafleet compare`` prints: the setting table, and with ``runs`` the per-run table after it."""
    lines = setting_lines(runset, kind, width)
    if runs:
        lines += ["", *run_lines(runset, width)]
    return lines

