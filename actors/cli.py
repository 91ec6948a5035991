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
import logging
import math
import signal
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from actors.backends import make_backend
from analysis import commands
from simulator.algorithms.registry import ALGORITHMS
from simulator.config.schema import EXIT_BAD_INPUT, ConfigError, ExperimentConfig
from simulator.experiment import from_dict, load_config, replace
from simulator.rounds.context import prepare
from simulator.rounds.run import run
from simulator.rundir import checkpoint, lock
from simulator.rundir.files import RunDirWriteError, check_creatable

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
    run.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped or killed run from its last checkpoint "
                     "(its own config.toml; --set may change rounds and execution keys such as system.actors)")
    run.add_argument("--address", help="Ray address: '' starts a local Ray, 'auto' or HOST:PORT joins a cluster")
    run.add_argument("--no-progress", action="store_true", help="no live progress bar (one line per eval instead)")
    run.add_argument("--no-plots", action="store_true", help="do not write the standard figures at the end")
    run.add_argument("-v", "--verbose", action="store_true", help="log worker placement and Ray messages")
    commands.add_parsers(sub)
    return parser


def _run_dir(cfg: ExperimentConfig, out: str | None) -> Path:
    """The run directory to create (``--out``, or ``runs/NAME-TIMESTAMP``), checked before anything is written."""
    if out:
        path = Path(out)
        if path.is_dir() and (writer := lock.holder(path)):
            raise ConfigError(f"--out {out!r} is being written by {writer}; wait for that run to end, or choose "
                              "another directory")
        if path.exists() and (not path.is_dir() or not lock.is_unused(path)):
            raise ConfigError(f"--out {out!r} already exists and is not an empty directory; "
                              "choose a new directory (each run writes into its own)")
        check_creatable(path, "--out")
        return path
    runs = Path("runs")
    if runs.exists() and not runs.is_dir():
        raise ConfigError(f"{str(runs.resolve())!r} is a file, so run directories cannot go under runs/; move it, "
                          "or pass --out DIR")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = runs / f"{cfg.name}-{stamp}"
    suffix = 1
    while path.exists():
        path = runs / f"{cfg.name}-{stamp}-{suffix}"
        suffix += 1
    check_creatable(path, "run directory")
    return path


def _fmt(x: Any, digits: int = 4) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}g}"


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
        if not math.isnan(final["eval_metric_post"]):
            print(f"held-out accuracy: {_fmt(final['eval_metric_pre'], 3)} before -> "
                  f"{_fmt(final['eval_metric_post'], 3)} after adaptation "
                  f"(after round {first['round']}: {_fmt(first['eval_metric_post'], 3)})", file=out)
    drops = {k: v for k, v in summary["dropped"].items() if v}
    if drops:
        print("dropped client updates: " + ", ".join(f"{v} {k}" for k, v in drops.items()), file=out)
    files = sorted(p.name for p in run_dir.iterdir() if not p.name.startswith("."))
    print(f"results: {run_dir}/ ({', '.join(files)})", file=out)


def _progress(cfg: ExperimentConfig, enabled: bool):
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
    progress = Progress(*columns, console=Console(stderr=True), disable=not enabled, transient=False)
    unit = "server updates" if cfg.system.mode == "async" else "rounds"
    task = progress.add_task(f"{cfg.name} {unit}", total=cfg.rounds, info="")
    state = {"eval": ""}

    def on_round(row: dict[str, Any]) -> None:
        if not math.isnan(row["eval_loss_post"]):
            state["eval"] = (f" | held-out loss {_fmt(row['eval_loss_pre'], 3)} -> "
                             f"{_fmt(row['eval_loss_post'], 3)} adapted")
            if not enabled:
                print(f"round {row['round']}: train loss {_fmt(row['train_loss'], 4)}{state['eval']}",
                      file=sys.stderr, flush=True)
        progress.update(task, advance=1, info=f"train loss {_fmt(row['train_loss'], 3)}{state['eval']}")

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


def _run(args: argparse.Namespace, stop: _Stop) -> int:
    """``metafleet run``: config, run directory and backend first (bad input is one line), then the run."""
    try:
        if args.resume:
            cfg, run_dir = _resume_config(args)
        else:
            cfg = load_config(args.config, args.overrides)
        if args.address is not None:
            cfg = replace(cfg, **{"system.address": args.address})
        prepared = prepare(cfg)
        if not args.resume:
            run_dir = _run_dir(cfg, args.out)
        backend = make_backend(cfg)
    except ConfigError as exc:
        print(f"metafleet: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:  # Ctrl-C while Ray starts: nothing was written yet
        print("metafleet: interrupted before the first round; nothing was written", file=sys.stderr)
        return stop.exit_code
    try:
        with backend:
            workers = backend.describe()
            devices = sorted({str(w["device"]) for w in workers})
            print(f"metafleet: {cfg.name}: {cfg.algorithm.name} on {cfg.data.name}, {cfg.data.num_clients} "
                  f"clients ({cfg.clients.per_round} per round), {len(workers)} {cfg.system.backend} worker(s) "
                  f"on {', '.join(devices)}; writing {run_dir}/", file=sys.stderr)
            progress, on_round = _progress(cfg, enabled=not args.no_progress and sys.stderr.isatty())
            with progress:
                summary = run(cfg, backend, run_dir, prepared, on_round, resume=bool(args.resume))
    except (ConfigError, RunDirWriteError) as exc:  # another writer holds the directory, or it is not writable
        print(f"metafleet: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if not args.no_plots and summary["rounds_completed"]:
        _write_figures(run_dir)
    _print_summary(summary, run_dir)
    if summary["status"] == "failed":
        print(f"metafleet: error: {summary['error']}", file=sys.stderr)
        return EXIT_FAILED
    return stop.exit_code if summary["status"] == "interrupted" else 0


def _resume_config(args: argparse.Namespace) -> tuple[ExperimentConfig, Path]:
    """The config of the run to resume (its config.toml plus --set), checked against its checkpoint."""
    run_dir = Path(args.resume)
    if args.config or args.out:
        raise ConfigError("--resume continues a run with its own config.toml; drop the CONFIG argument and --out "
                          "(change rounds or execution keys with --set)")
    if writer := lock.holder(run_dir):
        raise ConfigError(f"--resume {args.resume!r}: the run is being written by {writer}; resume it once "
                          "that process has ended")
    if not (run_dir / "config.toml").is_file():
        raise ConfigError(f"--resume {args.resume!r} is not a metafleet run directory (no config.toml); pass a "
                          "directory written by `metafleet run`")
    checkpoint.check_resumable(run_dir)
    started = load_config(run_dir / "config.toml")
    cfg = load_config(run_dir / "config.toml", args.overrides)
    checkpoint.check_compatible(started, cfg, run_dir)
    state = checkpoint.load(run_dir)
    if state is not None:
        checkpoint.check_compatible(from_dict(state["config"]), cfg, run_dir)
        if state["next_round"] >= cfg.rounds:
            raise ConfigError(f"--resume {args.resume!r}: the run already has all {state['next_round']} of "
                              f"{cfg.rounds} rounds; continue it further with --set rounds=N (N > {cfg.rounds})")
    return cfg, run_dir


def _write_figures(run_dir: Path) -> None:
    try:
        paths = commands.figures_of_run(run_dir)
    except Exception as exc:  # a figure must never cost the user a finished run's exit status
        logging.getLogger("metafleet.cli").warning("could not draw the figures (%s: %s); the metrics are intact, "
                                                   "retry with `metafleet plot %s`", type(exc).__name__, exc, run_dir)
        return
    print(f"figures: {run_dir}/figures/ ({', '.join(p.name for p in paths)})", file=sys.stderr)


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
    return {"plot": commands.cmd_plot, "report": commands.cmd_report, "compare": commands.cmd_compare,
            "data": commands.cmd_data}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
