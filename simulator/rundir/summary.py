"""A run's ``summary.json``: status, counts, first and final held-out evaluation, and throughput.

The summary is strict JSON: a value that was not measured (NaN in the driver's rows: accuracy of a regression
task, the training loss of a round that aggregated nothing) is ``null``, and an infinite one (epsilon of DP
with clipping only, sigma = 0) is the string ``"inf"`` (``json_value``)."""

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
    """``steady_throughput`` of a run's rounds (``wall_time_s`` is cumulative)."""
    return steady_throughput([h["num_completed"] for h in history],
                             np.diff([0.0] + [h["wall_time_s"] for h in history]))


def json_value(x: Any) -> Any:
    """A number as strict JSON holds it: NaN -> None ("not measured"), +-inf -> "inf" / "-inf"; other values
    (dicts and lists element by element) as they are."""
    if isinstance(x, dict):
        return {k: json_value(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [json_value(v) for v in x]
    if isinstance(x, float | np.floating):
        if math.isnan(x):
            return None
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        return float(x)
    return x


def build_summary(cfg: ExperimentConfig, history: list[dict[str, Any]], status: str, wall: float,
                  workers: list[dict[str, object]], error: str | None = None) -> dict[str, Any]:
    evals = [h for h in history if not math.isnan(h["eval_loss_post"])]
    keys = ("eval_loss_pre", "eval_loss_post", "eval_metric_pre", "eval_metric_post")
    updates = sum(h["num_completed"] for h in history)
    return json_value({
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
        "sim_time_s": history[-1]["sim_time_s"] if history else 0.0,
        "wall_time_s": wall,
        "updates_per_s": updates / wall if wall > 0 else None,
        "steady_updates_per_s": steady_updates_per_s(history),
        "workers": workers,
        "dp_epsilon": history[-1].get("dp_epsilon") if history and cfg.privacy.mode != "off" else None,
        "dp_delta": cfg.privacy.delta if cfg.privacy.mode != "off" else None,
        **({"error": error} if error else {}),
    })
