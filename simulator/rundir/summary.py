"""A run's ``summary.json``: status, counts, first and final held-out evaluation, and throughput."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from simulator.config.schema import ExperimentConfig
from simulator.scheduling import DROP_REASONS


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
                  workers: list[dict[str, object]], error: str | None = None) -> dict[str, Any]:
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
        "dropped": {reason: sum(h.get(f"dropped_{reason}", 0) for h in history) for reason in DROP_REASONS},
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
        "workers": workers,
        "dp_epsilon": history[-1].get("dp_epsilon") if history and cfg.privacy.mode != "off" else None,
        "dp_delta": cfg.privacy.delta if cfg.privacy.mode != "off" else None,
        **({"error": error} if error else {}),
    }
