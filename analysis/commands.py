"""``metafleet plot``, ``metafleet report`` and ``metafleet compare``, the figures of a finished run, and
``metafleet data`` (a configured dataset's clients and labels, before any run; ``analysis.datasets``).

Every run command takes run directories (or glob patterns), finished, in progress or killed, and any
other directory (a sweep's) stands for the run directories found under it, recursively; a found run
without rounds yet is skipped with a one-line warning. A path that is neither (or, for ``data``, a bad
config or dataset) is bad input: one line naming it, exit code 2, nothing written. Seeds of a setting
(``analysis.settings``) are aggregated: ``--ci t`` (default) draws and prints the 95% Student-t
confidence interval of the mean over seeds, ``--ci minmax`` the min-max range.
"""

from __future__ import annotations

import argparse
import glob
import shutil
import sys
import warnings
from pathlib import Path

from analysis.datasets import summarize_dataset, summary_lines, write_figure
from analysis.load import RunSet, load_runs
from analysis.plots import save_figures, standard_figures
from analysis.report import write_report
from analysis.stats import KINDS
from analysis.terminal import compare_lines
from simulator.config.schema import EXIT_BAD_INPUT, ConfigError
from simulator.experiment import load_config

_RUNS_HELP = "run directories, glob patterns, or directories holding run directories (a sweep)"


def _ci(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ci", choices=KINDS, default="t",
                        help="interval over the seeds of a setting: t = 95%% Student-t confidence interval of the "
                             "mean (default), minmax = the min-max range")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register the analysis subcommands on the ``metafleet`` parser."""
    plot = sub.add_parser("plot", help="write every applicable figure of one or several runs")
    plot.add_argument("runs", nargs="+", metavar="RUN_DIR", help=_RUNS_HELP)
    plot.add_argument("--out", help="directory for the figures (default: RUN_DIR/figures for one run, "
                                    "./figures for several)")
    plot.add_argument("--format", choices=("png", "svg", "pdf"), default="png", help="figure format (default png)")
    _ci(plot)
    report = sub.add_parser("report", help="write a self-contained HTML report (summary table and figures)")
    report.add_argument("runs", nargs="+", metavar="RUN_DIR", help=_RUNS_HELP)
    report.add_argument("--out", help="HTML file or directory (default: RUN_DIR/report.html for one run, "
                                      "./report.html for several)")
    _ci(report)
    compare = sub.add_parser("compare", help="print one row per setting (seeds aggregated) of one or several runs")
    compare.add_argument("runs", nargs="+", metavar="RUN_DIR", help=_RUNS_HELP)
    _ci(compare)
    compare.add_argument("--wide", action="store_true",
                         help="one line per setting with its full label, whatever the terminal's width")
    compare.add_argument("--runs", dest="per_run", action="store_true",
                         help="also print one row per run (with its setting's number)")
    data = sub.add_parser("data", help="describe a config's dataset: clients, sizes, label skew, and a figure")
    data.add_argument("config", nargs="?", help="experiment TOML file (default: the quickstart)")
    data.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config key with a TOML value, e.g. --set data.num_clients=500 (repeatable)")
    data.add_argument("--out", help="figure file (default: ./data-<config name>.png)")


def _load(paths: list[str]) -> RunSet | None:
    """The runs named by ``paths``, warnings (runs skipped, unreadable parts) printed one line each; None
    after printing the error line when a path names no run."""
    missing = [p for p in paths if not glob.has_magic(p) and not (Path(p) / "config.toml").is_file()
               and not Path(p).is_dir()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        try:
            if missing:
                raise FileNotFoundError(f"{missing[0]!r} is not a metafleet run directory (no config.toml); "
                                        "pass directories written by `metafleet run`, or a directory holding them")
            runset: RunSet | None = load_runs(paths)
            error = None
        except (FileNotFoundError, OSError, ValueError) as exc:
            runset, error = None, exc
    for warning in caught:
        print(f"metafleet: warning: {warning.message}", file=sys.stderr)
    if error is not None:
        print(f"metafleet: error: {error}", file=sys.stderr)
    return runset


def _default_out(runset: RunSet, single: str, several: str) -> Path:
    return runset.runs[0].path / single if len(runset.runs) == 1 else Path(several)


def cmd_plot(args: argparse.Namespace) -> int:
    runset = _load(args.runs)
    if runset is None:
        return EXIT_BAD_INPUT
    out = Path(args.out) if args.out else _default_out(runset, "figures", "figures")
    paths = save_figures(standard_figures(runset, args.ci), out, args.format)
    print(f"{len(paths)} figures of {len(runset.runs)} run(s) in {out}/: {', '.join(p.name for p in paths)}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    runset = _load(args.runs)
    if runset is None:
        return EXIT_BAD_INPUT
    out = Path(args.out) if args.out else _default_out(runset, "report.html", "report.html")
    if out.is_dir() or not out.suffix:
        out = out / "report.html"
    title = f"metafleet: {runset.runs[0].path.name}" if len(runset.runs) == 1 else \
        f"metafleet: {len(runset.runs)} runs in {len(set(runset.labels))} settings compared"
    write_report(runset, standard_figures(runset, args.ci), out, title, args.ci)
    print(f"report of {len(runset.runs)} run(s): {out}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    runset = _load(args.runs)
    if runset is None:
        return EXIT_BAD_INPUT
    width = None if args.wide else (shutil.get_terminal_size((80, 24)).columns if sys.stdout.isatty() else 80)
    for line in compare_lines(runset, args.ci, width, args.per_run):
        print(line)
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, args.overrides)
        summary = summarize_dataset(cfg)
    except ConfigError as exc:
        print(f"metafleet: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    for line in summary_lines(summary):
        print(line)
    path = write_figure(summary, args.out or f"data-{cfg.name}.png")
    print(f"figure: {path}")
    return 0


def figures_of_run(run_dir: Path) -> list[Path]:
    """The standard figures of one run, written into ``RUN_DIR/figures/``."""
    return save_figures(standard_figures(load_runs([run_dir])), run_dir / "figures", "png")
