"""Experiment tracking: a run's per-round scalars, its config, figures and summary sent to TensorBoard and MLflow.

``open_trackers(cfg, run_dir)`` reads the ``[tracking]`` table and returns ``Trackers``, a context manager::

    with open_trackers(cfg, run_dir) as trackers, make_backend(cfg) as backend:
        summary = run(cfg, backend, run_dir, on_round=trackers.on_round)
        trackers.finish(summary, figures_of_run(run_dir))

Both libraries are optional extras (``pip install 'metafleet[tensorboard]'``, ``'metafleet[mlflow]'``), imported
here only when their key is set; the core never imports them. Everything that can be checked before the run is
checked in ``open_trackers`` (the library imports, the MLflow store opens, the experiment exists or is created, a
resumed run's MLflow run is in the store), as a ``ConfigError`` naming the key; nothing is written until the first
round completes, so bad input leaves no run directory. A tracker that fails later (a server gone, a disk full)
logs one warning and stops; the run and its own files go on.

Resume: TensorBoard writes into the same log directory with ``purge_step`` = the first round it sees, so the rounds
a killed run logged after its checkpoint (and recomputes on resume) are replaced, never duplicated. MLflow
continues the MLflow run whose id is in ``RUN_DIR/mlflow_run_id``; it keeps the values of rounds it already holds
(the resumed run recomputes them identically) and logs each round once.
"""

from __future__ import annotations

import json
import logging
import numbers
import os
import struct
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

from simulator.config.schema import ConfigError, ExperimentConfig, TrackingConfig
from simulator.config.toml import flatten
from simulator.rundir.files import atomic_write_bytes

log = logging.getLogger("metafleet.tracking")

#: rounds.parquet columns logged each round (step = ``round``) when they hold a finite number; every
#: ``dropped_*`` column of the row too, and ``updates_per_s``
ROUND_SCALARS = ("train_loss", "train_loss_before", "update_norm", "eval_loss_pre", "eval_loss_post",
                 "eval_metric_pre", "eval_metric_post", "num_sampled", "num_completed", "num_dropped",
                 "staleness_mean", "staleness_max", "sim_time_s", "wall_time_s")
#: client updates per wall-clock second of the round: num_completed / (wall_time_s - the previous row's wall_time_s)
UPDATES_PER_S = "updates_per_s"
#: the final summary's numbers are logged as ``summary/<key>`` (nested: ``summary/final_eval.eval_loss_post``)
SUMMARY_PREFIX = "summary/"
TENSORBOARD_DIR = "tensorboard"
MLFLOW_RUN_ID = "mlflow_run_id"
#: a MLflow metric every logged round holds (the resumed run's last logged round is read from its history)
ALWAYS_LOGGED = "num_completed"
#: summary status -> MLflow run status
MLFLOW_STATUS = {"completed": "FINISHED", "stalled": "FINISHED", "interrupted": "KILLED", "failed": "FAILED"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}  # PNG colour type -> channels


def number(value: Any) -> float | None:
    """``value`` as a float when it is a finite real number; None for NaN, None, bools, text."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    x = float(value)
    return x if x - x == 0.0 else None  # NaN and +-inf fail


def round_scalars(row: dict[str, Any], previous_wall: float | None) -> dict[str, float]:
    """The scalars of one rounds.parquet row; ``updates_per_s`` only when the previous row's wall time is known
    (0.0 before round 0; unknown for the first round after a resume)."""
    keys = (*ROUND_SCALARS, *sorted(k for k in row if k.startswith("dropped_")))
    out = {k: x for k in keys if (x := number(row.get(k))) is not None}
    wall, done = number(row.get("wall_time_s")), number(row.get("num_completed"))
    if previous_wall is not None and wall is not None and done is not None and wall > previous_wall:
        out[UPDATES_PER_S] = done / (wall - previous_wall)
    return out


def summary_scalars(summary: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of ``summary.json``, one level of nesting flattened with a dot."""
    out: dict[str, float] = {}
    for key, value in summary.items():
        items = value.items() if isinstance(value, dict) else [("", value)]
        for sub, v in items:
            if (x := number(v)) is not None:
                out[f"{SUMMARY_PREFIX}{key}{'.' + sub if sub else ''}"] = x
    return out


def hyperparameters(cfg: ExperimentConfig) -> dict[str, int | float | str]:
    """The resolved config as flat dotted keys; numbers stay numbers, booleans and lists become their TOML text."""
    def value(v: Any) -> int | float | str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, list | tuple):
            return json.dumps(list(v))
        return v

    return {k: value(v) for k, v in flatten(cfg).items()}


def png_size(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, channels) of a PNG file's bytes, from its IHDR chunk; None if it is not a PNG."""
    if len(data) < 26 or not data.startswith(PNG_MAGIC) or data[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", data[16:24])
    return width, height, PNG_CHANNELS.get(data[25], 3)


def wait_for_a_later_second(log_dir: Path, limit_s: float = 2.0) -> None:
    """Sleep (at most ``limit_s``) until the clock's second is past every event file's in ``log_dir``. TensorBoard
    reads a directory's files in name order, and a name starts with its creation second then the pid: a resumed
    run's file must sort after the killed run's, or its purge would come first and the old events win."""
    stamps = [int(p.name.split(".")[3]) for p in log_dir.glob("events.out.tfevents.*")
              if len(p.name.split(".")) > 3 and p.name.split(".")[3].isdigit()]
    wait = max(stamps, default=0) + 1 - time.time()
    if 0 < wait <= limit_s:
        time.sleep(wait)


class Sink(Protocol):
    name: str

    def log_round(self, step: int, scalars: dict[str, float]) -> None: ...

    def log_finish(self, step: int, summary: dict[str, Any], scalars: dict[str, float],
                   figures: list[Path]) -> None: ...

    def close(self) -> None: ...


class TensorBoardSink:
    """Scalars (``add_scalar``, step = round), the config and summary in the hparams plugin, figures as images,
    all in one log directory; flushed every round, so a killed run loses nothing it logged."""

    name = "tensorboard"

    def __init__(self, log_dir: Path, hparams: dict[str, Any], writer_class: Any, hparams_summaries: Callable,
                 summary_proto: Any) -> None:
        self.log_dir, self.hparams = log_dir, hparams
        self._writer_class, self._hparams_summaries, self._summary = writer_class, hparams_summaries, summary_proto
        self.writer: Any = None

    def _open(self, first_step: int) -> Any:
        if self.writer is None:  # purge_step: events a killed run logged from this step on are hidden for good
            wait_for_a_later_second(self.log_dir)
            self.writer = self._writer_class(log_dir=str(self.log_dir), purge_step=first_step)
        return self.writer

    def log_round(self, step: int, scalars: dict[str, float]) -> None:
        writer = self._open(step)
        for tag, x in scalars.items():
            writer.add_scalar(tag, x, step)
        writer.flush()

    def log_finish(self, step: int, summary: dict[str, Any], scalars: dict[str, float], figures: list[Path]) -> None:
        writer = self._open(step)
        for tag, x in scalars.items():
            writer.add_scalar(tag, x, step)
        for proto in self._hparams_summaries(self.hparams, scalars):  # experiment, session start, session end
            writer.file_writer.add_summary(proto, step)
        for path in figures:
            data = Path(path).read_bytes()
            size = png_size(data)
            if size is None:
                log.warning("tracking: tensorboard: %s is not a PNG file; not logged as an image", path)
                continue
            image = self._summary.Image(width=size[0], height=size[1], colorspace=size[2], encoded_image_string=data)
            writer.file_writer.add_summary(self._summary(value=[self._summary.Value(
                tag=f"figures/{Path(path).stem}", image=image)]), step)
        writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class MLflowSink:
    """Metrics (``log_batch``, step = round), the config as params, figures, config.toml and summary.json as
    artifacts, in one MLflow run named after the run directory; its id is kept in ``RUN_DIR/mlflow_run_id``."""

    name = "mlflow"

    def __init__(self, client: Any, entities: Any, experiment_id: str, run_id: str | None, run_dir: Path,
                 params: dict[str, str], param_limit: int) -> None:
        self.client, self.entities, self.experiment_id = client, entities, experiment_id
        self.run_id, self.run_dir, self.params, self.param_limit = run_id, run_dir, params, param_limit
        self.started = self.finished = False
        self.last_step = -1

    def _start(self) -> None:
        if self.started:
            return
        if self.run_id is None:
            run = self.client.create_run(self.experiment_id, run_name=self.run_dir.name,
                                         tags={"metafleet.run_dir": str(self.run_dir.resolve())})
            self.run_id = run.info.run_id
            atomic_write_bytes(self.run_dir / MLFLOW_RUN_ID, f"{self.run_id}\n".encode())
            self._log_params(self.params)
        else:  # a resumed run: params are immutable in MLflow, so a key changed on --resume becomes a tag
            self.client.update_run(self.run_id, status="RUNNING")
            held = self.client.get_run(self.run_id).data.params
            self._log_params({k: v for k, v in self.params.items() if k not in held})
            for key, text in self.params.items():
                if key in held and held[key] != text:
                    self.client.set_tag(self.run_id, f"resumed_with.{key}", text)
            history = self.client.get_metric_history(self.run_id, ALWAYS_LOGGED)
            self.last_step = max((m.step for m in history), default=-1)
        self.started = True

    def _log_params(self, params: dict[str, str]) -> None:
        items = [self.entities.Param(k, v[: self.param_limit]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def _log_metrics(self, step: int, scalars: dict[str, float]) -> None:
        stamp = int(time.time() * 1000)
        metrics = [self.entities.Metric(k, x, stamp, step) for k, x in scalars.items()]
        for i in range(0, len(metrics), 1000):  # and at most 1,000 metrics
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def log_round(self, step: int, scalars: dict[str, float]) -> None:
        self._start()
        if step <= self.last_step:  # logged before the interruption; the resumed run recomputes it identically
            return
        self._log_metrics(step, scalars)
        self.last_step = step

    def log_finish(self, step: int, summary: dict[str, Any], scalars: dict[str, float], figures: list[Path]) -> None:
        self._start()
        self._log_metrics(step, scalars)
        for path in figures:
            self.client.log_artifact(self.run_id, str(path), "figures")
        for name in ("config.toml", "summary.json"):
            if (self.run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(self.run_dir / name))
        self.client.set_tag(self.run_id, "metafleet.status", str(summary.get("status")))
        self.client.set_terminated(self.run_id, MLFLOW_STATUS.get(str(summary.get("status")), "FINISHED"))
        self.finished = True

    def close(self) -> None:
        if self.started and not self.finished:  # the process is ending without a summary
            self.client.set_terminated(self.run_id, "KILLED")


class Trackers:
    """The enabled trackers of one run (possibly none): ``on_round`` is a ``run`` callback, ``finish`` logs the
    summary and figures, ``close`` (or leaving the ``with`` block) ends them."""

    def __init__(self, sinks: Iterable[Sink]) -> None:
        self.sinks = list(sinks)
        self._previous_wall: float | None = None

    def __bool__(self) -> bool:
        return bool(self.sinks)

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def on_round(self, row: dict[str, Any]) -> None:
        step = int(row["round"])
        scalars = round_scalars(row, 0.0 if step == 0 else self._previous_wall)
        self._previous_wall = number(row.get("wall_time_s"))
        self._each(f"round {step}", lambda sink: sink.log_round(step, scalars))

    def finish(self, summary: dict[str, Any], figures: Iterable[Path] = ()) -> None:
        """Log ``summary`` (the dict ``run`` returns) at step = rounds completed, and the figures' PNG files."""
        step, scalars, paths = int(summary.get("rounds_completed") or 0), summary_scalars(summary), list(figures)
        self._each("the summary", lambda sink: sink.log_finish(step, summary, scalars, paths))

    def close(self) -> None:
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as exc:  # closing must never cost the run its exit status
                log.warning("tracking: %s could not be closed (%s: %s)", sink.name, type(exc).__name__, exc)
        self.sinks = []

    def _each(self, what: str, call: Callable[[Sink], None]) -> None:
        for sink in list(self.sinks):
            try:
                call(sink)
            except Exception as exc:  # a tracker is never required: it stops, the run goes on
                first = (str(exc).strip().splitlines() or [""])[0][:300]
                log.warning("tracking: %s stopped logging at %s (%s: %s); the run's own files are unaffected",
                            sink.name, what, type(exc).__name__, first)
                self.sinks.remove(sink)
                try:
                    sink.close()
                except Exception:  # already failing; its first error was reported
                    pass


def open_trackers(cfg: ExperimentConfig, run_dir: Path) -> Trackers:
    """The trackers ``cfg.tracking`` enables for ``run_dir`` (a new run's directory or one being resumed)."""
    run_dir, t, sinks = Path(run_dir), cfg.tracking, []
    params = hyperparameters(cfg)
    if t.tensorboard:
        log_dir = run_dir / TENSORBOARD_DIR if t.tensorboard == "run" else Path(t.tensorboard) / run_dir.name
        sinks.append(_tensorboard(log_dir, params))
    if t.mlflow_uri:
        sinks.append(_mlflow(t, run_dir, {k: v if isinstance(v, str) else repr(v) for k, v in params.items()}))
    return Trackers(sinks)


def _missing(key: str, extra: str, exc: ImportError) -> ConfigError:
    return ConfigError(f"{key} is set but {extra} cannot be imported ({exc}); install it with "
                       f"pip install 'metafleet[{extra}]', or set {key} = \"\"")


def _tensorboard(log_dir: Path, params: dict[str, Any]) -> TensorBoardSink:
    try:
        import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it, and says so less clearly)
        from tensorboard.compat.proto.summary_pb2 import Summary
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams
    except ImportError as exc:
        raise _missing("tracking.tensorboard", "tensorboard", exc) from None
    if log_dir.exists() and not log_dir.is_dir():
        raise ConfigError(f"tracking.tensorboard: {str(log_dir)!r} is a file, not a log directory; move it, or set "
                          "tracking.tensorboard to another directory")
    return TensorBoardSink(log_dir, params, SummaryWriter, hparams, Summary)


def _mlflow(t: TrackingConfig, run_dir: Path, params: dict[str, str]) -> MLflowSink:
    try:
        from mlflow import entities
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient
    except ImportError as exc:
        raise _missing("tracking.mlflow_uri", "mlflow", exc) from None
    try:
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH as limit
    except ImportError:  # older MLflow: its documented limit
        limit = 500
    if t.mlflow_uri.startswith("file:"):  # MLflow 3 refuses a file store unless asked for one: this key asks
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    where = f"tracking.mlflow_uri = {t.mlflow_uri!r}"
    try:
        client = MlflowClient(tracking_uri=t.mlflow_uri)
        experiment = client.get_experiment_by_name(t.mlflow_experiment)
        if experiment is None:
            try:
                client.create_experiment(t.mlflow_experiment)
            except MlflowException:  # another run (a sweep's trial) created it first
                pass
            experiment = client.get_experiment_by_name(t.mlflow_experiment)
    except Exception as exc:  # unreachable server, unsupported scheme, a store MLflow refuses
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise ConfigError(f"{where}: the MLflow store cannot be opened ({type(exc).__name__}: {first}); fix the "
                          "URI (e.g. \"file:./mlruns\" or \"http://HOST:5000\") or set it to \"\"") from None
    if experiment is None or experiment.lifecycle_stage != "active":
        raise ConfigError(f"tracking.mlflow_experiment = {t.mlflow_experiment!r} is deleted in {t.mlflow_uri!r}; "
                          "restore it (mlflow experiments restore) or choose another name")
    id_file = run_dir / MLFLOW_RUN_ID
    run_id = id_file.read_text(encoding="utf-8").strip() if id_file.is_file() else None
    if run_id:
        try:
            client.get_run(run_id)
        except MlflowException:
            raise ConfigError(f"{where} holds no MLflow run {run_id!r}, the one {id_file} names: set "
                              "tracking.mlflow_uri back to the store this run started with, or delete "
                              f"{id_file} to log the rest of the run as a new MLflow run") from None
    return MLflowSink(client, entities, experiment.experiment_id, run_id or None, run_dir, params, limit)
