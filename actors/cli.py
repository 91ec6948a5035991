"""``metafleet`` command line: ``metafleet run [CONFIG.toml] [--set key.sub=value ...] [--out DIR]``, and
``metafleet run --resume RUN_DIR``, and ``metafleet plot | report | compare | data`` (``analysis.commands``).

This is the composition root: the one module that knows the core (``simulator``), the backends
(``actors``) and ``analysis``. ``simulator`` never imports ``actors`` or ``analysis``, and ``analysis``
never imports ``actors``; this module sits above all three (the console script ``metafleet`` is its ``main``).

Bad input (config, flags, model factory, cluster address) is reported as one line naming the
key and the fix, with exit code 2 and no traceback, before any run directory is created.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import ray
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Column

from actors import api, sweep
from analysis import commands
from analysis.datasets import all_clients_note
from simulator.algorithms.registry import ALGORITHMS
from simulator.config.schema import EXIT_BAD_INPUT, ConfigError, ExperimentConfig
from simulator.rundir.files import RunDirWriteError
from simulator.study import read_study

EXIT_FAILED = 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metafleet", description="Ray-parallel federated meta-learning simulator")
    parser.add_argument("--version", action="version", version=f"metafleet {_version()}")
    sub = parser.add_subparsers(dest="command")
    algorithms = "\n".join(f"  {name:<14}{a.summary}" for name, a in ALGORITHMS.items())
    run = sub.add_parser("run", help="run an experiment (the built-in quickstart when no CONFIG is given)",
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         epilog=f"algorithms (--set algorithm.name=...):\n{algorithms}\n  or --set "
                                "algorithm.factory=\"package.module:function\" returning your own Algorithm record")
    run.add_argument("config", nargs="?", help="experiment TOML file (default: Reptile on sinusoid, 1,000 clients)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key with a TOML value, e.g. --set model.hidden=[64] (repeatable)")
    run.add_argument("--out", help="run directory to create (default: runs/<name>-<timestamp>)")
    run.add_argument("--name", help="the run's name (default: ALGORITHM-DATASET), used for runs/<name>-<timestamp>")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped or killed run from its last checkpoint "
                     "(its own config.toml; --set may change rounds and execution keys such as system.actors)")
    run.add_argument("--address", help="Ray address: '' starts a local Ray, 'auto' or HOST:PORT joins a cluster")
    run.add_argument("--tensorboard", metavar="DIR", help="log to TensorBoard: 'run' = RUN_DIR/tensorboard, or a "
                     "directory (= --set tracking.tensorboard=...; needs the [tensorboard] extra)")
    run.add_argument("--mlflow", metavar="URI", help="log to MLflow at this tracking URI, e.g. file:./mlruns "
                     "(= --set tracking.mlflow_uri=...; needs the [mlflow] extra)")
    run.add_argument("--no-progress", action="store_true", help="no live progress bar (one line per eval instead)")
    run.add_argument("--no-plots", action="store_true", help="do not write the standard figures at the end")
    run.add_argument("-v", "--verbose", action="store_true", help="log worker placement and Ray messages")
    sw = sub.add_parser("sweep", help="run a study's trials (grid x zip x seeds) concurrently on one Ray")
    sw.add_argument("study", nargs="?", help="study TOML: an experiment config plus a [sweep] table")
    sw.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a key of the base config (repeatable)")
    sw.add_argument("--out", help="sweep directory to create (default: sweeps/<name>-<timestamp>)")
    sw.add_argument("--resume", metavar="SWEEP_DIR", help="re-run the trials of a sweep that did not complete, each "
                    "from its own checkpoint")
    sw.add_argument("--address", help="Ray address: '' starts a local Ray, 'auto' or HOST:PORT joins a cluster")
    sw.add_argument("--no-progress", action="store_true", help="no live status table (one line per finished trial)")
    sw.add_argument("-v", "--verbose", action="store_true", help="log Ray's and Tune's messages")
    commands.add_parsers(sub)
    return parser


def _fmt(x: Any, digits: int = 4) -> str:
    """A summary or row value: "n/a" where it was not measured (None in summary.json, NaN in a row), the text
    of one that JSON cannot hold as a number ("inf")."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return x if isinstance(x, str) else f"{x:.{digits}g}"


def _print_summary(summary: dict[str, Any], run_dir: Path) -> None:
    out = sys.stdout
    unit = "server updates" if summary["mode"] == "async" else "rounds"
    print(f"\n{summary['status']}: {summary['rounds_completed']}/{summary['rounds_planned']} {unit} of "
          f"{summary['algorithm']} on {summary['dataset']} ({summary['mode']}), {summary['client_updates']} "
          f"client updates in "
          f"{summary['wall_time_s']:.1f} s wall ({_fmt(summary['steady_updates_per_s'])} updates/s steady), "
          f"{summary['sim_time_s']:.0f} s simulated", file=out)
    first, final = summary["first_eval"], summary["final_eval"]
    if final:
        print(f"held-out clients ({summary['eval_clients']}), loss on their query sets after round "
              f"{final['round']}: {_fmt(final['eval_loss_pre'])} before adaptation -> "
              f"{_fmt(final['eval_loss_post'])} after {summary['adapt_steps']} adaptation steps "
              f"(after round {first['round']}: {_fmt(first['eval_loss_pre'])} -> {_fmt(first['eval_loss_post'])})",
              file=out)
        if final["eval_metric_post"] is not None:  # null: a regression task has no accuracy
            print(f"held-out accuracy: {_fmt(final['eval_metric_pre'], 3)} before -> "
                  f"{_fmt(final['eval_metric_post'], 3)} after adaptation "
                  f"(after round {first['round']}: {_fmt(first['eval_metric_post'], 3)})", file=out)
    drops = {k: v for k, v in summary["dropped"].items() if v}
    if drops:
        print("dropped client updates: " + ", ".join(f"{v} {k}" for k, v in drops.items()), file=out)
    files = sorted(p.name for p in run_dir.iterdir() if not p.name.startswith("."))
    print(f"results: {run_dir}/ ({', '.join(files)})", file=out)


#: the progress line's name column at most (longer names end in an ellipsis); its bar on narrow terminals
NAME_WIDTH, NARROW, NARROW_BAR, WIDE_BAR = 24, 100, 12, 30


def _info(width: int, train: float, pre: float | None = None, post: float | None = None) -> str:
    """The progress line's text after the ETA, as long as fits ``width`` characters: train loss and the latest
    held-out losses before -> after adaptation, shortened, then dropped (the bar, count and ETA stay)."""
    tl = _fmt(train, 3)
    if pre is None or post is None:
        candidates = [f"train loss {tl}", f"loss {tl}"]
    else:
        held = f"{_fmt(pre, 3)} -> {_fmt(post, 3)}"
        candidates = [f"train loss {tl} | held-out loss {held} adapted", f"train loss {tl} | held-out {held}",
                      f"loss {tl} | held-out {held}", f"held-out {held}", f"loss {tl}"]
    return next((c for c in candidates if len(c) <= width), "")


def _progress(cfg: ExperimentConfig, enabled: bool, console: Console | None = None):
    """The live progress line, laid out for the terminal's width: name, bar, count, (elapsed,) ETA and as much of
    the loss text as fits, on one line also at 80 columns."""
    console = console or Console(stderr=True)
    width = console.width
    unit = "server updates" if cfg.system.mode == "async" else "rounds"
    name = f"{cfg.name} {unit}"
    name_width = min(len(name), NAME_WIDTH)
    narrow = width < NARROW
    bar = NARROW_BAR if narrow else WIDE_BAR
    count = 2 * len(str(cfg.rounds)) + 1
    times = 1 if narrow else 2  # h:mm:ss each; narrow terminals show the ETA only
    columns = [TextColumn("[bold]{task.description}", table_column=Column(no_wrap=True, overflow="ellipsis",
                                                                          max_width=name_width)),
               BarColumn(bar_width=bar), MofNCompleteColumn(), *([] if narrow else [TimeElapsedColumn()]),
               TextColumn("eta"), TimeRemainingColumn(),
               TextColumn("{task.fields[info]}", table_column=Column(no_wrap=True, overflow="ellipsis"))]
    # one space between columns; what is left after the fixed columns is the info text's
    room = width - (name_width + bar + count + 3 + 7 * times) - (len(columns) - 1) - 1
    progress = Progress(*columns, console=console, disable=not enabled, transient=False)
    task = progress.add_task(name, total=cfg.rounds, info="")
    state: dict[str, float | None] = {"pre": None, "post": None}

    def on_round(row: dict[str, Any]) -> None:
        if not math.isnan(row["eval_loss_post"]):
            state["pre"], state["post"] = row["eval_loss_pre"], row["eval_loss_post"]
            if not enabled:
                print(f"round {row['round']}: train loss {_fmt(row['train_loss'], 4)} | held-out loss "
                      f"{_fmt(state['pre'], 3)} -> {_fmt(state['post'], 3)} adapted", file=sys.stderr, flush=True)
        progress.update(task, advance=1, info=_info(room, row["train_loss"], state["pre"], state["post"]))

    return progress, on_round


class _Abort(BaseException):
    """A second stop signal: leave at once (the run resumes from its last checkpoint)."""


class _Stop:
    """SIGINT, SIGTERM and SIGHUP all stop a run the same way: as Ctrl-C does (the rounds stop after the last
    completed one, whose metrics and checkpoint are written, then the summary), and the exit code is
    128 + the signal's number (130, 143, 129). A second signal while the run stops leaves at once, without a
    traceback; what the last checkpoint holds is kept, and ``--resume`` continues from it."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.signum = signal.SIGINT
        self.stopping = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        if self.stopping:
            raise _Abort
        self.stopping = True
        raise KeyboardInterrupt

    def __enter__(self) -> _Stop:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)


def cmd_run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    with _Stop() as stop:  # for the whole command, figures and summary included
        try:
            return _run(args, stop)
        except _Abort:
            print("metafleet: stopped at once (a second signal); `metafleet run --resume RUN_DIR` continues from "
                  "its last checkpoint", file=sys.stderr)
            return stop.exit_code
        finally:
            if ray.is_initialized():
                ray.shutdown()  # the Ray this command started (or its connection to a cluster): none outlives it


def _say_ray_starts(address: str) -> None:
    """Ray takes seconds to start (or to join a cluster): say so before the terminal goes quiet."""
    print(f"metafleet: {'joining the Ray cluster at ' + address if address else 'starting a local Ray'} "
          "(a few seconds) ...", file=sys.stderr, flush=True)


def _run(args: argparse.Namespace, stop: _Stop) -> int:
    """``metafleet run``: config, run directory and backend first (bad input is one line), then the run."""
    for key, value in (("tracking.tensorboard", args.tensorboard), ("tracking.mlflow_uri", args.mlflow)):
        if value is not None:
            args.overrides.append(f"{key}={json.dumps(value)}")
    try:
        if args.resume:
            if args.config or args.out:
                raise ConfigError("--resume continues a run with its own config.toml; drop the CONFIG argument and "
                                  "--out (change rounds or execution keys with --set)")
            cfg = api.resume_config(args.resume, args.overrides)
        else:
            cfg = api.experiment(args.config, args.overrides, **({"name": args.name} if args.name else {}))
        started = api.start(cfg, args.resume or args.out, resume=bool(args.resume), address=args.address,
                            on_ray_start=_say_ray_starts)
    except ConfigError as exc:
        print(f"metafleet: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:  # Ctrl-C while Ray starts: nothing was written yet
        print("metafleet: interrupted before the first round; nothing was written", file=sys.stderr)
        return stop.exit_code
    cfg, run_dir = started.cfg, started.run_dir
    workers = started.backend.describe()
    devices = sorted({str(w["device"]) for w in workers})
    note = all_clients_note(cfg.data, started.prepared.dataset)  # an unset data.num_clients of a file dataset
    print(f"metafleet: {cfg.name}: {cfg.algorithm.name} on {cfg.data.name}, {cfg.data.num_clients} "
          f"clients ({note + '; ' if note else ''}{cfg.clients.per_round} per round), {len(workers)} "
          f"{cfg.system.backend} worker(s) "
          f"on {', '.join(devices)}; writing {run_dir}/", file=sys.stderr)
    progress, on_round = _progress(cfg, enabled=not args.no_progress and sys.stderr.isatty())
    try:
        with progress:
            result = api.execute(started, on_round, plots=not args.no_plots)
    except (ConfigError, RunDirWriteError) as exc:  # another writer holds the directory, or it is not writable
        print(f"metafleet: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    summary = result.summary
    if result.figures:
        print(f"figures: {run_dir}/figures/ ({', '.join(p.name for p in result.figures)})", file=sys.stderr)
    _print_summary(summary, run_dir)
    if summary["status"] == "failed":
        print(f"metafleet: error: {summary['error']}", file=sys.stderr)
        return EXIT_FAILED
    return stop.exit_code if summary["status"] == "interrupted" else 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """``metafleet sweep``: every trial validated first (bad input is one line, exit 2), then run."""
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        if args.resume:
            if args.study or args.out:
                raise ConfigError("--resume continues a sweep with its own study.toml; drop the STUDY argument and "
                                  "--out")
            study = sweep.open_sweep(args.resume, args.overrides)
        elif not args.study:
            raise ConfigError("metafleet sweep needs a STUDY.toml (an experiment config plus a [sweep] table), or "
                              "--resume SWEEP_DIR")
        else:
            study = read_study(args.study, args.overrides)
        print(f"metafleet: sweep of {len(study.trials)} trials; starting Ray ...", file=sys.stderr, flush=True)
        result = sweep.run_sweep(study, args.out, address=args.address, resume=args.resume,
                                 progress=not args.no_progress and sys.stderr.isatty())
    except ConfigError as exc:
        print(f"metafleet: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    finally:
        if ray.is_initialized():
            ray.shutdown()
    counts = ", ".join(f"{n} {status}" for status, n in sorted(result.counts.items()))
    print(f"sweep: {len(result.trials)} trials ({counts}); {result.sweep_dir}/ (index.json, trials/)")
    print(f"compare them: metafleet compare {result.sweep_dir}")
    if result.counts.get("completed", 0) < len(result.trials):
        print(f"metafleet: error: not every trial completed (their errors are in each trial's summary.json); "
              f"`metafleet sweep --resume {result.sweep_dir}` re-runs them", file=sys.stderr)
        return EXIT_FAILED
    return 0


def _version() -> str:
    try:
        return metadata.version("metafleet")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "(not installed)"


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:  # a bare `metafleet`: what it can do
        parser.print_help()
        return 0
    if args.command == "run":
        return cmd_run(args)
    if args.command == "sweep":
        return cmd_sweep(args)
    return {"plot": commands.cmd_plot, "report": commands.cmd_report, "compare": commands.cmd_compare,
            "data": commands.cmd_data}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
