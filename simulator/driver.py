"""The driver: owns the server model and the virtual clock, and runs rounds in simulated time.

Synchronous-style rounds (``system.mode`` = "sync", "deadline", "overselect") are run here: each
round samples a seeded cohort, decides from the clients' device profiles who will count and when
the round ends (``scheduling.plan_round``), hands the kept clients to the backend (Ray actor pool
or in-process) in one call per worker, puts results back into cohort order, aggregates, applies
the server optimizer, evaluates on held-out clients when due, and appends metrics. The
asynchronous mode lives in ``simulator.async_driver`` and shares ``RunContext``. The backend is
passed in: this module never imports Ray.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from simulator import checkpoint
from simulator.aggregation import weighted_mean
from simulator.algorithms import (
    ALGORITHMS,
    Algorithm,
    ServerOptimizer,
    ServerState,
    initial_vector,
    planned_samples,
    pseudo_gradient,
)
from simulator.config import ExperimentConfig, from_dict, to_dict
from simulator.data import FederatedDataset, make_dataset
from simulator.evaluation import STATS, summarize
from simulator.metrics import MetricsWriter, write_json
from simulator.models import build_model, check_output_shape, flat_params
from simulator.scheduling import (
    Devices,
    Profiles,
    VirtualClock,
    client_durations,
    cohort_size,
    drop_counts,
    plan_round,
    sample_cohort,
    select_eval_clients,
)
from simulator.summary import build_summary
from simulator.worker import EvalResult, TrainResult, WorkerFailure

log = logging.getLogger("metafleet.driver")


class Backend(Protocol):
    num_workers: int

    def submit(self, method: str, theta: np.ndarray, keys: int | np.ndarray, client_ids: np.ndarray) -> list[Any]: ...

    def result(self, pending: Any) -> TrainResult | EvalResult: ...

    def map(self, method: str, theta: np.ndarray, keys: int | np.ndarray,
            client_ids: np.ndarray) -> Iterator[TrainResult | EvalResult]: ...

    def describe(self) -> list[dict[str, object]]: ...

    def close(self) -> None: ...


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
    return Prepared(initial_vector(cfg.algorithm, flat_params(model)), dataset, Devices(cfg.devices, cfg.seed))


def plan_clients(cfg: ExperimentConfig, algo: Algorithm, dataset: FederatedDataset, devices: Devices,
                 client_ids: np.ndarray, model_bytes: int) -> tuple[Profiles, np.ndarray, np.ndarray, np.ndarray]:
    """Device profiles, local sizes, planned samples and simulated durations of some clients: what the
    driver knows about a client's update at dispatch (updates are as large as the model)."""
    sizes = [dataset.split_sizes(int(c)) for c in client_ids]
    samples = np.array([planned_samples(algo, cfg.algorithm, s, q) for s, q in sizes], np.int64)
    profiles = devices.profiles(client_ids)
    durations = client_durations(profiles, samples, model_bytes, model_bytes)
    return profiles, np.array([s + q for s, q in sizes], np.int64), samples, durations


def _ordered(chunks: list[Any], client_ids: np.ndarray) -> tuple[Callable[[str], np.ndarray], np.ndarray]:
    """Put chunk results back into cohort order, whatever order they completed in.

    Returns a getter for a concatenated, reordered field, and each row's worker id.
    """
    got = np.concatenate([c.client_ids for c in chunks])
    order = np.argsort(got, kind="stable")
    if len(got) == len(client_ids):
        order = order[np.minimum(np.searchsorted(got[order], client_ids), len(got) - 1)]
    if len(got) != len(client_ids) or not np.array_equal(got[order], client_ids):
        raise RuntimeError("the backend did not return exactly one result per client of the cohort")
    workers = np.concatenate([np.full(len(c.client_ids), c.worker_id) for c in chunks])
    in_order = bool(np.array_equal(order, np.arange(len(order))))

    def field(name: str) -> np.ndarray:  # no copy where possible: a round's vectors can be gigabytes
        values = [getattr(c, name) for c in chunks]
        joined = values[0] if len(values) == 1 else np.concatenate(values)
        return joined if in_order else joined[order]

    return field, workers[order]


def _eval_columns(ev: EvalResult | None) -> dict[str, float]:
    cols: dict[str, float] = {}
    for what, when in (("loss", "pre"), ("loss", "post"), ("metric", "pre"), ("metric", "post")):
        stats = summarize(getattr(ev, f"{what}_{when}")) if ev is not None else dict.fromkeys(STATS, math.nan)
        for s, v in stats.items():
            cols[f"eval_{what}_{when}{'' if s == 'mean' else '_' + s}"] = v
    return cols


RoundCallback = Callable[[dict[str, Any]], None]
StateFn = dict[str, Any] | Callable[[], dict[str, Any]]


def _ids_text(ids: np.ndarray, limit: int = 8) -> str:
    shown = ", ".join(str(int(c)) for c in ids[:limit])
    return f"[{shown}{', ...' if len(ids) > limit else ''}] ({len(ids)})"


def finite_updates(vectors: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """Rows whose update vector and loss are all finite (a NaN/inf update never touches the model)."""
    return np.isfinite(vectors).all(axis=1) & np.isfinite(losses)


class RunContext:
    """What every mode shares: config, backend, server optimizer, devices, metrics, history and the
    checkpoint of the last completed round (``resumed`` holds the one a resumed run starts from)."""

    def __init__(self, cfg: ExperimentConfig, backend: Backend, run_dir: Path, prepared: Prepared | None,
                 on_round: RoundCallback | None, resume: bool = False) -> None:
        self.cfg, self.backend, self.on_round, self.run_dir = cfg, backend, on_round, run_dir
        self.algo = ALGORITHMS[cfg.algorithm.name]
        prepared = prepared or prepare(cfg)
        self.opt = ServerOptimizer(prepared.theta0, cfg.algorithm)
        self.dataset, self.devices = prepared.dataset, prepared.devices
        p = self.opt.params
        self.model_bytes = self.update_bytes = p.numel() * p.element_size()
        self.eval_ids = select_eval_clients(cfg.seed, cfg.data.num_clients, cfg.data.eval_clients, cfg.eval.clients)
        self.resumed = checkpoint.load(run_dir) if resume else None
        if self.resumed:
            checkpoint.check_compatible(from_dict(self.resumed["config"]), cfg, run_dir)
        if resume:  # rows written after the checkpoint are recomputed
            checkpoint.truncate_metrics(run_dir, self.resumed["next_round"] if self.resumed else 0)
            (run_dir / "summary.json").unlink(missing_ok=True)
        self.history: list[dict[str, Any]] = checkpoint.history(run_dir) if resume else []
        self.writer = MetricsWriter(run_dir, cfg.metrics.flush_every)
        self.start = time.perf_counter() - (self.history[-1]["wall_time"] if self.history else 0.0)
        if self.resumed:
            self.opt.state = ServerState(**self.resumed["opt"])
        self.snapshot: tuple[int, dict[str, Any], StateFn] | None = None
        if self.resumed:  # until the first round completes, Ctrl-C keeps the checkpoint it started from
            self.snapshot = (self.resumed["next_round"], self.resumed["opt"], dict(self.resumed))
        self.saved_round = self.resumed["next_round"] if self.resumed else 0

    def completed(self, next_round: int, state: StateFn) -> None:
        """Round ``next_round - 1`` is complete and its rows committed: remember the state to resume
        from (a dict, or a function building it only when a checkpoint is written), and write the
        checkpoint when one is due."""
        self.snapshot = (next_round, checkpoint.dataclass_state(self.opt.state), state)
        every = self.cfg.checkpoint_every
        if every and next_round % every == 0 and next_round > self.saved_round:
            self.save_checkpoint()
        if self.on_round is not None:
            self.on_round(self.history[-1])

    def save_checkpoint(self) -> None:
        """Flush the committed metrics, then write the last completed round's state (in that order:
        a checkpoint never refers to rows that are not on disk)."""
        self.writer.flush()
        if self.snapshot is None:
            return
        next_round, opt, state = self.snapshot
        state = state() if callable(state) else state
        checkpoint.save(self.run_dir, {**state, "config": to_dict(self.cfg), "next_round": next_round, "opt": opt})
        self.saved_round = next_round

    def work(self, method: str, theta: torch.Tensor, keys: int | np.ndarray, client_ids: np.ndarray) -> list[Any]:
        """All chunks of one call; a call whose client work raised is re-run up to ``system.max_failures``
        times (it is a pure function of its inputs), then the run stops with ``WorkerFailure``."""
        limit = self.cfg.system.max_failures
        for attempt in range(limit + 1):
            try:
                return list(self.backend.map(method, theta.numpy(), keys, client_ids))
            except WorkerFailure:
                raise
            except Exception as exc:  # an error inside the client's work (worker or Ray task)
                error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                log.warning("%s of clients %s failed (attempt %d of %d): %s", method,
                            _ids_text(client_ids), attempt + 1, limit + 1, error)
        raise WorkerFailure(f"{method} of clients {_ids_text(client_ids)} failed {limit + 1} times, last with "
                            f"{error}; fix the cause (data, model, memory), raise system.max_failures, then "
                            "continue with `metafleet run --resume RUN_DIR`")

    def plan(self, client_ids: np.ndarray) -> tuple[Profiles, np.ndarray, np.ndarray, np.ndarray]:
        return plan_clients(self.cfg, self.algo, self.dataset, self.devices, client_ids, self.model_bytes)

    def evaluate(self, theta: torch.Tensor, r: int) -> EvalResult | None:
        if not len(self.eval_ids):
            return None
        chunks = self.work("evaluate", theta, r, self.eval_ids)
        col, workers = _ordered(chunks, self.eval_ids)
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
        row.update(_eval_columns(self.evaluate(theta, r) if self.eval_due(r) else None))
        row["wall_time"] = time.perf_counter() - self.start
        self.writer.tables["rounds"].append(row)
        self.writer.end_round(r)
        self.history.append(row)


def client_rows(r: int, ids: np.ndarray, profiles: Profiles, n_samples: np.ndarray, start: np.ndarray,
                finish: np.ndarray, reasons: np.ndarray, start_version: np.ndarray, staleness: np.ndarray,
                staleness_weight: np.ndarray, trained: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Columns of clients.parquet for some clients; training columns are NaN / -1 / 0 for clients
    that were not trained (``trained`` holds actor_id, samples_processed, weight, losses, norms, time)."""
    k = len(ids)
    t = trained or _nan_columns(k)
    return {"round": np.full(k, r), "client_id": ids, "num_samples": n_samples, **t, "sim_start": start,
            "sim_duration_s": finish - start, "sim_finish": finish, "start_version": start_version,
            "staleness": staleness, "staleness_weight": staleness_weight, "dropped": reasons != "",
            "drop_reason": reasons, "compute_speed": profiles.compute_speed, "up_bw": profiles.up_bw,
            "down_bw": profiles.down_bw}


def _sync_rounds(ctx: RunContext) -> None:
    """``cfg.rounds`` rounds of the sync, deadline or overselect policy (from the checkpoint when resumed)."""
    cfg, s = ctx.cfg, ctx.cfg.system
    theta, version, clock, first = ctx.opt.params, 0, VirtualClock(), 0
    if ctx.resumed:
        version, clock, first = ctx.resumed["version"], VirtualClock(ctx.resumed["clock"]), ctx.resumed["next_round"]
    for r in range(first, cfg.rounds):
        t0 = clock.now
        ids = sample_cohort(cfg.seed, r, cfg.data.num_clients, cohort_size(s.mode, cfg.clients.per_round,
                                                                             s.overselect))
        profiles, n_samples, samples, durations = ctx.plan(ids)
        online = ctx.devices.online(ids, t0, r)
        plan = plan_round(s.mode, t0, ids, durations, online, ctx.devices.dropout_fraction(ids, r),
                          cfg.clients.per_round, s.deadline_s)
        reason, base = plan.reason.copy(), version
        trained = _nan_columns(ids.size)
        update_norm, losses, losses_before = math.nan, np.zeros(0), np.zeros(0)
        if plan.kept.any():
            kept = ids[plan.kept]
            col, workers = _ordered(ctx.work("train", theta, r, kept), kept)
            if not np.array_equal(col("samples_processed"), samples[plan.kept]):
                raise RuntimeError("a worker processed a different number of samples than planned at dispatch")
            vectors, after = col("vectors"), col("loss_after")
            ok = finite_updates(vectors, after)
            weights = np.array([ctx.opt.client_weight(int(n)) if good else math.nan
                                for n, good in zip(col("num_samples"), ok, strict=True)])
            cols = {"actor_id": workers, "samples_processed": col("samples_processed"), "weight": weights,
                    "loss_before": col("loss_before"), "loss_after": after,
                    "update_norm": torch.linalg.vector_norm(torch.from_numpy(vectors), dim=1).double().numpy(),
                    "compute_time_s": col("compute_time_s")}
            for name, values in cols.items():
                trained[name][plan.kept] = values
            reason[np.flatnonzero(plan.kept)[~ok]] = "nonfinite"
            if ok.any():
                good = torch.from_numpy(vectors if ok.all() else vectors[ok])
                mean = weighted_mean(good, torch.from_numpy(weights[ok]))  # summed in float64
                new_theta = ctx.opt.step(pseudo_gradient(ctx.algo, mean))
                update_norm = float(torch.linalg.vector_norm(new_theta - theta))
                theta, version = new_theta, version + 1
                losses, losses_before = after[ok], col("loss_before")[ok]
        counted = reason == ""
        end = plan.end if online.any() else (ctx.devices.next_online_time(t0) or t0)
        clock = clock.advance_to(end)
        for part in (plan.kept, ~plan.kept):  # trained clients first, then the others
            if part.any():
                k = int(part.sum())
                ctx.writer.tables["clients"].extend(client_rows(
                    r, ids[part], _take(profiles, part), n_samples[part], np.full(k, t0), plan.finish[part],
                    reason[part], np.full(k, base), np.zeros(k, np.int64), np.where(counted[part], 1.0, np.nan),
                    {name: values[part] for name, values in trained.items()}))
        drops = drop_counts(reason)
        ctx.record_round({
            "round": r, "model_version": version, "sim_time": clock.now, "round_sim_duration": clock.now - t0,
            "num_sampled": ids.size, "num_completed": int(counted.sum()), "num_dropped": sum(drops.values()),
            **drops, "staleness_mean": 0.0 if counted.any() else math.nan,
            "staleness_max": 0.0 if counted.any() else math.nan,
            "bytes_up": ctx.update_bytes * int(plan.kept.sum()), "bytes_down": ctx.model_bytes * int(online.sum()),
            "train_loss": float(np.mean(losses)) if losses.size else math.nan,
            "train_loss_before": float(np.mean(losses_before)) if losses.size else math.nan,
            "update_norm": update_norm}, theta)
        ctx.completed(r + 1, {"version": version, "clock": clock.now})


def _nan_columns(k: int) -> dict[str, np.ndarray]:
    """clients.parquet's training columns for clients that were not trained (NaN / -1 / 0)."""
    return {"actor_id": np.full(k, -1, np.int64), "samples_processed": np.zeros(k, np.int64),
            "weight": np.full(k, np.nan), "loss_before": np.full(k, np.nan), "loss_after": np.full(k, np.nan),
            "update_norm": np.full(k, np.nan), "compute_time_s": np.full(k, np.nan)}


def _take(p: Profiles, mask: np.ndarray) -> Profiles:
    return Profiles(p.client_ids[mask], p.compute_speed[mask], p.up_bw[mask], p.down_bw[mask])


def run(cfg: ExperimentConfig, backend: Backend, run_dir: Path, prepared: Prepared | None = None,
        on_round: RoundCallback | None = None, resume: bool = False) -> dict[str, Any]:
    """Run ``cfg.rounds`` rounds (in async mode: server updates); write metrics, the label
    histogram of a partitioned dataset, checkpoints and ``summary.json`` into ``run_dir``.

    ``resume``: continue the run in ``run_dir`` from its checkpoint (``simulator.checkpoint``); the
    finished run is identical to one never interrupted. Ctrl-C (KeyboardInterrupt) and workers
    failing beyond ``system.max_failures`` stop after the last completed round: its metrics are
    flushed, a checkpoint is written, and the summary's status is "interrupted" or "failed".
    """
    ctx = RunContext(cfg, backend, run_dir, prepared, on_round, resume)
    _write_label_histogram(ctx, run_dir)
    status, error = "completed", None
    try:
        if cfg.system.mode == "async":
            from simulator.async_driver import Stalled, async_rounds

            try:
                async_rounds(ctx)
            except Stalled as exc:
                log.warning("run stopped early: %s", exc)
                status = "stalled"
        else:
            _sync_rounds(ctx)
    except KeyboardInterrupt:
        status = "interrupted"
    except WorkerFailure as exc:
        status, error = "failed", str(exc)
        log.error("run stopped: %s", exc)
    finally:
        ctx.writer.rollback()  # rows of a round that did not complete
        ctx.save_checkpoint()
    summary = build_summary(cfg, ctx.history, status, time.perf_counter() - ctx.start, backend.describe(), error)
    write_json(run_dir / "summary.json", summary)
    return summary


def _write_label_histogram(ctx: RunContext, run_dir: Path) -> None:
    """``label_histogram.parquet``: client_id, label, count (non-zero counts) of a partitioned dataset."""
    hist = ctx.dataset.label_histogram()
    if hist is None:
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    from simulator.metrics import atomic_write_bytes

    client, label = np.nonzero(hist)
    table = pa.table({"client_id": client.astype(np.int64), "label": label.astype(np.int64),
                      "count": hist[client, label].astype(np.int64)})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    atomic_write_bytes(run_dir / "label_histogram.parquet", sink.getvalue().to_pybytes())
