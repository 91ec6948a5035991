"""Analysis of run directories: load Parquet metrics into pandas frames, plot them, report them."""

from analysis.load import Run, RunSet, load_run, load_runs, run_labels
from analysis.settings import group_settings

__all__ = ["Run", "RunSet", "group_settings", "load_run", "load_runs", "run_labels"]
