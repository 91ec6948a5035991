"""The driver: owns the server model and the virtual clock, and runs synchronous rounds.

Each round it samples a seeded cohort, hands it to the backend (Ray actor pool or in-process)
in one call per worker, collects results as they complete, puts them back into cohort order,
aggregates, applies the server optimizer, evaluates on held-out clients when due, and
appends metrics. The backend is passed in: this module never imports Ray.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from simulator.aggregation import weighted_mean
from simulator.algorithms import ALGORITHMS, ServerOptimizer, client_weight, pseudo_gradient
from simulator.config import ExperimentConfig
from simulator.data import make_dataset
from simulator.evaluation import STATS, summarize
from simulator.metrics import MetricsWriter, write_json
from simulator.models import build_model, check_output_shape, flat_params
from simulator.scheduling import (
    DEFAULT_PROFILE,
    VirtualClock,
    client_duration,
    sample_cohort,
    select_eval_clients,
)
from simulator.worker import EvalResult, TrainResult


class Backend(Protocol):
    num_workers: int

    def map(self, method: str, theta: np.ndarray, round_idx: int,
            client_ids: np.ndarray) -> Iterator[TrainResult | EvalResult]: ...

    def describe(self) -> list[dict[str, object]]: ...

    def close(self) -> None: ...


def prepare(cfg: ExperimentConfig) -> torch.Tensor:
    """The initial server parameters, built before any run directory exists: a bad model factory
    or a model that does not fit the data raises ConfigError here."""
    dataset = make_dataset(cfg.data, cfg.seed)
    model = build_model(cfg.model, dataset.input_dim, dataset.output_dim, cfg.seed)
    check_output_shape(model, dataset.input_dim, dataset.output_dim)
    return flat_params(model)


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


def run(cfg: ExperimentConfig, backend: Backend, run_dir: Path, theta0: torch.Tensor | None = None,
        on_round: RoundCallback | None = None) -> dict[str, Any]:
    """Run ``cfg.rounds`` synchronous rounds; write metrics and ``summary.json`` into ``run_dir``.

    Ctrl-C (KeyboardInterrupt) stops after the current round's metrics are flushed; the
    summary then says ``"status": "interrupted"``.
    """
    algo = ALGORITHMS[cfg.algorithm.name]
    opt = ServerOptimizer(prepare(cfg) if theta0 is None else theta0, cfg.algorithm)
    theta = opt.params
    model_bytes = update_bytes = theta.numel() * theta.element_size()
    eval_ids = select_eval_clients(cfg.seed, cfg.data.num_clients, cfg.data.eval_clients, cfg.eval.clients)
    writer = MetricsWriter(run_dir, cfg.metrics.flush_every)
    clock = VirtualClock()
    start = time.perf_counter()
    history: list[dict[str, Any]] = []  # the rows written to rounds.parquet
    status = "completed"
    try:
        for r in range(cfg.rounds):
            cohort = sample_cohort(cfg.seed, r, cfg.data.num_clients, cfg.clients.per_round)
            chunks = list(backend.map("train", theta.numpy(), r, cohort))
            col, workers = _ordered(chunks, cohort)
            vectors = torch.from_numpy(col("vectors"))
            n_samples = col("num_samples")
            weights = np.array([client_weight(algo, int(n)) for n in n_samples])
            mean = weighted_mean(vectors.double(), torch.from_numpy(weights)).float()
            new_theta = opt.step(pseudo_gradient(algo, mean))
            update_norm = float(torch.linalg.vector_norm(new_theta - theta))
            theta = new_theta
            durations = np.array([client_duration(DEFAULT_PROFILE, int(s), model_bytes, update_bytes)
                                  for s in col("samples_processed")])
            round_start = clock.now
            clock = clock.after_sync_round(durations)

            ev = None
            if r % cfg.eval.every == 0 or r == cfg.rounds - 1:
                if len(eval_ids):
                    ev_chunks = list(backend.map("evaluate", theta.numpy(), r, eval_ids))
                    ev_col, ev_workers = _ordered(ev_chunks, eval_ids)
                    ev = EvalResult(-1, eval_ids, ev_col("loss_pre"), ev_col("loss_post"),
                                    ev_col("metric_pre"), ev_col("metric_post"))
                    writer.tables["evals"].extend({
                        "round": np.full(len(eval_ids), r), "client_id": eval_ids, "actor_id": ev_workers,
                        "loss_pre": ev.loss_pre, "loss_post": ev.loss_post,
                        "metric_pre": ev.metric_pre, "metric_post": ev.metric_post})

            wall = time.perf_counter() - start
            loss_after, loss_before = col("loss_after"), col("loss_before")
            row = {"round": r, "model_version": r + 1, "sim_time": clock.now,
                   "round_sim_duration": clock.now - round_start, "wall_time": wall,
                   "num_sampled": len(cohort), "num_completed": len(cohort), "num_dropped": 0,
                   "train_loss": float(np.mean(loss_after)), "train_loss_before": float(np.mean(loss_before)),
                   "update_norm": update_norm, **_eval_columns(ev)}
            writer.tables["rounds"].append(row)
            writer.tables["clients"].extend({
                "round": np.full(len(cohort), r), "client_id": cohort, "actor_id": workers,
                "num_samples": n_samples, "samples_processed": col("samples_processed"), "weight": weights,
                "loss_before": loss_before, "loss_after": loss_after,
                "update_norm": torch.linalg.vector_norm(vectors, dim=1).double().numpy(),
                "compute_time_s": col("compute_time_s"), "sim_start": np.full(len(cohort), round_start),
                "sim_duration_s": durations, "sim_finish": round_start + durations})
            writer.end_round(r)
            history.append(row)
            if on_round is not None:
                on_round(row)
    except KeyboardInterrupt:
        status = "interrupted"
    finally:
        writer.flush()
    summary = build_summary(cfg, history, status, time.perf_counter() - start, backend)
    write_json(run_dir / "summary.json", summary)
    return summary


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
        "rounds_completed": len(history),
        "rounds_planned": cfg.rounds,
        "client_updates": updates,
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
