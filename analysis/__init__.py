"""Analysis of run directories: load Parquet metrics into pandas frames, plot them, report them."""

from analysis.load import Run, RunSet, load_run, load_runs, run_labels

__all__ = ["Run", "RunSet", "load_run", "load_runs", "run_labels"]
