"""Analysis of run directories: load Parquet metrics into pandas frames."""

from analysis.load import Run, load_run

__all__ = ["Run", "load_run"]
