"""Stragglers: post-adaptation accuracy against simulated time for four round policies.

Under heavy-tailed device speeds, how fast (in *simulated* seconds) does each round policy reach a
given held-out accuracy? For Reptile and FOMAML, each of

- ``sync``: wait for every sampled client (the straggler baseline);
- ``deadline``: drop updates that arrive after ``system.deadline_s``;
- ``overselect``: sample 1.3 x per_round clients, keep the first per_round to finish;
- ``fedbuff``: asynchronous FedBuff (Nguyen et al. 2022), buffer K, s(tau) = 1/sqrt(1 + tau)

is run on the Gaussian-mixture dataset split over clients by Dirichlet(0.5) label skew, with
Pareto (shape 1.0, median 100 samples/s) compute speeds and log-normal bandwidths, the same seed,
the same model initialisation and the same held-out evaluation clients. Reported per (algorithm,
policy): simulated time and client updates to reach a target accuracy, final accuracy, total
simulated time, client updates, drops by reason, wall time; and a two-panel figure.

    python -m benchmarks.stragglers                    # small preset, inline backend, 2 runs at a time (~2-3 min)
    python -m benchmarks.stragglers --preset full      # 1,000 clients, 50 per round (~20-25 min on 2 cores, estimated)
    python -m benchmarks.stragglers --backend ray      # same numbers; only wall time differs
    python -m benchmarks.stragglers --speed-shape 2    # a lighter tail (sensitivity); --dry-run prints the plan only

Writes ``stragglers.png``, ``stragglers.csv`` (the table), ``stragglers_curves.csv`` (every
evaluation point) and ``stragglers.json`` (settings and rows) to ``--out``
(default ``benchmarks/results/stragglers``), and the run directories to ``--out/runs``.

**Backend.** The default is the in-process ``inline`` backend: the study is about simulated time,
which every backend computes identically (the metrics are bit-identical), so Ray would only change
wall time. With ``inline``, ``--jobs`` (default: 2, or 1 on a 1-CPU machine) runs that many runs at
once in separate single-threaded processes; with ``ray`` the runs go one after another.

**Fairness: a common simulated-time horizon.** Per algorithm, the horizon H is the simulated time
``sync`` needs for the preset's ``sync_rounds`` rounds. Every other policy is given exactly as many
rounds (server updates, for FedBuff) as it needs to reach H: the schedule of a run (who is sampled,
when each client finishes, which updates a policy keeps) follows from the device profiles alone,
so it is computed before training with the simulator's own sampling, device and round-policy
functions, and checked against the runs afterwards. So every policy gets the same simulated
wall-clock budget, and the faster policies do more client updates in it; that is the effect being
measured. Evaluations are spaced to give each policy about ``evals`` points over H (``eval.every``
= its rounds / evals), so the curves have comparable density in simulated time.

**Settings (chosen before the comparison, stated here).** ``deadline_s`` is the 0.7 quantile of the
per-client simulated round-trip durations over the training population (computed from the same
device profiles and planned samples the driver uses), so the median client meets it and about 30%
of clients (always the same slow devices) never do. FedBuff: ``max_concurrency = per_round``
clients training at once and ``K = per_round / 2``. Local and adaptation learning rates (0.1) were
picked on short ``sync`` pilots only (0.02 and 0.05 had not converged after 40 sync rounds); the
other hyperparameters are the simulator's defaults. The target accuracy, per algorithm, is
``target_fraction`` (0.9) x the best final accuracy (the last evaluation, at the horizon) over the
four policies; "time to target" is the simulated time of the first evaluation at or above it (no
interpolation, so it is resolved to one evaluation spacing, H / evals). When ``sync`` does not reach
the target within H, the ratio to sync is printed as a lower bound (H / time). Small preset: 200
clients (20 per round), 50 held-out clients, MLP 20-40-40-10, 5 local steps of batch 10.

**Published shape.** FedScale (Lai et al. 2022) reports that asynchronous FedBuff reaches a target
accuracy in less simulated time than synchronous rounds (18,913 s against 27,618 s on FEMNIST,
1.46x); the script prints the same ratio (``speedup_vs_sync``) for each policy.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from simulator.algorithms.registry import ALGORITHMS
from simulator.config.schema import ExperimentConfig
from simulator.experiment import load_config
from simulator.rounds.context import plan_clients, prepare
from simulator.scheduling import DROP_REASONS, Event, EventQueue, cohort_size, plan_round, sample_clients, sample_cohort

ALGORITHM_NAMES = ("reptile", "fomaml")
POLICIES = ("sync", "deadline", "overselect", "fedbuff")
#: Okabe-Ito colours (colour-blind safe), with distinct line styles and markers as well
STYLE = {"sync": ("#000000", "-", "o"), "deadline": ("#E69F00", "--", "s"),
         "overselect": ("#0072B2", "-.", "^"), "fedbuff": ("#D55E00", ":", "D")}

PRESETS: dict[str, dict[str, Any]] = {
    # 31,310 client updates over the 8 runs (seed 0): 2-3.5 minutes on a 2-core machine with --jobs 2
    "small": {"num_clients": 200, "eval_clients": 50, "per_round": 20, "sync_rounds": 20, "evals": 60},
    # 230,067 client updates (7.3x "small"): roughly 20-25 minutes on 2 cores (estimated from that ratio, not run)
    "full": {"num_clients": 1000, "eval_clients": 100, "per_round": 50, "sync_rounds": 30, "evals": 100},
}
DEADLINE_QUANTILE = 0.7
TARGET_FRACTION = 0.9


def base_overrides(preset: dict[str, Any], algorithm: str, seed: int, shape: float = 1.0) -> list[str]:
    """The shared workload: everything but the round policy."""
    return [
        f"name=\"stragglers-{algorithm}\"", f"seed={seed}",
        "data.name=\"gaussian\"", "data.partition=\"dirichlet\"", "data.dirichlet_alpha=0.5",
        f"data.num_clients={preset['num_clients']}", f"data.eval_clients={preset['eval_clients']}",
        f"eval.clients={preset['eval_clients']}", "eval.adapt_steps=10", "eval.adapt_lr=0.1",
        f"algorithm.name=\"{algorithm}\"", "algorithm.local_steps=5", "algorithm.batch_size=10",
        "algorithm.local_lr=0.1", "algorithm.server_lr=1.0", f"clients.per_round={preset['per_round']}",
        f"devices.speed={{dist=\"pareto\", median=100.0, shape={float(shape)!r}}}",
        "devices.bandwidth={dist=\"lognormal\", median=20.0, sigma=1.0}",
        "metrics.flush_every=1000",
    ]


def policy_overrides(policy: str, preset: dict[str, Any], deadline_s: float) -> list[str]:
    if policy == "fedbuff":
        return ["system.mode=\"async\"", "async.rule=\"fedbuff\"", "async.staleness=\"sqrt\"",
                f"async.buffer_size={max(1, preset['per_round'] // 2)}",
                f"system.max_concurrency={preset['per_round']}"]
    if policy == "deadline":
        return ["system.mode=\"deadline\"", f"system.deadline_s={deadline_s!r}"]
    if policy == "overselect":
        return ["system.mode=\"overselect\"", "system.overselect=1.3"]
    return ["system.mode=\"sync\""]


# ---------------------------------------------------------------------------------------- schedule
def per_client_durations(cfg: ExperimentConfig) -> np.ndarray:
    """Simulated seconds of one update of every training client, as the driver computes them at
    dispatch (``RunContext.plan``): a pure function of the client id under this config."""
    prepared = prepare(cfg)
    nbytes = prepared.theta0.numel() * prepared.theta0.element_size()
    ids = np.arange(cfg.data.num_clients, dtype=np.int64)
    return plan_clients(cfg, ALGORITHMS[cfg.algorithm.name], prepared.dataset, prepared.devices, ids, nbytes)[3]


def round_ends(cfg: ExperimentConfig, dur: np.ndarray, rounds: int | None = None,
               horizon: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """End times and kept-client counts of sync/deadline/overselect rounds, for ``rounds`` rounds or
    until the clock reaches ``horizon`` (every client online, no drop-outs: this study's devices)."""
    s, now = cfg.system, 0.0
    ends: list[float] = []
    kept: list[int] = []
    while (rounds is not None and len(ends) < rounds) or (horizon is not None and now < horizon):
        ids = sample_cohort(cfg.seed, len(ends), cfg.data.num_clients,
                            cohort_size(s.mode, cfg.clients.per_round, s.overselect))
        plan = plan_round(s.mode, now, ids, dur[ids], np.ones(ids.size, bool), np.full(ids.size, np.nan),
                          cfg.clients.per_round, s.deadline_s)
        now = plan.end
        ends.append(now)
        kept.append(int(plan.kept.sum()))
    return np.array(ends), np.array(kept)


def fedbuff_update_times(cfg: ExperimentConfig, dur: np.ndarray, horizon: float) -> np.ndarray:
    """Simulated times of FedBuff's server updates until one lands at or after ``horizon``: the event
    loop of ``simulator.rounds.asynchronous`` without the training (same refill groups and sampling)."""
    concurrency = cfg.system.max_concurrency or cfg.clients.per_round
    queue, group, seq, now, buffered = EventQueue(), 0, 0, 0.0, 0
    times: list[float] = []

    def refill() -> None:
        nonlocal group, seq
        free = concurrency - len(queue)
        if free <= 0:
            return
        ids = sample_clients(cfg.seed, group, cfg.data.num_clients, free, queue.client_ids())
        group += 1
        for cid in ids.tolist():
            queue.push(Event(now + float(dur[cid]), cid, seq))
            seq += 1

    refill()
    while not times or times[-1] < horizon:
        now = queue.pop().time
        buffered += 1
        if buffered >= cfg.async_.buffer_size:
            times.append(now)
            buffered = 0
        if queue.peek_time() != now:
            refill()
    return np.array(times)


@dataclass(frozen=True)
class RunSpec:
    algorithm: str
    policy: str
    overrides: tuple[str, ...]
    rounds: int
    eval_every: int
    planned_updates: int
    planned_end_s: float
    horizon_s: float
    deadline_s: float


def plan_runs(preset: dict[str, Any], algorithm: str, seed: int, backend: str, shape: float) -> list[RunSpec]:
    base = base_overrides(preset, algorithm, seed, shape) + [f"system.backend=\"{backend}\""]
    sync_cfg = load_config(None, base + policy_overrides("sync", preset, 0.0))
    dur = per_client_durations(sync_cfg)
    deadline_s = float(np.quantile(dur, DEADLINE_QUANTILE))
    sync_ends, _ = round_ends(sync_cfg, dur, rounds=preset["sync_rounds"])
    horizon = float(sync_ends[-1])
    specs = []
    for policy in POLICIES:
        overrides = base + policy_overrides(policy, preset, deadline_s)
        cfg = load_config(None, overrides)
        if policy == "fedbuff":
            ends = fedbuff_update_times(cfg, dur, horizon)
            updates = len(ends) * cfg.async_.buffer_size
        else:
            ends, kept = round_ends(cfg, dur, horizon=horizon)
            updates = int(kept.sum())
        rounds = len(ends)
        every = max(1, round(rounds / preset["evals"]))
        specs.append(RunSpec(algorithm, policy, tuple(overrides + [f"rounds={rounds}", f"eval.every={every}"]),
                             rounds, every, updates, float(ends[-1]), horizon, deadline_s))
    return specs


# ---------------------------------------------------------------------------------------- running
def run_one(overrides: tuple[str, ...], run_dir: str) -> tuple[dict[str, Any], pd.DataFrame]:
    """One run in its own directory (any earlier run of the same name is replaced); plain types in
    and out, as it may run in a spawned process."""
    from actors.backends import make_backend
    from simulator.rounds.run import run

    cfg = load_config(None, list(overrides))
    path = Path(run_dir)
    if path.exists():
        shutil.rmtree(path)
    with make_backend(cfg) as backend:  # run() writes the whole run directory, config.toml included
        summary = run(cfg, backend, path)
    rounds = pd.read_parquet(path / "rounds.parquet").sort_values("round", ignore_index=True)
    return summary, rounds


def summarize(results: list[tuple[RunSpec, dict[str, Any], pd.DataFrame]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The table (one row per algorithm and policy) and every evaluation point."""
    rows, curves = [], []
    for spec, summary, r in results:
        r = r.assign(client_updates=r["num_completed"].cumsum())
        ev = r.dropna(subset=["eval_metric_post"])
        curves.append(ev.assign(algorithm=spec.algorithm, policy=spec.policy)[
            ["algorithm", "policy", "round", "sim_time_s", "client_updates", "eval_metric_pre", "eval_metric_post",
             "eval_loss_pre", "eval_loss_post"]])
        done = r["num_completed"].to_numpy()
        rows.append({
            "algorithm": spec.algorithm, "policy": spec.policy,
            "final_acc": float(ev["eval_metric_post"].iloc[-1]),
            "sim_time_s": float(r["sim_time_s"].iloc[-1]), "horizon_s": spec.horizon_s,
            "server_updates": len(r), "client_updates": int(done.sum()),
            **{f"dropped_{k}": int(r[f"dropped_{k}"].sum()) for k in DROP_REASONS},
            "staleness_mean": float(np.nansum(r["staleness_mean"] * done) / max(done.sum(), 1)),
            "eval_every": spec.eval_every, "deadline_s": spec.deadline_s if spec.policy == "deadline" else math.nan,
            "status": summary["status"], "wall_s": float(summary["wall_time_s"]),
            "planned_end_s": spec.planned_end_s, "planned_updates": spec.planned_updates,
        })
    table, curve = pd.DataFrame(rows), pd.concat(curves, ignore_index=True)
    for col in ("target_acc", "time_to_target_s", "updates_to_target", "speedup_vs_sync"):
        table[col] = math.nan
    table["speedup_is_lower_bound"] = False
    for algorithm, group in table.groupby("algorithm", sort=False):
        target = TARGET_FRACTION * group["final_acc"].max()
        table.loc[group.index, "target_acc"] = target
        for i in group.index:
            c = curve[(curve.algorithm == algorithm) & (curve.policy == table.at[i, "policy"])]
            hit = c[c["eval_metric_post"] >= target]
            if len(hit):
                table.loc[i, "time_to_target_s"] = float(hit["sim_time_s"].iloc[0])
                table.loc[i, "updates_to_target"] = float(hit["client_updates"].iloc[0])
        # sync never reaching the target within the horizon makes the ratio a lower bound: horizon / time
        sync = table.loc[group.index][table.loc[group.index, "policy"] == "sync"]["time_to_target_s"]
        base = float(sync.iloc[0]) if len(sync) else math.nan
        bound = math.isnan(base)
        table.loc[group.index, "speedup_vs_sync"] = ((table.loc[group.index, "horizon_s"] if bound else base)
                                                     / table.loc[group.index, "time_to_target_s"])
        table.loc[group.index, "speedup_is_lower_bound"] = bound
    first = ["algorithm", "policy", "target_acc", "time_to_target_s", "updates_to_target", "speedup_vs_sync",
             "speedup_is_lower_bound", "final_acc", "sim_time_s"]
    return table[first + [c for c in table.columns if c not in first]], curve


def markdown(table: pd.DataFrame) -> str:
    cols = [("algorithm", "algorithm", "{}"), ("policy", "policy", "{}"), ("target_acc", "target acc", "{:.3f}"),
            ("time_to_target_s", "sim s to target", "{:,.1f}"), ("updates_to_target", "updates to target", "{:,.0f}"),
            ("speedup_vs_sync", "vs sync", "{:.2f}x"), ("final_acc", "final acc", "{:.3f}"),
            ("sim_time_s", "sim s total", "{:,.1f}"), ("client_updates", "client updates", "{:,}"),
            ("dropped_deadline", "dropped deadline", "{:,}"), ("dropped_overselect", "dropped overselect", "{:,}"),
            ("dropped_offline", "offline", "{:,}"), ("dropped_dropout", "dropout", "{:,}"),
            ("dropped_staleness", "stale", "{:,}"), ("staleness_mean", "mean staleness", "{:.2f}"),
            ("wall_s", "wall s", "{:.1f}")]
    lines = ["| " + " | ".join(h for _, h, _ in cols) + " |", "|" + "---|" * len(cols)]
    for _, row in table.iterrows():
        cells = []
        for key, _, fmt in cols:
            v = row[key]
            missing = isinstance(v, float) and math.isnan(v)
            if missing:
                cells.append("not reached" if key in ("time_to_target_s", "updates_to_target") else "-")
            elif key == "speedup_vs_sync" and row["speedup_is_lower_bound"]:
                cells.append("> " + fmt.format(v))
            else:
                cells.append(fmt.format(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(table: pd.DataFrame, curve: pd.DataFrame, settings: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(ALGORITHM_NAMES), figsize=(12, 4.6), sharey=True)
    for ax, algorithm in zip(np.atleast_1d(axes), ALGORITHM_NAMES, strict=True):
        rows = table[table.algorithm == algorithm]
        for policy in POLICIES:
            c = curve[(curve.algorithm == algorithm) & (curve.policy == policy)]
            if c.empty:
                continue
            color, ls, marker = STYLE[policy]
            t = rows[rows.policy == policy]["time_to_target_s"].iloc[0]
            label = f"{policy} (target at {t:,.0f} s)" if not math.isnan(t) else f"{policy} (target not reached)"
            ax.plot(c["sim_time_s"], c["eval_metric_post"], color=color, ls=ls, marker=marker, ms=3.5, lw=1.6,
                    label=label)
        if len(rows):
            target = float(rows["target_acc"].iloc[0])
            ax.axhline(target, color="#999999", lw=1, ls=(0, (1, 1)))
            ax.text(0.01, target - 0.004, f"target {target:.3f}", transform=ax.get_yaxis_transform(), ha="left",
                    va="top", fontsize=8, color="#555555")
            ax.axvline(float(rows["horizon_s"].iloc[0]), color="#BBBBBB", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("simulated time (s, log scale)")
        ax.set_title(f"{algorithm}")
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(fontsize=8, loc="upper left")
    np.atleast_1d(axes)[0].set_ylabel("held-out accuracy after adaptation")
    fig.suptitle(f"Stragglers: Gaussian mixture, Dirichlet(0.5), {settings['num_clients']} clients "
                 f"({settings['per_round']} per round), Pareto({settings['shape']:g}) device speeds; "
                 "grey vertical line = horizon",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--out", default="benchmarks/results/stragglers")
    parser.add_argument("--backend", choices=("inline", "ray"), default="inline")
    parser.add_argument("--jobs", type=int, default=0,
                        help="runs at once in separate processes (inline only; 0 = min(2, CPUs))")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--speed-shape", type=float, default=1.0,
                        help="Pareto tail index of device speeds (smaller = heavier tail; 1 = infinite-mean durations)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan (rounds, client updates) and stop")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = 1 if args.backend == "ray" else (args.jobs or min(2, os.cpu_count() or 1))
    start = time.perf_counter()

    specs = [s for a in ALGORITHM_NAMES for s in plan_runs(preset, a, args.seed, args.backend, args.speed_shape)]
    print(f"plan ({args.preset} preset, {args.backend} backend, {jobs} job(s)); horizon = simulated time of "
          f"{preset['sync_rounds']} sync rounds; deadline = {DEADLINE_QUANTILE} quantile of client durations")
    for s in specs:
        print(f"  {s.algorithm:8s} {s.policy:10s} horizon {s.horizon_s:8.1f} s  rounds {s.rounds:5d}  "
              f"eval.every {s.eval_every:3d}  planned client updates {s.planned_updates:6,d}"
              + (f"  deadline_s {s.deadline_s:.3f}" if s.policy == "deadline" else ""))
    print(f"  total planned client updates {sum(s.planned_updates for s in specs):,}")
    if args.dry_run:
        return

    def run_dir(s: RunSpec) -> str:
        return str(out / "runs" / f"{s.algorithm}-{s.policy}")

    results: dict[RunSpec, tuple[dict[str, Any], pd.DataFrame]] = {}

    def done(s: RunSpec, result: tuple[dict[str, Any], pd.DataFrame]) -> None:
        results[s] = result
        print(f"  done {s.algorithm} {s.policy} ({result[0]['wall_time_s']:.1f} s wall)", flush=True)

    order = sorted(specs, key=lambda s: -s.planned_updates)  # longest first balances the processes
    if jobs > 1:
        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(run_one, s.overrides, run_dir(s)): s for s in order}
            for f in as_completed(futures):
                done(futures[f], f.result())
    else:
        owns_ray = False
        if args.backend == "ray":
            from actors.pool import connect

            owns_ray = connect(load_config(None, list(specs[0].overrides)).system)
        try:
            for s in order:
                done(s, run_one(s.overrides, run_dir(s)))
        finally:
            if owns_ray:
                import ray

                ray.shutdown()
    table, curve = summarize([(s, *results[s]) for s in specs])
    for _, row in table.iterrows():
        if row["status"] != "completed":
            print(f"warning: {row['algorithm']} {row['policy']} ended with status {row['status']!r}")
        if row["sim_time_s"] < row["horizon_s"] * (1 - 1e-9) or not math.isclose(
                row["sim_time_s"], row["planned_end_s"], rel_tol=1e-6):
            print(f"warning: {row['algorithm']} {row['policy']} ended at {row['sim_time_s']:.2f} s simulated, "
                  f"planned {row['planned_end_s']:.2f} s (horizon {row['horizon_s']:.2f} s): the simulator's "
                  "schedule differs from this script's plan")
    total = time.perf_counter() - start
    settings = {"preset": args.preset, **preset, "backend": args.backend, "jobs": jobs, "seed": args.seed,
                "speed_shape": args.speed_shape,
                "deadline_quantile": DEADLINE_QUANTILE, "target_fraction": TARGET_FRACTION,
                "fedbuff_buffer_size": max(1, preset["per_round"] // 2), "fedbuff_concurrency": preset["per_round"],
                "overselect": 1.3, "total_wall_s": total, "runs": [asdict(s) for s in specs]}
    table.to_csv(out / "stragglers.csv", index=False)
    curve.to_csv(out / "stragglers_curves.csv", index=False)
    plot(table, curve, {**preset, "shape": args.speed_shape}, out / "stragglers.png")
    (out / "stragglers.json").write_text(json.dumps(
        {"settings": settings, "table": json.loads(table.to_json(orient="records"))}, indent=2) + "\n")
    print()
    print(markdown(table))
    print(f"\ntarget = {TARGET_FRACTION} x the best final accuracy of the four policies, per algorithm; "
          f"total {total:.0f} s wall; wrote {out}/stragglers.png, stragglers.csv, stragglers_curves.csv, "
          "stragglers.json")


if __name__ == "__main__":
    main()
