"""``metafleet plot``, ``metafleet report`` and ``metafleet compare``, the figures of a finished run, and
``metafleet data`` (a configured dataset's clients and labels, before any run; ``analysis.datasets``).

Every run command takes run directories (or glob patterns), finished, in progress or killed. A path
that is not a run directory (or, for ``data``, a bad config or dataset) is bad input: one line naming
it, exit code 2, nothing written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from analysis.datasets import summarize_dataset, summary_lines, write_figure
from analysis.load import RunSet, load_runs
from analysis.plots import save_figures, standard_figures
from analysis.report import formatted_rows, summary_table, write_report
from simulator.config.schema import EXIT_BAD_INPUT, ConfigError
from simulator.experiment import load_config


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register the analysis subcommands on the ``metafleet`` parser."""
    plot = sub.add_parser("plot", help="write every applicable figure of one or several runs")
    plot.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories or glob patterns")
    plot.add_argument("--out", help="directory for the figures (default: RUN_DIR/figures for one run, "
                                    "./figures for several)")
    plot.add_argument("--format", choices=("png", "svg", "pdf"), default="png", help="figure format (default png)")
    report = sub.add_parser("report", help="write a self-contained HTML report (summary table and figures)")
    report.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories or glob patterns")
    report.add_argument("--out", help="HTML file or directory (default: RUN_DIR/report.html for one run, "
                                      "./report.html for several)")
    compare = sub.add_parser("compare", help="print the summary table of one or several runs")
    compare.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories or glob patterns")
    data = sub.add_parser("data", help="describe a config's dataset: clients, sizes, label skew, and a figure")
    data.add_argument("config", nargs="?", help="experiment TOML file (default: the quickstart)")
    data.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config key with a TOML value, e.g. --set data.num_clients=500 (repeatable)")
    data.add_argument("--out", help="figure file (default: ./data-<config name>.png)")


def _load(paths: list[str]) -> RunSet | None:
    missing = [p for p in paths if not any(ch in p for ch in "*?[") and not (Path(p) / "config.toml").is_file()]
    try:
        if missing:
            raise FileNotFoundError(f"{missing[0]!r} is not a metafleet run directory (no config.toml); "
                                    "pass directories written by `metafleet run`")
        return load_runs(paths)
    except (FileNotFoundError, OSError, ValueError) as exc:
        print(f"metafleet: error: {exc}", file=sys.stderr)
        return None


def _default_out(runset: RunSet, single: str, several: str) -> Path:
    return runset.runs[0].path / single if len(runset.runs) == 1 else Path(several)


def cmd_plot(args: argparse.Namespace) -> int:
    runset = _load(args.runs)
    if runset is None:
        return EXIT_BAD_INPUT
    out = Path(args.out) if args.out else _default_out(runset, "figures", "figures")
    paths = save_figures(standard_figures(runset), out, args.format)
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
        f"metafleet: {len(runset.runs)} runs compared"
    write_report(runset, standard_figures(runset), out, title)
    print(f"report of {len(runset.runs)} run(s): {out}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    runset = _load(args.runs)
    if runset is None:
        return EXIT_BAD_INPUT
    headers, rows = formatted_rows(summary_table(runset))
    table = Table(title=f"{len(runset.runs)} run(s)", header_style="bold")
    for i, h in enumerate(headers):
        table.add_column(h, justify="left" if i < 2 else "right", overflow="fold")
    for row in rows:
        table.add_row(*row)
    console = Console()
    if not console.is_terminal:  # piped or captured: do not fold cells to 80 columns
        console = Console(width=250)
    console.print(table)
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
