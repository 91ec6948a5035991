"""The Python API: build a config, run it into a run directory, get its frames back.

    from actors import api

    cfg = api.experiment({"algorithm": {"name": "maml"}}, rounds=50, overrides={"data.num_clients": 200})
    result = api.run(cfg, out="runs/maml-50")
    result.rounds.tail()              # pandas frames: rounds, clients, evals
    result.summary["final_eval"]      # the summary.json of the run
    api.resume(result.run_dir, rounds=100)

``run`` writes exactly the run directory ``metafleet run`` writes (``metafleet run`` is a thin layer over
this module), so ``metafleet plot | report | compare`` and ``--resume`` accept it. Bad input raises
``ConfigError`` naming the key, before anything is written. A Ray backend reuses the Ray this process has
already started (or joined), and the first run that starts one leaves it running for the next: a notebook
pays Ray's start once (``ray.shutdown()`` ends it). This is a composition root, with ``actors.cli``: it
knows the core, the backends and ``analysis`` (for the standard figures and the frames).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import ray

from actors.backends import make_backend
from actors.cluster import connect
from actors.tracking import Trackers, open_trackers
from analysis.commands import figures_of_run
from analysis.load import load_run
from simulator.config.schema import ConfigError, ExperimentConfig
from simulator.config.toml import parse_overrides, read_toml, set_dotted, to_dict
from simulator.contract import Backend
from simulator.experiment import from_dict, load_config, replace
from simulator.rounds.context import Prepared, prepare
from simulator.rounds.run import run as run_rounds
from simulator.rundir import checkpoint, lock
from simulator.rundir.files import check_creatable

log = logging.getLogger("metafleet.api")

Source = str | Path | Mapping[str, Any] | ExperimentConfig | None
RoundCallback = Callable[[dict[str, Any]], None]


def experiment(source: Source = None, overrides: Mapping[str, Any] | Iterable[str] = (),
               **keys: Any) -> ExperimentConfig:
    """A validated config from a TOML file, a nested dict, an ``ExperimentConfig`` or nothing (the
    quickstart), then ``overrides`` (dotted keys to values, ``{"algorithm.name": "maml"}``, or the CLI's
    ``["algorithm.name='maml'"]`` strings) and keyword tables or top-level keys (``rounds=50``,
    ``algorithm={"name": "maml"}``). The same validation as the CLI: a ``ConfigError`` names the key."""
    config_dir = None  # where factory files are looked for first: the TOML file's directory
    if isinstance(source, ExperimentConfig):
        raw = to_dict(source)
    elif isinstance(source, Mapping):
        raw = {k: dict(v) if isinstance(v, Mapping) else v for k, v in source.items()}
    elif source is not None:
        raw, config_dir = read_toml(source), Path(source).parent
    else:
        raw = {}
    for key, value in keys.items():
        if isinstance(value, Mapping):
            current = raw.get(key, {})
            raw[key] = {**(current if isinstance(current, dict) else {}), **value}
        else:
            raw[key] = value
    return from_dict(set_dotted(raw, _changes(overrides)), config_dir)


def _changes(overrides: Mapping[str, Any] | Iterable[str]) -> dict[str, Any]:
    """Dotted keys to values, from a mapping or from ``key.sub=VALUE`` strings (TOML values)."""
    return dict(overrides) if isinstance(overrides, Mapping) else parse_overrides(list(overrides))


@dataclass(frozen=True)
class Result:
    """A finished (or stopped) run: its directory, summary, config and figures; the metric frames load on first
    use."""

    run_dir: Path
    summary: dict[str, Any]
    config: ExperimentConfig
    figures: tuple[Path, ...] = ()  # the standard figures this run drew (none with plots=False)

    @property
    def status(self) -> str:
        return str(self.summary["status"])

    @functools.cached_property
    def _run(self) -> Any:
        return load_run(self.run_dir)

    @property
    def rounds(self) -> pd.DataFrame:
        """One row per round (server update in async mode): ``rounds.parquet``."""
        return self._run.rounds

    @property
    def clients(self) -> pd.DataFrame:
        """One row per client update: ``clients.parquet``."""
        return self._run.clients

    @property
    def evals(self) -> pd.DataFrame:
        """One row per held-out client and evaluation: ``evals.parquet``."""
        return self._run.evals

    def __repr__(self) -> str:
        s = self.summary
        return (f"Result({s['status']}: {s['rounds_completed']}/{s['rounds_planned']} rounds of {s['algorithm']} "
                f"on {s['dataset']}, run_dir={str(self.run_dir)!r})")


def new_run_dir(name: str, out: str | Path | None, parent: str = "runs",
                fix: str = "choose a new directory (each run writes into its own)") -> Path:
    """The directory to create (``out``, or ``PARENT/NAME-TIMESTAMP``, numbered on a clash), checked before
    anything is written: not being written, empty (or holding only a lock), creatable. ``fix``: what the
    error for an existing ``out`` tells the user to do."""
    if out:
        path = Path(out)
        if path.is_dir() and (writer := lock.holder(path)):
            raise ConfigError(f"--out {str(out)!r} is being written by {writer}; wait for that run to end, or "
                              "choose another directory")
        if path.exists() and (not path.is_dir() or not lock.is_unused(path)):
            raise ConfigError(f"--out {str(out)!r} already exists and is not an empty directory; {fix}")
        check_creatable(path, "--out")
        return path
    root, kind = Path(parent), parent.rstrip("s")  # runs/ holds run directories, sweeps/ sweep directories
    if root.exists() and not root.is_dir():
        raise ConfigError(f"{str(root.resolve())!r} is a file, so {kind} directories cannot go under {parent}/; "
                          "move it, or pass --out DIR")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = root / f"{name}-{stamp}"
    suffix = 1
    while path.exists():
        path = root / f"{name}-{stamp}-{suffix}"
        suffix += 1
    check_creatable(path, f"{kind} directory")
    return path


def resume_config(run_dir: str | Path, overrides: Mapping[str, Any] | Iterable[str] = ()) -> ExperimentConfig:
    """The config a stopped run continues with (its ``config.toml`` plus ``overrides``, which may change
    ``rounds`` and execution keys), checked against its checkpoint; the directory is left untouched."""
    path = Path(run_dir)
    if writer := lock.holder(path):
        raise ConfigError(f"--resume {str(run_dir)!r}: the run is being written by {writer}; resume it once "
                          "that process has ended")
    if not (path / "config.toml").is_file():
        raise ConfigError(f"--resume {str(run_dir)!r} is not a metafleet run directory (no config.toml); pass a "
                          "directory written by `metafleet run`")
    checkpoint.check_resumable(path)
    started = load_config(path / "config.toml")
    cfg = experiment(path / "config.toml", overrides)
    checkpoint.check_compatible(started, cfg, path)
    state = checkpoint.load(path)
    if state is not None:
        checkpoint.check_compatible(from_dict(state["config"]), cfg, path)
        if state["next_round"] >= cfg.rounds:
            raise ConfigError(f"--resume {str(run_dir)!r}: the run already has all {state['next_round']} of "
                              f"{cfg.rounds} rounds; continue it further with --set rounds=N (N > {cfg.rounds})")
    return cfg


def _callbacks(calls: list[RoundCallback]) -> RoundCallback:
    def each(row: dict[str, Any]) -> None:
        for call in calls:
            call(row)

    return each


@dataclass(frozen=True)
class Started:
    """A run whose inputs are checked and whose backend and trackers are open (``start``), not yet run."""

    cfg: ExperimentConfig
    run_dir: Path
    prepared: Prepared
    backend: Backend
    trackers: Trackers
    resume: bool


def start(cfg: ExperimentConfig, out: str | Path | None = None, resume: bool = False, address: str | None = None,
          on_ray_start: Callable[[str], None] | None = None) -> Started:
    """Everything that can fail on bad input, before the first write: the config (``address`` overrides
    ``system.address``), the dataset and model (``prepare``), the run directory, the trackers
    (``[tracking]``) and the backend. A Ray backend joins the Ray this process already runs, else starts (or
    joins) one that stays up; ``on_ray_start`` is told so first, with the address ("" = a local Ray)."""
    if address is not None:
        cfg = replace(cfg, **{"system.address": address})
    prepared = prepare(cfg)
    run_dir = Path(out) if resume and out is not None else new_run_dir(cfg.name, out)
    trackers = open_trackers(cfg, run_dir)
    try:
        if cfg.system.backend == "ray" and not ray.is_initialized():
            connect(cfg.system, on_ray_start)  # started here, not by the pool: it outlives this run, for the next
        backend = make_backend(cfg)
    except BaseException:
        trackers.close()
        raise
    return Started(cfg, run_dir, prepared, backend, trackers, resume)


def execute(started: Started, on_round: RoundCallback | Iterable[RoundCallback] | None = None,
            plots: bool = True) -> Result:
    """Run a started experiment (``start``) to its end, then draw its standard figures (``plots``) and hand
    them, with the summary, to the trackers."""
    s = started
    calls = ([] if on_round is None else [on_round] if callable(on_round) else list(on_round))
    with s.trackers, s.backend:
        summary = run_rounds(s.cfg, s.backend, s.run_dir, s.prepared, _callbacks([s.trackers.on_round, *calls]),
                             resume=s.resume)
        figures: list[Path] = []
        if plots and summary["rounds_completed"]:
            try:
                figures = figures_of_run(s.run_dir)
            except Exception as exc:  # a figure must never cost the user a finished run
                log.warning("could not draw the figures (%s: %s); the metrics are intact, retry with `metafleet "
                            "plot %s`", type(exc).__name__, exc, s.run_dir)
        s.trackers.finish(summary, figures)
    return Result(s.run_dir, summary, s.cfg, tuple(figures))


def run(cfg: ExperimentConfig | Source = None, out: str | Path | None = None, *,
        on_round: RoundCallback | Iterable[RoundCallback] | None = None, address: str | None = None,
        plots: bool = True) -> Result:
    """Run an experiment into a new run directory (``out``, default ``runs/NAME-TIMESTAMP``) and return its
    ``Result``. ``cfg``: an ``ExperimentConfig`` or anything ``experiment`` takes. ``on_round``: a callable
    (or several) given each round's row as it is written. Ctrl-C stops after the last completed round
    (status "interrupted"; ``resume`` continues it)."""
    if not isinstance(cfg, ExperimentConfig):
        cfg = experiment(cfg)
    return execute(start(cfg, out, address=address), on_round, plots=plots)


def resume(run_dir: str | Path, overrides: Mapping[str, Any] | Iterable[str] = (), *,
           on_round: RoundCallback | Iterable[RoundCallback] | None = None, address: str | None = None,
           plots: bool = True, **keys: Any) -> Result:
    """Continue a stopped or killed run from its last checkpoint; ``rounds=N`` (or ``overrides``) extends it.
    The finished run is identical to one never interrupted."""
    cfg = resume_config(run_dir, {**_changes(overrides), **keys})
    return execute(start(cfg, run_dir, resume=True, address=address), on_round, plots=plots)
