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

from simulator.aggregation import weighted_mean
from simulator.algorithms import (
    ALGORITHMS,
    Algorithm,
    ServerOptimizer,
    initial_vector,
    planned_samples,
    pseudo_gradient,
)
from simulator.config import ExperimentConfig
from simulator.data import FederatedDataset, make_dataset
from simulator.evaluation import STATS, summarize
from simulator.metrics import MetricsWriter, write_json
from simulator.models import build_model, check_output_shape, flat_params
from simulator.scheduling import (
    DROP_REASONS,
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
from simulator.worker import EvalResult, TrainResult

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
    check_output_shape(model, dataset.input_dim, dataset.output_dim)
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

    def field(name: str) -> np.ndarray:
        return np.concatenate([getattr(c, name) for c in chunks])[order]

    return field, workers[order]


def _eval_columns(ev: EvalResult | None) -> dict[str, float]:
    cols: dict[str, float] = {}
    for what, when in (("loss", "pre"), ("loss", "post"), ("metric", "pre"), ("metric", "post")):
        stats = summarize(getattr(ev, f"{what}_{when}")) if ev is not None else dict.fromkeys(STATS, math.nan)
        for s, v in stats.items():
            cols[f"eval_{what}_{when}{'' if s == 'mean' else '_' + s}"] = v
    return cols


RoundCallback = Callable[[dict[str, Any]], None]


class RunContext:
    """What every mode shares: config, backend, server optimizer, devices, metrics and history."""

    def __init__(self, cfg: ExperimentConfig, backend: Backend, run_dir: Path, prepared: Prepared | None,
                 on_round: RoundCallback | None) -> None:
        self.cfg, self.backend, self.on_round = cfg, backend, on_round
        self.algo = ALGORITHMS[cfg.algorithm.name]
        prepared = prepared or prepare(cfg)
        self.opt = ServerOptimizer(prepared.theta0, cfg.algorithm)
        self.dataset, self.devices = prepared.dataset, prepared.devices
        p = self.opt.params
        self.model_bytes = self.update_bytes = p.numel() * p.element_size()
        self.eval_ids = select_eval_clients(cfg.seed, cfg.data.num_clients, cfg.data.eval_clients, cfg.eval.clients)
        self.writer = MetricsWriter(run_dir, cfg.metrics.flush_every)
        self.start = time.perf_counter()
        self.history: list[dict[str, Any]] = []

    def plan(self, client_ids: np.ndarray) -> tuple[Profiles, np.ndarray, np.ndarray, np.ndarray]:
        return plan_clients(self.cfg, self.algo, self.dataset, self.devices, client_ids, self.model_bytes)

    def evaluate(self, theta: torch.Tensor, r: int) -> EvalResult | None:
        if not len(self.eval_ids):
            return None
        chunks = list(self.backend.map("evaluate", theta.numpy(), r, self.eval_ids))
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
        if self.on_round is not None:
            self.on_round(row)


def client_rows(r: int, ids: np.ndarray, profiles: Profiles, n_samples: np.ndarray, start: np.ndarray,
                finish: np.ndarray, reasons: np.ndarray, start_version: np.ndarray, staleness: np.ndarray,
                staleness_weight: np.ndarray, trained: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Columns of clients.parquet for some clients; training columns are NaN / -1 / 0 for clients
    that were not trained (``trained`` holds actor_id, samples_processed, weight, losses, norms, time)."""
    k = len(ids)
    nan = np.full(k, np.nan)
    t = trained or {"actor_id": np.full(k, -1), "samples_processed": np.zeros(k, np.int64), "weight": nan,
                    "loss_before": nan, "loss_after": nan, "update_norm": nan, "compute_time_s": nan}
    return {"round": np.full(k, r), "client_id": ids, "num_samples": n_samples, **t, "sim_start": start,
            "sim_duration_s": finish - start, "sim_finish": finish, "start_version": start_version,
            "staleness": staleness, "staleness_weight": staleness_weight, "dropped": reasons != "",
            "drop_reason": reasons, "compute_speed": profiles.compute_speed, "up_bw": profiles.up_bw,
            "down_bw": profiles.down_bw}


def _sync_rounds(ctx: RunContext) -> None:
    """``cfg.rounds`` rounds of the sync, deadline or overselect policy."""
    cfg, s = ctx.cfg, ctx.cfg.system
    theta, version, clock = ctx.opt.params, 0, VirtualClock()
    for r in range(cfg.rounds):
        t0 = clock.now
        ids = sample_cohort(cfg.seed, r, cfg.data.num_clients, cohort_size(s.mode, cfg.clients.per_round,
                                                                             s.overselect))
        profiles, n_samples, samples, durations = ctx.plan(ids)
        online = ctx.devices.online(ids, t0, r)
        plan = plan_round(s.mode, t0, ids, durations, online, ctx.devices.dropout_fraction(ids, r),
                          cfg.clients.per_round, s.deadline_s)
        kept, base = ids[plan.kept], version
        trained: dict[str, np.ndarray] | None = None
        update_norm, losses, losses_before = math.nan, np.zeros(0), np.zeros(0)
        if kept.size:
            col, workers = _ordered(list(ctx.backend.map("train", theta.numpy(), r, kept)), kept)
            if not np.array_equal(col("samples_processed"), samples[plan.kept]):
                raise RuntimeError("a worker processed a different number of samples than planned at dispatch")
            vectors = torch.from_numpy(col("vectors"))
            weights = np.array([ctx.opt.client_weight(int(n)) for n in col("num_samples")])
            mean = weighted_mean(vectors.double(), torch.from_numpy(weights)).float()
            new_theta = ctx.opt.step(pseudo_gradient(ctx.algo, mean))
            update_norm = float(torch.linalg.vector_norm(new_theta - theta))
            theta, version = new_theta, version + 1
            losses, losses_before = col("loss_after"), col("loss_before")
            trained = {"actor_id": workers, "samples_processed": col("samples_processed"), "weight": weights,
                       "loss_before": losses_before, "loss_after": losses,
                       "update_norm": torch.linalg.vector_norm(vectors, dim=1).double().numpy(),
                       "compute_time_s": col("compute_time_s")}
        end = plan.end if online.any() else (ctx.devices.next_online_time(t0) or t0)
        clock = clock.advance_to(end)
        for part, rows in ((plan.kept, trained), (~plan.kept, None)):
            if part.any():
                k = int(part.sum())
                ctx.writer.tables["clients"].extend(client_rows(
                    r, ids[part], _take(profiles, part), n_samples[part], np.full(k, t0), plan.finish[part],
                    plan.reason[part], np.full(k, base), np.zeros(k, np.int64),
                    np.full(k, 1.0 if rows is not None else np.nan), rows))
        drops = drop_counts(plan.reason)
        ctx.record_round({
            "round": r, "model_version": version, "sim_time": clock.now, "round_sim_duration": clock.now - t0,
            "num_sampled": ids.size, "num_completed": kept.size, "num_dropped": sum(drops.values()), **drops,
            "staleness_mean": 0.0 if kept.size else math.nan, "staleness_max": 0.0 if kept.size else math.nan,
            "bytes_up": ctx.update_bytes * kept.size, "bytes_down": ctx.model_bytes * int(online.sum()),
            "train_loss": float(np.mean(losses)) if losses.size else math.nan,
            "train_loss_before": float(np.mean(losses_before)) if losses.size else math.nan,
            "update_norm": update_norm}, theta)


def _take(p: Profiles, mask: np.ndarray) -> Profiles:
    return Profiles(p.client_ids[mask], p.compute_speed[mask], p.up_bw[mask], p.down_bw[mask])


def run(cfg: ExperimentConfig, backend: Backend, run_dir: Path, prepared: Prepared | None = None,
        on_round: RoundCallback | None = None) -> dict[str, Any]:
    """Run ``cfg.rounds`` rounds (in async mode: server updates); write metrics, the label
    histogram of a partitioned dataset, and ``summary.json`` into ``run_dir``.

    Ctrl-C (KeyboardInterrupt) stops after the current round's metrics are flushed; the
    summary then says ``"status": "interrupted"``.
    """
    ctx = RunContext(cfg, backend, run_dir, prepared, on_round)
    _write_label_histogram(ctx, run_dir)
    status = "completed"
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
    finally:
        ctx.writer.flush()
    summary = build_summary(cfg, ctx.history, status, time.perf_counter() - ctx.start, backend)
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


def steady_throughput(clients: list[int] | np.ndarray, durations: list[float] | np.ndarray) -> float | None:
    """Client updates per second in steady state: median clients per round / median round time,
    from the second round on (the first pays for warm-up and shard building). The anchor
    benchmark's definition, used for metafleet's summaries and for the plain-loop baseline."""
    if len(durations) < 2:
        return None
    return float(np.median(clients[1:]) / np.median(durations[1:]))


def steady_updates_per_s(history: list[dict[str, Any]]) -> float | None:
    """``steady_throughput`` of a run's rounds (``wall_time`` is cumulative)."""
    return steady_throughput([h["num_completed"] for h in history],
                             np.diff([0.0] + [h["wall_time"] for h in history]))


def build_summary(cfg: ExperimentConfig, history: list[dict[str, Any]], status: str, wall: float,
                  backend: Backend) -> dict[str, Any]:
    evals = [h for h in history if not math.isnan(h["eval_loss_post"])]
    keys = ("eval_loss_pre", "eval_loss_post", "eval_metric_pre", "eval_metric_post")
    updates = sum(h["num_completed"] for h in history)
    return {
        "status": status,
        "name": cfg.name,
        "algorithm": cfg.algorithm.name,
        "dataset": cfg.data.name,
        "mode": cfg.system.mode,
        "rounds_completed": len(history),
        "rounds_planned": cfg.rounds,
        "client_updates": updates,
        "dropped": {reason: sum(h[f"dropped_{reason}"] for h in history) for reason in DROP_REASONS},
        "final_train_loss": history[-1]["train_loss"] if history else None,
        "first_eval": {"round": evals[0]["round"], **{k: evals[0][k] for k in keys}} if evals else None,
        "final_eval": {"round": evals[-1]["round"], **{k: evals[-1][k] for k in keys}} if evals else None,
        "best_eval_loss_post": min(h["eval_loss_post"] for h in evals) if evals else None,
        "eval_clients": cfg.eval.clients,
        "adapt_steps": cfg.eval.adapt_steps,
        "sim_time_s": history[-1]["sim_time"] if history else 0.0,
        "wall_time_s": wall,
        "updates_per_s": updates / wall if wall > 0 else None,
        "steady_updates_per_s": steady_updates_per_s(history),
        "workers": backend.describe(),
    }
