"""Synchronous-style rounds: ``system.mode`` = "sync", "deadline" or "overselect".

Each round samples a seeded cohort, decides from the clients' device profiles who will count and when the
round ends (``scheduling.plan_round``), hands the kept clients to the backend in one call per worker, puts
the results back into cohort order, rejects non-finite updates, aggregates (a weighted mean in cohort
order, in float64), applies the server optimizer, evaluates on held-out clients when due, and appends the
round's rows. The asynchronous mode is ``rounds.asynchronous``; both are written against ``RunContext``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from simulator.algorithms.aggregation import weighted_mean
from simulator.algorithms.record import pseudo_gradient
from simulator.rounds.context import RunContext
from simulator.rounds.rows import client_rows, finite_updates, nan_columns, ordered, round_row, take_profiles
from simulator.scheduling import VirtualClock, cohort_size, plan_round, sample_cohort


def sync_rounds(ctx: RunContext) -> None:
    """``cfg.rounds`` rounds of the sync, deadline or overselect policy (from the checkpoint when resumed)."""
    cfg, s = ctx.cfg, ctx.cfg.system
    theta, version, clock, first = ctx.opt.params, 0, VirtualClock(), 0
    if ctx.resumed:
        version, clock, first = ctx.resumed["version"], VirtualClock(ctx.resumed["clock"]), ctx.resumed["next_round"]
    dp = ctx.privacy
    for r in range(first, cfg.rounds):
        dp.check()  # the budget stop: before a round that would take epsilon past privacy.target_epsilon
        t0 = clock.now
        ids = sample_cohort(cfg.seed, r, cfg.data.num_clients, cohort_size(s.mode, cfg.clients.per_round,
                                                                             s.overselect))
        profiles, n_samples, samples, durations = ctx.plan(ids)
        online = ctx.devices.online(ids, t0, r)
        plan = plan_round(s.mode, t0, ids, durations, online, ctx.devices.dropout_fraction(ids, r),
                          cfg.clients.per_round, s.deadline_s)
        reason, base = plan.reason.copy(), version
        trained = nan_columns(ids.size)
        update_norm, losses, losses_before = math.nan, np.zeros(0), np.zeros(0)
        if plan.kept.any():
            kept = ids[plan.kept]
            col, workers = ordered(ctx.train(theta, r, kept), kept)
            if not np.array_equal(col("samples_processed"), samples[plan.kept]):
                raise RuntimeError("a worker processed a different number of samples than planned at dispatch")
            vectors, after = col("vectors"), col("loss_after")
            ok = finite_updates(vectors, after)
            weights = np.array([(1.0 if dp.on else ctx.opt.client_weight(int(n))) if good else math.nan
                                for n, good in zip(col("num_samples"), ok, strict=True)])
            cols = {"actor_id": workers, "samples_processed": col("samples_processed"), "weight": weights,
                    "loss_before": col("loss_before"), "loss_after": after,
                    "update_norm": torch.linalg.vector_norm(torch.from_numpy(vectors), dim=1).double().numpy(),
                    "compute_time_s": col("compute_time_s")}
            for name, values in cols.items():
                trained[name][plan.kept] = values
            reason[np.flatnonzero(plan.kept)[~ok]] = "nonfinite"
            if ok.any() or dp.on:  # with DP a round whose uploads were all non-finite still releases its noise
                if dp.on:  # clipped, noised, over the fixed denominator per_round (simulator.privacy)
                    mean = dp.mean(vectors, ok, kept, r, r, cfg.clients.per_round)
                else:
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
                    r, ids[part], take_profiles(profiles, part), n_samples[part], np.full(k, t0), plan.finish[part],
                    reason[part], np.full(k, base), np.zeros(k, np.int64), np.where(counted[part], 1.0, np.nan),
                    {name: values[part] for name, values in trained.items()}))
        row = round_row(r, version, clock.now, t0, ids.size, reason, np.zeros(int(counted.sum())),
                        ctx.update_bytes * int(plan.kept.sum()), ctx.model_bytes * int(online.sum()), losses,
                        losses_before, update_norm)
        ctx.record_round(row, theta)
        ctx.completed(r + 1, {"version": version, "clock": clock.now})
