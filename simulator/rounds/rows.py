"""Rows of the metrics tables that both modes write, and putting a backend's chunk results back in order.

A round's results arrive chunk by chunk in whatever order the workers finish; ``ordered`` puts them back
into cohort order before anything is aggregated or written, so the sums (and the tables) never depend on
the number of actors or on Ray's completion order.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from simulator.client.evaluation import STATS, summarize
from simulator.contract import EvalResult
from simulator.scheduling import Profiles, drop_counts


def ordered(chunks: list[Any], client_ids: np.ndarray) -> tuple[Callable[[str], np.ndarray], np.ndarray]:
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


def eval_columns(ev: EvalResult | None) -> dict[str, float]:
    cols: dict[str, float] = {}
    for what, when in (("loss", "pre"), ("loss", "post"), ("metric", "pre"), ("metric", "post")):
        stats = summarize(getattr(ev, f"{what}_{when}")) if ev is not None else dict.fromkeys(STATS, math.nan)
        for s, v in stats.items():
            cols[f"eval_{what}_{when}{'' if s == 'mean' else '_' + s}"] = v
    return cols


def round_row(r: int, version: int, now: float, start: float, sampled: int, reasons: np.ndarray | list[str],
              staleness: np.ndarray, bytes_up: int, bytes_down: int, losses: np.ndarray, losses_before: np.ndarray,
              update_norm: float) -> dict[str, Any]:
    """One rounds.parquet row (evaluation columns and wall time are added by ``RunContext.record_round``):
    ``reasons`` one drop reason per sampled client ("" = counted), ``staleness`` one value per aggregated
    update, ``losses`` their losses after (and before) local work; NaN where nothing was aggregated."""
    drops = drop_counts(reasons)
    return {"round": r, "model_version": version, "sim_time_s": now, "round_sim_duration_s": now - start,
            "num_sampled": sampled, "num_completed": int(staleness.size), "num_dropped": sum(drops.values()), **drops,
            "staleness_mean": float(staleness.mean()) if staleness.size else math.nan,
            "staleness_max": float(staleness.max()) if staleness.size else math.nan,
            "bytes_up": bytes_up, "bytes_down": bytes_down,
            "train_loss": float(np.mean(losses)) if losses.size else math.nan,
            "train_loss_before": float(np.mean(losses_before)) if losses.size else math.nan,
            "update_norm": update_norm}


def ids_text(ids: np.ndarray, limit: int = 8) -> str:
    shown = ", ".join(str(int(c)) for c in ids[:limit])
    return f"[{shown}{', ...' if len(ids) > limit else ''}] ({len(ids)})"


def client_rows(r: int, ids: np.ndarray, profiles: Profiles, n_samples: np.ndarray, start: np.ndarray,
                finish: np.ndarray, reasons: np.ndarray, start_version: np.ndarray, staleness: np.ndarray,
                staleness_weight: np.ndarray, trained: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Columns of clients.parquet for some clients; training columns are NaN / -1 / 0 for clients
    that were not trained (``trained`` holds actor_id, samples_processed, weight, losses, norms, time)."""
    k = len(ids)
    t = trained or nan_columns(k)
    return {"round": np.full(k, r), "client_id": ids, "num_samples": n_samples, **t, "sim_start_s": start,
            "sim_duration_s": finish - start, "sim_finish_s": finish, "start_version": start_version,
            "staleness": staleness, "staleness_weight": staleness_weight, "dropped": reasons != "",
            "drop_reason": reasons, "compute_speed": profiles.compute_speed, "up_bw": profiles.up_bw,
            "down_bw": profiles.down_bw}


def nan_columns(k: int) -> dict[str, np.ndarray]:
    """clients.parquet's training columns for clients that were not trained (NaN / -1 / 0)."""
    return {"actor_id": np.full(k, -1, np.int64), "samples_processed": np.zeros(k, np.int64),
            "weight": np.full(k, np.nan), "loss_before": np.full(k, np.nan), "loss_after": np.full(k, np.nan),
            "update_norm": np.full(k, np.nan), "compute_time_s": np.full(k, np.nan)}


def take_profiles(p: Profiles, mask: np.ndarray) -> Profiles:
    return Profiles(p.client_ids[mask], p.compute_speed[mask], p.up_bw[mask], p.down_bw[mask])
