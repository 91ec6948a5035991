"""Synchronous-style rounds: ``system.mode`` = "sync", "deadline" or "overselect".

Each round samples a seeded cohort, decides from the clients' device profiles who will count and when the
round ends (``scheduling.plan_round``), hands the kept clients to the backend in one call per worker together
with a ``Reduction``: each worker rejects its non-finite updates, clips them under DP and sums its chunk on the
exact fixed-point grid (``simulator.client.reduce``, ``algorithms.exactsum``), so the driver receives per-client
scalars, never a vector per client. The partial sums combine exactly (the same sum whatever the actor count,
chunking or completion order) into the round's float32 mean, on the driver or next to the partials in a worker
(``system.combine``). The driver applies the server optimizer, evaluates on held-out clients when due, and
appends the round's rows. The asynchronous mode is ``rounds.asynchronous``; both are written against
``RunContext``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from simulator.algorithms.exactsum import DEFAULT_BOUND, Grid, weight_total
from simulator.algorithms.server import update_norm as server_update_norm
from simulator.contract import Reduction, Release, TrainResult
from simulator.params import readonly_tensor
from simulator.rounds.context import RunContext
from simulator.rounds.rows import client_rows, nan_columns, ordered, round_row, take_profiles
from simulator.scheduling import Profiles, RoundPlan, VirtualClock, cohort_size, plan_round, sample_cohort


@dataclass(frozen=True)
class Planned:
    """One round decided before any client trains: a pure function of (seed, round, start time), so round r + 1's
    plan is computed while round r's clients train."""

    r: int
    t0: float
    ids: np.ndarray
    profiles: Profiles
    n_samples: np.ndarray
    samples: np.ndarray
    online: np.ndarray
    plan: RoundPlan

    @property
    def kept(self) -> np.ndarray:
        return self.ids[self.plan.kept]

    def end(self, ctx: RunContext) -> float:
        """When the round ends: its plan's end, or (nobody online) when the next client comes online."""
        return self.plan.end if self.online.any() else (ctx.devices.next_online_time(self.t0) or self.t0)


def plan_sync_round(ctx: RunContext, r: int, t0: float) -> Planned:
    cfg, s = ctx.cfg, ctx.cfg.system
    ids = sample_cohort(cfg.seed, r, cfg.data.num_clients, cohort_size(s.mode, cfg.clients.per_round, s.overselect))
    profiles, n_samples, samples, durations = ctx.plan(ids)
    online = ctx.devices.online(ids, t0, r)
    plan = plan_round(s.mode, t0, ids, durations, online, ctx.devices.dropout_fraction(ids, r), cfg.clients.per_round,
                      s.deadline_s)
    return Planned(r, t0, ids, profiles, n_samples, samples, online, plan)


def reduction(ctx: RunContext, p: Planned) -> tuple[Reduction, np.ndarray]:
    """What the workers need to reduce round ``p``'s uploads, and the kept clients' weights w_i (FedAvg: n_i, else 1;
    1 under DP). Without DP the coefficients are w_i / sum_j w_j over the kept clients, computed as
    ``aggregation.fedbuff_mean`` computes them (so a full FedBuff buffer reproduces a sync round bit for bit)."""
    w = ctx.opt.client_weights(p.n_samples[p.plan.kept])
    if ctx.privacy.on:  # clipped, noised, over the fixed denominator per_round (simulator.privacy)
        return ctx.privacy.reduction(p.kept, ctx.cfg.clients.per_round), np.ones(len(w))
    c = torch.from_numpy(w)
    coefs = ((c / weight_total(w)) * torch.ones_like(c)).numpy()
    return Reduction(p.kept, coefs, Grid.for_bound(DEFAULT_BOUND, float(np.abs(coefs).sum()))), w


def releasing(ctx: RunContext, p: Planned, w: np.ndarray, chunks: list[TrainResult]) -> Release | None:
    """How round ``p``'s reduced sum becomes its mean, from its chunks' scalars. Without DP: no release when every
    upload was non-finite, else the sum renormalized once when some were (the coefficients were w_i / the sum
    over all kept clients). With DP every round releases (its noise, even when every upload was rejected)."""
    if ctx.privacy.on:
        return ctx.privacy.finishing(p.kept, p.r, ctx.cfg.clients.per_round)
    ok = ordered(chunks, p.kept)[0]("accepted")
    if not ok.any():
        return None
    return Release(p.kept, 1.0 if ok.all() else weight_total(w) / weight_total(w[ok]))


def sync_rounds(ctx: RunContext) -> None:
    """``cfg.rounds`` rounds of the sync, deadline or overselect policy (from the checkpoint when resumed).

    Overlap: round r + 1 is planned while round r's clients train, and round r + 1's training is dispatched as soon
    as the model it starts from exists, before round r's rows, evaluation and checkpoint are written (with the
    in-process backend the work still runs when it is collected: the results are the same)."""
    cfg = ctx.cfg
    theta, version, clock, first = ctx.opt.state.theta, 0, VirtualClock(), 0  # never changed in place
    if ctx.resumed:
        version, clock, first = ctx.resumed["version"], VirtualClock(ctx.resumed["clock"]), ctx.resumed["next_round"]
    dp = ctx.privacy
    nxt = plan_sync_round(ctx, first, clock.now) if first < cfg.rounds else None
    inflight = None
    for r in range(first, cfg.rounds):
        dp.check()  # the budget stop: before a round that would take epsilon past privacy.target_epsilon
        p, t0 = nxt, clock.now
        assert p is not None and p.r == r and p.t0 == t0
        ids, plan = p.ids, p.plan
        red, w = reduction(ctx, p) if plan.kept.any() else (None, np.zeros(0))
        if red is not None and inflight is None:
            inflight = ctx.dispatch(theta, r, p.kept, red)
        end = p.end(ctx)
        nxt = plan_sync_round(ctx, r + 1, end) if r + 1 < cfg.rounds else None  # while the actors compute
        if cfg.system.prefetch and nxt is not None and nxt.plan.kept.any():  # shards built between r and r + 1
            ctx.backend.prefetch(nxt.kept)
        reason, base = plan.reason.copy(), version
        trained = nan_columns(ids.size)
        update_norm, losses, losses_before = math.nan, np.zeros(0), np.zeros(0)
        if inflight is not None:
            kept = p.kept
            (chunks, released), inflight = inflight(partial(releasing, ctx, p, w)), None
            col, workers = ordered(chunks, kept)
            if not np.array_equal(col("samples_processed"), p.samples[plan.kept]) or \
                    not np.array_equal(col("num_samples"), p.n_samples[plan.kept]):
                raise RuntimeError("a worker processed a different number of samples than planned at dispatch")
            after, ok = col("loss_after"), col("accepted")
            cols = {"actor_id": workers, "samples_processed": col("samples_processed"),
                    "weight": np.where(ok, w, math.nan), "loss_before": col("loss_before"), "loss_after": after,
                    "update_norm": col("update_norm"), "compute_time_s": col("compute_time_s")}
            for name, values in cols.items():
                trained[name][plan.kept] = values
            reason[np.flatnonzero(plan.kept)[~ok]] = "nonfinite"
            if released is not None:
                if dp.on:
                    dp.record(col("clip_norm")[ok], kept, r, cfg.clients.per_round)
                new_theta = ctx.opt.step_mean(readonly_tensor(released))  # block by block: no model-sized temporary
                del released  # the mean: not held through the bookkeeping and the next round's sum
                update_norm = server_update_norm(new_theta, theta)
                theta, version = new_theta, version + 1
                losses, losses_before = after[ok], col("loss_before")[ok]
        if nxt is not None and nxt.plan.kept.any() and dp.allows():  # round r + 1 trains during r's bookkeeping
            inflight = ctx.dispatch(theta, r + 1, nxt.kept, reduction(ctx, nxt)[0])
        counted = reason == ""
        clock = clock.advance_to(end)
        for part in (plan.kept, ~plan.kept):  # trained clients first, then the others
            if part.any():
                k = int(part.sum())
                ctx.writer.tables["clients"].extend(client_rows(
                    r, ids[part], take_profiles(p.profiles, part), p.n_samples[part], np.full(k, t0),
                    plan.finish[part], reason[part], np.full(k, base), np.zeros(k, np.int64),
                    np.where(counted[part], 1.0, np.nan), {name: values[part] for name, values in trained.items()}))
        row = round_row(r, version, clock.now, t0, ids.size, reason, np.zeros(int(counted.sum())),
                        ctx.update_bytes * int(plan.kept.sum()), ctx.model_bytes * int(p.online.sum()), losses,
                        losses_before, update_norm)
        ctx.record_round(row, theta)
        ctx.completed(r + 1, {"version": version, "clock": clock.now})
