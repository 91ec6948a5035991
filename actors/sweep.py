"""Sweeps: a study's trials run concurrently on one Ray (local or a cluster), scheduled by Ray Tune.

    metafleet sweep STUDY.toml [--set key=value ...] [--address HOST:PORT] [--out DIR]
    metafleet sweep --resume SWEEP_DIR

Each trial is one ordinary run (``actors.api``) into ``SWEEP/trials/<trial>/``, run inside a Ray Tune trial
whose placement group holds its driver (``sweep.driver_cpus``, or ``system.threads`` CPUs for the inline
backend, which computes in the driver) and its actor pool (``system.actors`` bundles of
``cpus_per_actor``/``gpus_per_actor``); Ray places the actors the trial starts inside its group, so a trial
gets what its config needs and the cluster runs as many trials at once as it holds. Tune schedules, isolates
failures (a failed or killed trial never stops the others) and writes its own logs under ``SWEEP/.tune/``.
Tune reuses a trial's process for the next trial with the same resources (``reuse_actors``): a process
imports torch and the simulator once, not once per trial (12 small trials: 29 s instead of 69 s on 2 cores),
and a trial's metrics do not depend on it (every draw is seeded; the worker sets torch's threads per run).
``SWEEP/index.json`` maps each trial to its keys, seed, status and node, and is kept current as trials end.
``--resume`` re-runs only trials that did not complete, continuing each from its own checkpoint (the
run directory is the trial's state, so a resumed trial's metrics equal an uninterrupted one's).

Trials draw no figures (a sweep's figures are its seed-aggregated ones: ``metafleet report SWEEP_DIR``;
``metafleet plot SWEEP/trials/<trial>`` draws one trial's). Ray Tune is imported when a sweep starts, not
with this module: ``metafleet run`` does not pay its second of import time.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from rich.console import Console
from rich.live import Live
from rich.table import Table

from actors import api
from actors.cluster import connect
from simulator.config.schema import ConfigError, ExperimentConfig
from simulator.config.toml import dumps_toml, read_toml, to_dict
from simulator.experiment import from_dict, replace
from simulator.rundir import lock
from simulator.rundir.files import atomic_write_bytes
from simulator.study import Study, Trial, expand, read_study

log = logging.getLogger("metafleet.sweep")

STUDY_FILE, INDEX_FILE, TRIALS = "study.toml", "index.json", "trials"
METRIC = "eval_loss_post"  # the "best so far": lowest held-out loss after adaptation


@dataclass(frozen=True)
class SweepResult:
    """A finished sweep: its directory and, per trial, the index entry (keys, seed, status, run_dir)."""

    sweep_dir: Path
    trials: list[dict[str, Any]]

    @property
    def counts(self) -> Counter[str]:
        return Counter(t["status"] for t in self.trials)

    def run_dirs(self) -> list[Path]:
        return [self.sweep_dir / t["dir"] for t in self.trials]


def resources(trial: ExperimentConfig, driver_cpus: float) -> list[dict[str, float]]:
    """The placement-group bundles a trial needs: its driver first, then one bundle per actor."""
    system = trial.system
    if system.backend == "inline":
        return [{"CPU": float(system.threads)}]
    actor = {"CPU": system.cpus_per_actor, **({"GPU": system.gpus_per_actor} if system.gpus_per_actor else {})}
    return [{"CPU": driver_cpus}] + [dict(actor) for _ in range(system.actors)]


def open_sweep(sweep_dir: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Study:
    """The study of an existing sweep directory (``--resume``); ``overrides`` may change execution keys."""
    path = Path(sweep_dir)
    if not (path / STUDY_FILE).is_file() or not (path / INDEX_FILE).is_file():
        raise ConfigError(f"--resume {str(sweep_dir)!r} is not a sweep directory (no {STUDY_FILE} and {INDEX_FILE}); "
                          "pass a directory written by `metafleet sweep`")
    study = read_study(path / STUDY_FILE, overrides)
    recorded = [t["name"] for t in json.loads((path / INDEX_FILE).read_text())["trials"]]
    if recorded != [t.name for t in study.trials]:
        raise ConfigError(f"--resume {str(sweep_dir)!r}: --set changed which trials the study has; only execution "
                          "keys (system.*) may change on resume")
    return study


def trial_status(run_dir: Path) -> str:
    """``completed``, ``failed``, ``interrupted``, ``stalled``, ... from its summary; ``pending`` when never
    started; ``killed`` when it started and ended without a summary (its driver died)."""
    summary = run_dir / "summary.json"
    if summary.is_file():
        try:
            return str(json.loads(summary.read_text())["status"])
        except (ValueError, KeyError):
            return "killed"
    return "killed" if (run_dir / "config.toml").is_file() else "pending"


def _entry(sweep_dir: Path, trial: Trial, node: str = "") -> dict[str, Any]:
    run_dir = f"{TRIALS}/{trial.name}"
    return {"name": trial.name, "dir": run_dir, "keys": trial.keys, "seed": trial.seed,
            "status": trial_status(sweep_dir / run_dir), "node": node}


def write_index(sweep_dir: Path, entries: list[dict[str, Any]]) -> None:
    atomic_write_bytes(sweep_dir / INDEX_FILE, json.dumps({"trials": entries}, indent=1, default=str).encode())


def _run_trial(config: dict[str, Any], payload: dict[str, tuple[dict[str, Any], str]]) -> None:
    """A Tune trial: one ordinary run (resumed from its checkpoint when its directory has one)."""
    from ray import tune  # noqa: PLC0415 (third-party, imported where Tune runs the trial)

    raw, run_dir = payload[config["trial"]]
    path = Path(run_dir)
    node = ray.get_runtime_context().get_node_id()
    resume = (path / "config.toml").is_file()
    cfg = api.resume_config(path) if resume else from_dict(raw)

    def report(row: dict[str, Any]) -> None:
        if row.get(METRIC) == row.get(METRIC):  # an evaluation round (not NaN, not None)
            tune.report({"round": row["round"], METRIC: row[METRIC], "node": node})

    result = api.execute(api.start(cfg, path, resume=resume), report, plots=False)
    final = (result.summary.get("final_eval") or {}).get(METRIC)
    tune.report({"round": result.summary["rounds_completed"], METRIC: final, "node": node,
                 "status": result.status})
    if result.status != "completed":
        raise RuntimeError(f"trial {config['trial']}: {result.status}: {result.summary.get('error') or ''}")


def run_sweep(study: Study, out: str | Path | None = None, *, address: str | None = None,
              resume: str | Path | None = None, progress: bool = True) -> SweepResult:
    """Run (or, with ``resume`` = a sweep directory, continue) every trial of ``study`` on one Ray."""
    if address is not None:
        trials = tuple(Trial(t.index, t.name, t.keys, replace(t.config, **{"system.address": address}))
                       for t in study.trials)
        study = Study(study.base, study.grid, study.zip, study.seeds, study.max_concurrent, study.driver_cpus, trials)
    if resume is not None:
        sweep_dir = Path(resume)
        if writer := lock.holder(sweep_dir):
            raise ConfigError(f"--resume {str(resume)!r}: the sweep is being run by {writer}; resume it once that "
                              "process has ended")
    else:
        name = study.trials[0].config.name.rsplit("-t0000", 1)[0] if study.trials else "sweep"
        sweep_dir = api.new_run_dir(name, out, "sweeps", "choose a new directory, or continue that sweep with "
                                    "`metafleet sweep --resume DIR`")
    first = study.trials[0].config
    connect(first.system)  # one Ray for every trial (already running: reused)
    with lock.exclusive(sweep_dir):
        (sweep_dir / TRIALS).mkdir(exist_ok=True)
        if resume is None:
            atomic_write_bytes(sweep_dir / STUDY_FILE, dumps_toml(study.as_toml_dict()).encode())
        entries = {t.name: _entry(sweep_dir, t) for t in study.trials}
        write_index(sweep_dir, list(entries.values()))
        todo = [t for t in study.trials if entries[t.name]["status"] != "completed"]
        if todo:
            _tune(study, todo, sweep_dir, entries, progress)
        for t in study.trials:
            entries[t.name]["status"] = trial_status(sweep_dir / entries[t.name]["dir"])
        write_index(sweep_dir, list(entries.values()))
    return SweepResult(sweep_dir, list(entries.values()))


def _tune(study: Study, todo: list[Trial], sweep_dir: Path, entries: dict[str, dict[str, Any]], progress: bool) -> None:
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no Tune banner above the status table
    from ray import tune  # noqa: PLC0415 (third-party: a second of import time that only sweeps pay)

    payload = {t.name: (to_dict(t.config), str((sweep_dir / TRIALS / t.name).resolve())) for t in todo}
    bundles = {t.name: resources(t.config, study.driver_cpus) for t in todo}
    trainable = tune.with_resources(tune.with_parameters(_run_trial, payload=payload),
                                    lambda spec: tune.PlacementGroupFactory(bundles[spec["trial"]]))
    status = _status_callback(tune.Callback, sweep_dir, entries, todo, progress)
    name = f"tune-{time.strftime('%Y%m%d-%H%M%S')}"
    tuner = tune.Tuner(
        trainable, param_space={"trial": tune.grid_search([t.name for t in todo])},
        tune_config=tune.TuneConfig(max_concurrent_trials=study.max_concurrent or None, reuse_actors=True,
                                    trial_name_creator=lambda trial: trial.config["trial"],
                                    trial_dirname_creator=lambda trial: trial.config["trial"]),
        run_config=tune.RunConfig(storage_path=str((sweep_dir / ".tune").resolve()), name=name, verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=0), callbacks=[status]))
    with status.live:
        tuner.fit()


def _status_callback(base: type, sweep_dir: Path, entries: dict[str, dict[str, Any]], todo: list[Trial],
                     progress: bool) -> Any:
    """A Tune callback (``base`` is ``ray.tune.Callback``) that keeps ``index.json`` current and draws the
    live status table: trials pending / running / done / failed and the best held-out loss so far."""

    class SweepStatus(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            self.state = {t.name: "pending" for t in todo}
            self.best: tuple[float, str] | None = None
            self.start = time.monotonic()
            console = Console(stderr=True)
            self.live = Live(self._table(), console=console, refresh_per_second=2, transient=False,
                             auto_refresh=progress and console.is_terminal)

        def __getstate__(self) -> dict[str, Any]:  # Tune pickles its callbacks; the live view stays here
            return {k: v for k, v in self.__dict__.items() if k != "live"}

        def _table(self) -> Table:
            counts = Counter(self.state.values())
            table = Table(title=f"sweep {sweep_dir} ({time.monotonic() - self.start:.0f} s)", title_justify="left")
            for col in ("pending", "running", "done", "failed"):
                table.add_column(col, justify="right")
            table.add_column("best held-out loss", justify="right")
            table.add_row(*(str(counts[c]) for c in ("pending", "running", "done", "failed")),
                          f"{self.best[0]:.4g}" if self.best else "-")
            if self.best:
                table.caption = f"best so far: {self.best[1]}"
                table.caption_justify = "left"
            return table

        def _set(self, trial: Any, state: str) -> None:
            name = trial.config["trial"]
            self.state[name] = state
            if state in ("done", "failed"):
                entries[name]["status"] = trial_status(sweep_dir / entries[name]["dir"])
                write_index(sweep_dir, list(entries.values()))
                if not self.live.auto_refresh:
                    log.warning("trial %s: %s", name, entries[name]["status"])
            self.live.update(self._table())

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._set(trial, "running")

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            name = trial.config["trial"]
            entries[name]["node"] = result.get("node", "")
            value = result.get(METRIC)
            if isinstance(value, float) and value == value and (self.best is None or value < self.best[0]):
                self.best = (value, name)
            self.live.update(self._table())

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._set(trial, "done")

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._set(trial, "failed")

    return SweepStatus()


def sweep(base: Any = None, *, grid: dict[str, list[Any]] | None = None, zip: dict[str, list[Any]] | None = None,
          seeds: list[int] | None = None, out: str | Path | None = None, address: str | None = None,
          max_concurrent: int = 0, driver_cpus: float = 0.5, progress: bool = False) -> SweepResult:
    """The Python form of ``metafleet sweep``: ``base`` is anything ``api.experiment`` takes (a TOML file, a
    dict, a config), the other keys are those of the ``[sweep]`` table."""
    raw = to_dict(base) if isinstance(base, ExperimentConfig) else (read_toml(base) if isinstance(base, str | Path)
                                                                    else dict(base or {}))
    raw.pop("sweep", None)
    table: dict[str, Any] = {"grid": grid or {}, "max_concurrent": max_concurrent, "driver_cpus": driver_cpus}
    if zip:
        table["zip"] = zip
    if seeds is not None:
        table["seeds"] = seeds
    return run_sweep(expand(raw, table), out, address=address, progress=progress)
