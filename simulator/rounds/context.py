"""What every mode of a run shares: the prepared inputs, and the run's context (config, backend, server
optimizer, devices, metrics writer, history, checkpoints, evaluation on held-out clients).

``prepare`` builds and checks everything that can fail on bad input before a run directory exists;
``RunContext`` is what the synchronous rounds (``rounds.sync``) and the asynchronous server
(``rounds.asynchronous``) are written against. The backend is passed in: nothing here imports Ray.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from simulator.algorithms.exactsum import Merger, Partial
from simulator.algorithms.record import Algorithm, planned_samples
from simulator.algorithms.registry import resolve
from simulator.algorithms.server import ServerOptimizer, ServerState, initial_vector
from simulator.compression import encoded_bytes
from simulator.config.schema import ExperimentConfig
from simulator.config.toml import to_dict
from simulator.contract import Backend, EvalResult, Keys, Reduction, Release, TrainResult
from simulator.data.base import FederatedDataset
from simulator.data.registry import make_dataset
from simulator.experiment import from_dict
from simulator.models import build_model, check_output_shape
from simulator.params import flat_params
from simulator.privacy.mechanism import Privacy
from simulator.rounds.retry import with_retries
from simulator.rounds.rows import eval_columns, ids_text, ordered
from simulator.rundir import checkpoint
from simulator.rundir.metrics import MetricsWriter
from simulator.scheduling import Devices, Profiles, client_durations, select_eval_clients


@dataclass(frozen=True)
class Prepared:
    """What a run needs before it starts, built once: the initial parameters, the dataset (a pooled
    dataset's partition is computed here), and the device model (traces are read here)."""

    theta0: torch.Tensor
    dataset: FederatedDataset
    devices: Devices


def prepare(cfg: ExperimentConfig) -> Prepared:
    """Build and check everything that can fail on bad input before any run directory exists: a bad
    model factory, a model that does not fit the data, a pool too small for its clients, or unusable
    device traces raise ConfigError here."""
    dataset = make_dataset(cfg.data, cfg.seed)
    model = build_model(cfg.model, dataset.input_dim, dataset.output_dim, cfg.seed)
    check_output_shape(model, dataset.input_dim, dataset.output_dim, getattr(dataset, "input_dtype", torch.float32))
    theta0 = initial_vector(cfg.algorithm, flat_params(model))
    return Prepared(theta0, dataset, Devices(cfg.devices, cfg.seed))


def plan_clients(cfg: ExperimentConfig, algo: Algorithm, dataset: FederatedDataset, devices: Devices,
                 client_ids: np.ndarray, model_bytes: int,
                 update_bytes: int | None = None) -> tuple[Profiles, np.ndarray, np.ndarray, np.ndarray]:
    """Device profiles, local sizes, planned samples and simulated durations of some clients: what the
    driver knows about a client's update at dispatch (an upload of ``update_bytes``, the compressed size;
    None = as large as the model)."""
    sizes = [dataset.split_sizes(int(c)) for c in client_ids]
    samples = np.array([planned_samples(algo, cfg.algorithm, s, q) for s, q in sizes], np.int64)
    profiles = devices.profiles(client_ids)
    durations = client_durations(profiles, samples, model_bytes, model_bytes if update_bytes is None else update_bytes)
    return profiles, np.array([s + q for s, q in sizes], np.int64), samples, durations


#: client plans ``ClientPlans`` remembers (6 numbers each); a request with more new clients than this is planned alone
PLAN_CACHE = 65_536
#: the columns of a remembered plan: compute speed, up and down bandwidth, local size, planned samples, duration
PLAN_COLUMNS = (np.float64, np.float64, np.float64, np.int64, np.int64, np.float64)


class ClientPlans:
    """``plan_clients`` remembered per client: a client's profile, sizes and duration are functions of its id alone
    (for one run's config and model). A request plans only the clients it has not seen (as one batch) and gathers
    every row from a table (one numpy column per number, a dict from client id to row): a sampled cohort revisits
    clients, and the asynchronous server plans one or two a refill. Each value is computed element by element as
    ``plan_clients`` computes it for any batch, so the numbers are the same. At most ``PLAN_CACHE`` clients are
    remembered (the table starts over when it is full)."""

    def __init__(self, plan: Callable[[np.ndarray], tuple[Profiles, np.ndarray, np.ndarray, np.ndarray]]) -> None:
        self._plan = plan
        self._row: dict[int, int] = {}
        self._table = [np.empty(0, dt) for dt in PLAN_COLUMNS]

    def __call__(self, client_ids: np.ndarray) -> tuple[Profiles, np.ndarray, np.ndarray, np.ndarray]:
        ids = np.asarray(client_ids, np.int64)
        keys = ids.tolist()
        row = self._row
        missing = [c for c in dict.fromkeys(keys) if c not in row]
        if missing and len(row) + len(missing) > PLAN_CACHE:  # full: start over with this request's clients
            row.clear()
            missing = list(dict.fromkeys(keys))
        if len(missing) > PLAN_CACHE:
            return self._plan(ids)
        if missing:
            self._remember(missing)
        at = np.fromiter((row[c] for c in keys), np.int64, len(keys))
        speed, up, down, n, samples, durations = (col[at] for col in self._table)
        return Profiles(ids, speed, up, down), n, samples, durations

    def _remember(self, missing: list[int]) -> None:
        """Plan the clients not seen yet as one batch and append their rows (the table grows by doubling)."""
        first, last = len(self._row), len(self._row) + len(missing)
        if last > self._table[0].size:
            size = max(last, 2 * self._table[0].size)
            self._table = [np.concatenate([col[:first], np.empty(size - first, col.dtype)]) for col in self._table]
        prof, n, samples, durations = self._plan(np.array(missing, np.int64))
        for col, values in zip(self._table, (prof.compute_speed, prof.up_bw, prof.down_bw, n, samples, durations),
                               strict=True):
            col[first:last] = values
        self._row.update(zip(missing, range(first, last), strict=True))


RoundCallback = Callable[[dict[str, Any]], None]
StateFn = dict[str, Any] | Callable[[], dict[str, Any]]
#: how a reduced call's chunks (their per-client scalars) are released: a ``Release``, or None for no release
Releasing = Callable[[list[TrainResult]], Release | None]


#: client work that raised, each failure's whole text (remote tracebacks included), appended as it happens
ERRORS_LOG = "errors.log"


class RunContext:
    """What every mode shares: config, backend, server optimizer, devices, metrics, history and the
    checkpoint of the last completed round (``resumed`` holds the one a resumed run starts from)."""

    def __init__(self, cfg: ExperimentConfig, backend: Backend, run_dir: Path, prepared: Prepared | None,
                 on_round: RoundCallback | None, resume: bool = False) -> None:
        self.cfg, self.backend, self.on_round, self.run_dir = cfg, backend, on_round, run_dir
        self.errors_log = run_dir / ERRORS_LOG
        self.algo = resolve(cfg.algorithm)
        prepared = prepared or prepare(cfg)
        self.opt = ServerOptimizer(prepared.theta0, cfg.algorithm, self.algo, copy=False)  # theta0 is only read
        self.dataset, self.devices = prepared.dataset, prepared.devices
        p = self.opt.state.theta
        self.model_bytes = p.numel() * p.element_size()
        self.update_bytes = encoded_bytes(cfg.compression, p.numel())  # 4 B a value uncompressed, as the model
        self._plans = ClientPlans(partial(plan_clients, cfg, self.algo, self.dataset, self.devices,
                                          model_bytes=self.model_bytes, update_bytes=self.update_bytes))
        self.eval_ids = select_eval_clients(cfg.seed, cfg.data.num_clients, cfg.data.eval_clients, cfg.eval.clients)
        self.resumed = checkpoint.load(run_dir) if resume else None
        if self.resumed:
            checkpoint.check_compatible(from_dict(self.resumed["config"]), cfg, run_dir)
        if resume:  # rows written after the checkpoint are recomputed
            checkpoint.truncate_metrics(run_dir, self.resumed["next_round"] if self.resumed else 0)
            (run_dir / "summary.json").unlink(missing_ok=True)
        self.history: list[dict[str, Any]] = checkpoint.history(run_dir) if resume else []
        self.writer = MetricsWriter(run_dir, cfg.metrics.flush_every, self.history[-1]["round"] if self.history else -1)
        self.start = time.perf_counter() - (self.history[-1]["wall_time_s"] if self.history else 0.0)
        if self.resumed:
            self.opt.state = ServerState(**self.resumed["opt"])
        self.privacy = Privacy(cfg, self.resumed.get("privacy") if self.resumed else None)
        self.snapshot: tuple[int, dict[str, Any], StateFn, dict[str, Any] | None] | None = None
        if self.resumed:  # until the first round completes, Ctrl-C keeps the checkpoint it started from
            self.snapshot = (self.resumed["next_round"], self.resumed["opt"], dict(self.resumed),
                             self.resumed.get("privacy"))
        self.saved_round = self.resumed["next_round"] if self.resumed else 0

    def completed(self, next_round: int, state: StateFn) -> None:
        """Round ``next_round - 1`` is complete and its rows committed: remember the state to resume
        from (a dict, or a function building it only when a checkpoint is written), and write the
        checkpoint when one is due."""
        self.snapshot = (next_round, checkpoint.dataclass_state(self.opt.state), state, self.privacy.state())
        every = self.cfg.checkpoint_every
        if every and next_round % every == 0 and next_round > self.saved_round:
            self.save_checkpoint()
        if self.on_round is not None:
            self.on_round(self.history[-1])

    def committed_history(self) -> list[dict[str, Any]]:
        """The rows of the rounds whose metrics are committed (a stop between the two drops the last one)."""
        last = self.writer.committed_round
        return [row for row in self.history if row["round"] <= last]

    def save_checkpoint(self) -> None:
        """Flush the committed metrics, then write the last completed round's state (in that order:
        a checkpoint never refers to rows that are not on disk)."""
        self.writer.flush()
        if self.snapshot is None:
            return
        next_round, opt, state, privacy = self.snapshot
        state = state() if callable(state) else state
        checkpoint.save(self.run_dir, {**state, "config": to_dict(self.cfg), "next_round": next_round, "opt": opt,
                                       **({"privacy": privacy} if privacy else {})})
        self.saved_round = next_round

    def train(self, theta: torch.Tensor, keys: Keys, client_ids: np.ndarray) -> list[TrainResult]:
        """Every chunk of one training call, re-run as a whole when client work raised (``retry``)."""
        return with_retries(lambda: list(self.backend.train(theta.numpy(), keys, client_ids)),
                            f"train of clients {ids_text(client_ids)}", self.cfg.system.max_failures,
                            log_file=self.errors_log)

    def dispatch(self, theta: torch.Tensor, keys: Keys, client_ids: np.ndarray,
                 reduce: Reduction) -> Callable[[Releasing], tuple[list[TrainResult], np.ndarray | None]]:
        """Start one reduced training call now. The returned function blocks for its chunks (partials dropped) and
        the mean their partials give (``Backend.release``) under the ``Release`` that ``releasing`` makes of the
        chunks' scalars (None: no release). Partials that reach the driver are added as they come (``Merger``: one
        in memory at a time); a backend that keeps them with its workers combines them there. Client work that
        raised is re-run as a whole, from a fresh dispatch (``retry``)."""
        size = theta.numel()
        started = [self.backend.train(theta.numpy(), keys, client_ids, reduce)]

        def attempt(releasing: Releasing) -> tuple[list[TrainResult], np.ndarray | None]:
            results = started.pop() if started else self.backend.train(theta.numpy(), keys, client_ids, reduce)
            chunks: list[TrainResult] = []
            held: list[Any] = []  # the backend's handles to partials it kept
            merged = Merger(size)
            for res in results:
                if res.partial is None:
                    raise RuntimeError("the backend returned an unreduced chunk for a reduced training call")
                chunks.append(dataclasses.replace(res, partial=None))
                if isinstance(res.partial, Partial):
                    merged.add(res.partial)
                else:
                    held.append(res.partial)
                del res
            if merged.total is not None:
                held.append(merged.partial())
            del merged
            release = releasing(chunks)
            return chunks, None if release is None else self.backend.release(held, release, size)

        return lambda releasing: with_retries(lambda: attempt(releasing), f"train of clients {ids_text(client_ids)}",
                                              self.cfg.system.max_failures, log_file=self.errors_log)

    def plan(self, client_ids: np.ndarray) -> tuple[Profiles, np.ndarray, np.ndarray, np.ndarray]:
        return self._plans(client_ids)

    def evaluate(self, theta: torch.Tensor, r: int) -> EvalResult | None:
        if not len(self.eval_ids):
            return None
        chunks = with_retries(lambda: list(self.backend.evaluate(theta.numpy(), r, self.eval_ids)),
                              f"evaluate of clients {ids_text(self.eval_ids)}", self.cfg.system.max_failures,
                              log_file=self.errors_log)
        col, workers = ordered(chunks, self.eval_ids)
        ev = EvalResult(-1, self.eval_ids, col("loss_pre"), col("loss_post"), col("metric_pre"), col("metric_post"))
        self.writer.tables["evals"].extend({
            "round": np.full(len(self.eval_ids), r), "client_id": self.eval_ids, "actor_id": workers,
            "loss_pre": ev.loss_pre, "loss_post": ev.loss_post, "metric_pre": ev.metric_pre,
            "metric_post": ev.metric_post})
        return ev

    def eval_due(self, r: int) -> bool:
        return r % self.cfg.eval.every == 0 or r == self.cfg.rounds - 1

    def record_round(self, row: dict[str, Any], theta: torch.Tensor) -> None:
        """Evaluate when due, then append the round's row (eval columns filled in)."""
        r = row["round"]
        row.update(eval_columns(self.evaluate(theta, r) if self.eval_due(r) else None))
        row.update(self.privacy.columns())
        row["wall_time_s"] = time.perf_counter() - self.start
        self.writer.tables["rounds"].append(row)
        self.history.append(row)  # counted only once committed: ``committed_history``
        self.writer.end_round(r)
