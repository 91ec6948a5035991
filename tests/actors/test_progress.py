"""The live progress line of ``metafleet run`` (``actors.cli._progress``): bar, count and ETA on one line at 80
columns, rendered by rich into a string as a terminal of that width would show it."""

from __future__ import annotations

import io
import math
import re

import pytest
from rich.console import Console
from rich.text import Text

from actors.cli import _progress
from simulator.experiment import load_config

BAR = re.compile(r"[━╸╺]{12,}")  # rich's bar glyphs, at least the narrow bar's 12 cells


def _render(width: int, name: str = "", rounds: int = 300, done: int = 120, evaluated: bool = True) -> str:
    buf = io.StringIO()
    console = Console(file=buf, width=width, force_terminal=True)
    cfg = load_config(None, [f"rounds={rounds}"] + ([f'name="{name}"'] if name else []))
    progress, on_round = _progress(cfg, True, console)
    nan = math.nan
    for r in range(done):
        first = evaluated and r == 0
        on_round({"round": r, "train_loss": 2.28984, "eval_loss_pre": 3.57402 if first else nan,
                  "eval_loss_post": 2.71326 if first else nan})
    console.print(progress.make_tasks_table(progress.tasks))
    return Text.from_ansi(buf.getvalue()).plain.rstrip("\n")


@pytest.mark.parametrize("name", ["", "a-rather-long-experiment-name-of-a-sweep-trial-t0007"])
def test_at_80_columns_the_bar_count_and_eta_stay_on_one_line(name):
    line = _render(80, name)
    assert "\n" not in line and len(line) <= 80
    assert BAR.search(line) and "120/300" in line and re.search(r"eta \d:\d\d:\d\d", line)
    assert line.endswith("held-out 3.57 -> 2.71")  # the info text shortened to fit, the latest held-out losses kept
    if name:
        assert "…" in line and name not in line  # a long name is cut, not the bar


def test_wide_terminals_show_elapsed_time_and_the_whole_info_text():
    line = _render(140)
    assert len(line) <= 140 and re.search(r"120/300 \d:\d\d:\d\d eta \d:\d\d:\d\d", line)
    assert line.endswith("train loss 2.29 | held-out loss 3.57 -> 2.71 adapted")


def test_very_narrow_terminals_drop_the_info_text_first_and_before_an_evaluation_show_the_train_loss():
    assert _render(80, evaluated=False).endswith("train loss 2.29")
    line = _render(60)
    assert "\n" not in line and len(line) <= 60 and "120/300" in line and "eta" in line and "held-out" not in line
