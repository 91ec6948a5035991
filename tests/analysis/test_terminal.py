"""``metafleet compare`` on a real sweep: one row per setting, 80 columns, ``--wide``, ``--ci``, ``--runs``."""

from __future__ import annotations

import pytest
from sweep_runs import PENDING, make_sweep, run

from actors.cli import main
from analysis import load_runs
from analysis.stats import format_interval
from analysis.tables import setting_table
from analysis.terminal import layout

pytestmark = pytest.mark.filterwarnings("ignore:.*no rounds written yet:UserWarning")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    return make_sweep(tmp_path_factory.mktemp("terminal"))


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """A third setting whose label has a long word: no room for labels beside the numbers in 80 columns."""
    return run(tmp_path_factory.mktemp("deep") / "deep", **{"model.hidden": [16] * 12})


def _compare(capsys, *args: str) -> tuple[list[str], str]:
    assert main(["compare", *args]) == 0
    out = capsys.readouterr()
    return out.out.splitlines(), out.err


def _rows(lines: list[str]) -> list[str]:
    """The lines after the table's dashed rule, up to the first blank line."""
    start = next(i for i, line in enumerate(lines) if set(line) <= {"-", " "} and line.startswith("-")) + 1
    end = next((i for i in range(start, len(lines)) if not lines[i]), len(lines))
    return lines[start:end]


def test_compare_fits_80_columns_with_labels_wrapped_in_the_table(sweep, capsys):
    lines, err = _compare(capsys, str(sweep))
    assert all(len(line) <= 80 for line in lines), max(lines, key=len)
    assert err.count("\n") == 1 and err.startswith("metafleet: warning:") and PENDING in err
    assert lines[0].startswith("2 setting(s) of 6 run(s). Final held-out values after adaptation")
    rows = _rows(lines)
    assert len(rows) > 2  # the labels wrap onto following lines
    text = " ".join(rows)
    for part in ("algorithm.name=maml,", "server_optimizer=adam", "server_lr=0.003", "3 completed, 1",
                 "running/killed", "2 completed"):
        assert part in text
    losses = setting_table(load_runs(sweep))["loss"]
    assert rows[0].startswith("1  algorithm.name=reptile,") and f"  4  {format_interval(losses[0])}" in rows[0]
    maml = next(r for r in rows if r.startswith("2  "))
    assert f"  2  {format_interval(losses[1])}" in maml


def test_compare_lists_labels_by_number_when_they_do_not_fit(sweep, deep, capsys):
    lines, _ = _compare(capsys, str(sweep), str(deep))
    assert all(len(line) <= 80 for line in lines), max(lines, key=len)
    assert "settings (the keys on which they differ):" in lines
    listing = lines[lines.index("settings (the keys on which they differ):") + 1:]
    assert listing[0] == "  1  algorithm.name=reptile, hidden=[40,40], server_lr=1.0, server_optimizer=sgd"
    assert any(line.startswith("  3  ") for line in listing)
    assert "hidden=[16,16,16,16,16,16,16,16,16,16,16,16]" in " ".join(listing)
    assert [r[:3] for r in _rows(lines) if r[:1].strip()] == ["1  ", "2  ", "3  "]


def test_compare_wide_prints_one_line_per_setting(sweep, deep, capsys):
    lines, _ = _compare(capsys, str(sweep), str(deep), "--wide")
    rows = _rows(lines)
    assert len(rows) == 3 and max(len(line) for line in lines) > 80
    assert rows[0].startswith("1  algorithm.name=reptile, model.hidden=[40,40], algorithm.server_lr=1.0, "
                              "algorithm.server_optimizer=sgd  ")
    assert rows[1].startswith("2  algorithm.name=maml, model.hidden=[40,40], algorithm.server_lr=0.003, "
                              "algorithm.server_optimizer=adam  ")
    assert "(n=1)" in rows[2]  # one seed: no interval, said so


def test_compare_min_max_and_per_run_rows(sweep, capsys):
    lines, _ = _compare(capsys, str(sweep / "trials"), "--ci", "minmax", "--runs")
    assert all(len(line) <= 80 for line in lines), max(lines, key=len)
    interval = setting_table(load_runs(sweep), "minmax")["loss"][1]
    assert "mean [min, max] over the n seeds" in " ".join(lines[:3])
    assert any(format_interval(interval) in line for line in _rows(lines))
    per_run = lines[lines.index("6 run(s):") + 1:]
    assert sum(line.startswith(("1  t000", "2  t000")) for line in per_run) == 6


def test_layout_wraps_the_widest_cells_or_gives_up():
    headers, rows = ["#", "setting", "n"], [["1", "a=1, b=2, c=3", "3"]]
    assert layout(headers, rows, None) == ["#  setting        n", "-  -------------  -", "1  a=1, b=2, c=3  3"]
    assert layout(headers, rows, 14) == ["#  setting   n", "-  --------  -", "1  a=1,      3", "   b=2, c=3"]
    assert layout(headers, rows, 13) == ["#  setting  n", "-  -------  -", "1  a=1,     3", "   b=2,", "   c=3"]
    assert layout(headers, rows, 10) is None  # "setting" cannot break
    assert layout(headers, rows, 10, frozenset({1}), narrowest=4) == [
        "#  sett  n", "   ing", "-  ----  -", "1  a=1,  3", "   b=2,", "   c=3"]
    # a number never wraps, its header does
    numbers = layout(["#", "final loss post"], [["1", "0.39 ± 0.01"]], 14)
    assert numbers == ["#   final loss", "          post", "-  -----------", "1  0.39 ± 0.01"]
    assert layout(["#", "final loss post"], [["1", "0.39 ± 0.01"]], 13) is None
