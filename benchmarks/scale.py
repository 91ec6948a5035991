"""Study 4 of ``benchmarks.run``: steady client updates per second against clients per round and actors.

The anchor workload of ``benchmarks.throughput`` (FedAvg on Synthetic(1,1), 50 samples per client, MLP
60-64-10, 5 local SGD steps of batch 10, 1,000 registered clients, no evaluation) is run for a few rounds at
each number of clients per round, with three executions: the in-process ``inline`` backend (reference, no
Ray), Ray with 1 actor and Ray with 2 actors (one CPU each). The figure is ``summary["steady_updates_per_s"]``
of ``simulator.rounds.run.run``: median clients per round / median round wall time from the second round on.

One local Ray (``ray.init(num_cpus=2)``, no dashboard) serves the whole study, so Ray's start-up is paid
once. Within one repeat, each execution's backend (its actors, and the client shards they have cached) is
built once and reused for every cohort size, smallest first: a fresh pool per run would cost seconds of
actor start-up each, and the steady figure excludes only the first round of a run. So later runs find more
shards cached; building a shard costs about 0.16 ms, about as much as a vectorized client update (0.14 ms at 100
clients a chunk: ``benchmarks/README.md``), so with the anchor's 1,000 registered clients later runs are faster
(``--population 10000`` keeps almost every client new). Repeats (3 in both presets) are the outer loop, so slow
drifts of a shared machine's load spread over all executions; the table reports the median and the range.
Metrics other than wall time are identical across the three executions (the simulator's determinism
guarantee); throughput is the only thing measured here, and it varies between invocations.
"""

from __future__ import annotations

import os
import platform
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.styling import LINESTYLES, MARKERS, PALETTE
from benchmarks.common import Timer, markdown, write_outputs
from benchmarks.throughput import ANCHOR
from simulator.contract import WorkerSpec
from simulator.experiment import load_config

SYSTEMS: dict[str, tuple[str, int]] = {"inline": ("inline", 1), "ray-1": ("ray", 1), "ray-2": ("ray", 2)}
SYSTEM_NAMES = {"inline": "inline (1 process, no Ray)", "ray-1": "Ray, 1 actor", "ray-2": "Ray, 2 actors"}

SCALE_PRESETS: dict[str, dict[str, Any]] = {
    # 36 runs of 6 rounds (7,920 client updates per execution): about 1-1.5 min on 2 cores
    "small": {"per_round": (10, 30, 100, 300), "rounds": 6, "repeats": 3, "systems": tuple(SYSTEMS)},
    # 45 runs of 20 rounds (86,400 client updates per execution): roughly 8-12 min on 2 cores (estimated, not run)
    "full": {"per_round": (10, 30, 100, 300, 1000), "rounds": 20, "repeats": 3, "systems": tuple(SYSTEMS)},
}


def overrides(system: str, per_round: int, rounds: int, seed: int = 0, population: int = 1000,
              mode: str = "sync") -> tuple[str, ...]:
    """The anchor workload with this execution, clients per round, length and registered population; ``mode``
    "fedbuff": asynchronous FedBuff with ``per_round`` clients in flight and a buffer of as many (a round each)."""
    backend, actors = SYSTEMS[system]
    fedbuff = ['system.mode="async"', f"system.max_concurrency={per_round}", f"async.buffer_size={per_round}"]
    return tuple(ANCHOR + [f"name=\"scale-{system}-k{per_round}\"", f"seed={seed}", f"rounds={rounds}",
                           f"clients.per_round={per_round}", f"system.backend=\"{backend}\"",
                           f"system.actors={actors}", "system.threads=1", f"data.num_clients={population}"]
                 + (fedbuff if mode == "fedbuff" else []))


def _block(system: str, rep: int, p: dict[str, Any], out: Path) -> list[dict[str, Any]]:
    """Every cohort size (smallest first) with one backend of this execution; a row per run."""
    from actors.backends import make_backend
    from simulator.rounds.run import run

    cfgs = [load_config(None, list(overrides(system, k, p["rounds"], population=p.get("population", 1000),
                                             mode=p.get("mode", "sync"))))
            for k in sorted(p["per_round"])]
    spec = WorkerSpec.from_config(cfgs[0])
    rows = []
    with make_backend(cfgs[-1]) as backend:
        for cfg in cfgs:
            if WorkerSpec.from_config(cfg) != spec:  # the pool's workers must match every run it serves
                raise RuntimeError(f"scale study: run {cfg.name} needs a different worker spec")
            run_dir = out / "runs" / f"{system}-k{cfg.clients.per_round}-r{rep}"
            if run_dir.exists():
                shutil.rmtree(run_dir)
            summary = run(cfg, backend, run_dir)  # writes the whole run directory, config.toml included
            rows.append({"system": system, "per_round": cfg.clients.per_round, "repeat": rep,
                         "actors": len(summary["workers"]),
                         "steady_updates_per_s": float(summary["steady_updates_per_s"]),
                         "updates_per_s": float(summary["updates_per_s"]), "wall_s": float(summary["wall_time_s"]),
                         "client_updates": int(summary["client_updates"]), "run": run_dir.name})
            print(f"  done {run_dir.name}: {rows[-1]['steady_updates_per_s']:,.0f} updates/s steady "
                  f"({rows[-1]['wall_s']:.1f} s wall)", flush=True)
    return rows


def scale_study(preset: str | dict[str, Any], out: Path) -> dict[str, Any]:
    """Run study 4 in this process (one shared local Ray); write figure, table and runs under ``out``.
    ``preset`` is a name of ``SCALE_PRESETS`` or such a dict (``main``'s command-line sweep)."""
    import ray

    p = SCALE_PRESETS[preset] if isinstance(preset, str) else preset
    runs = p["repeats"] * len(p["per_round"]) * len(p["systems"])
    print(f"scale: {runs} runs ({len(p['per_round'])} cohort sizes x {len(p['systems'])} executions x "
          f"{p['repeats']} repeat(s)), {p['rounds']} rounds each, anchor workload", flush=True)
    elapsed = Timer()
    owns_ray = not ray.is_initialized()
    if owns_ray:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(num_cpus=max(2, max(SYSTEMS[s][1] for s in p["systems"])), include_dashboard=False,
                 logging_level="ERROR", configure_logging=True)
    print(f"  Ray ready after {elapsed():.1f} s", flush=True)
    rows = []
    try:
        for rep in range(p["repeats"]):
            for system in p["systems"]:
                rows += _block(system, rep, p, out)
    finally:
        if owns_ray:
            ray.shutdown()
    per_run = pd.DataFrame(rows)
    per_run.to_csv(out / "scale_runs.csv", index=False)
    order = {system: i for i, system in enumerate(p["systems"])}
    per_run = per_run.sort_values(["per_round", "system"], key=lambda c: c.map(order) if c.name == "system" else c,
                                  kind="stable", ignore_index=True)
    grouped = per_run.groupby(["per_round", "system"], sort=False)
    table = grouped.agg(steady_median=("steady_updates_per_s", "median"), steady_min=("steady_updates_per_s", "min"),
                        steady_max=("steady_updates_per_s", "max"), repeats=("repeat", "nunique"),
                        actors=("actors", "first"), wall_s=("wall_s", "median")).reset_index()
    base = table.set_index(["per_round", "system"])["steady_median"]
    table["vs_inline"] = [row.steady_median / base.get((row.per_round, "inline"), np.nan) for row in table.itertuples()]
    table["vs_ray_1"] = [row.steady_median / base.get((row.per_round, "ray-1"), np.nan) for row in table.itertuples()]
    cells = []
    for r in table.itertuples():
        spread = f" ({r.steady_min:,.0f}-{r.steady_max:,.0f})" if r.repeats > 1 else ""
        cells.append([f"{r.per_round:,}", SYSTEM_NAMES[r.system], f"{r.steady_median:,.0f}{spread}",
                      f"{r.vs_inline:.2f}x",
                      "-" if r.system == "inline" or np.isnan(r.vs_ray_1) else f"{r.vs_ray_1:.2f}x",
                      f"{r.wall_s:.1f}"])
    agg = f"median of {p['repeats']} (min-max)" if p["repeats"] > 1 else "1 run"
    text = markdown(cells, ["clients per round", "execution", f"steady updates/s ({agg})", "vs inline",
                            "vs Ray 1 actor", "wall s/run"])
    settings = {"preset": preset if isinstance(preset, str) else "custom", **p, "workload": list(ANCHOR),
                "machine": platform.machine(),
                "processor": platform.processor(), "cpus": os.cpu_count(), "study_wall_s": elapsed()}
    write_outputs(out, "scale", table, text, settings)
    figure(table, p).savefig(out / "scale.png", dpi=150, metadata={"Software": None})
    shapes = []
    for system in p["systems"]:
        v = table[table.system == system].sort_values("per_round")["steady_median"].to_numpy()
        shapes.append(f"{SYSTEM_NAMES[system]}: updates/s by clients per round {', '.join(f'{x:,.0f}' for x in v)}"
                      + (" (rises monotonically)" if np.all(np.diff(v) > 0) else " (NOT monotone)"))
    if {"ray-1", "ray-2"} <= set(p["systems"]):
        ratio = table[table.system == "ray-2"].set_index("per_round")["vs_ray_1"]
        shapes.append("Ray 2 actors / 1 actor by clients per round: "
                      + ", ".join(f"{k}: {v:.2f}x" for k, v in ratio.items()))
    return {"table": table, "markdown": text, "shapes": shapes}


def figure(table: pd.DataFrame, p: dict[str, Any]) -> Any:
    """Two panels: updates/s against clients per round (one line per execution, log x), and against the
    execution (inline, Ray with 1 and 2 actors; one line per cohort size)."""
    from matplotlib.figure import Figure


    fig = Figure(figsize=(12, 5.0), layout="constrained")
    left, right = fig.subplots(1, 2, sharey=True)
    for i, system in enumerate(p["systems"]):
        s = table[table.system == system].sort_values("per_round")
        err = None
        if (s["repeats"] > 1).any():
            err = np.vstack([s["steady_median"] - s["steady_min"], s["steady_max"] - s["steady_median"]])
        left.errorbar(s["per_round"], s["steady_median"], yerr=err, color=PALETTE[i], ls=LINESTYLES[i],
                      marker=MARKERS[i], capsize=3, label=SYSTEM_NAMES[system])
    left.set_xscale("log")
    left.set_xticks(list(p["per_round"]), [f"{k:,}" for k in p["per_round"]])
    left.set_xlabel("clients per round (log scale)")
    left.set_ylabel("steady client updates per wall-clock second")
    left.set_title("against clients per round", fontsize="medium")
    where = {system: i for i, system in enumerate(p["systems"])}
    for i, k in enumerate(p["per_round"]):
        s = table[table.per_round == k].assign(x=lambda f: f["system"].map(where)).sort_values("x")
        err = None
        if (s["repeats"] > 1).any():
            err = np.vstack([s["steady_median"] - s["steady_min"], s["steady_max"] - s["steady_median"]])
        colour = PALETTE[(3, 4, 5, 7, 0, 1, 2)[i % 7]]
        right.errorbar(s["x"], s["steady_median"], yerr=err, color=colour, ls=LINESTYLES[i % len(LINESTYLES)],
                       marker=MARKERS[i % len(MARKERS)], capsize=3, label=f"{k:,} clients per round")
    right.set_xticks(list(where.values()), [SYSTEM_NAMES[s].replace(", ", ",\n") for s in where])
    right.set_xlim(-0.4, len(where) - 0.6)
    right.set_xlabel("execution (Ray actors take 1 CPU each)")
    right.set_title("against actors", fontsize="medium")
    for ax in (left, right):
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small", loc="lower right")
    reps = f"median of {p['repeats']} runs, bars min-max" if p["repeats"] > 1 else "1 run per point"
    fig.suptitle(f"Scale: anchor workload (FedAvg on Synthetic(1,1), MLP 60-64-10, 5 local steps of batch 10, "
                 f"{p.get('population', 1000):,} registered clients), "
                 f"{p['rounds']} rounds per run;\nsteady = median clients per round / median round time from the "
                 f"second round on; {reps}; {os.cpu_count()}-CPU machine", fontsize="medium")
    return fig


def main() -> None:
    """``python -m benchmarks.scale --per-round 10 100 1000 10000 --population 10000``: one sweep of clients
    per round (the ``benchmarks.run`` presets stop at 300 / 1,000)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--per-round", type=int, nargs="+", default=[10, 100, 1000, 10000])
    parser.add_argument("--population", type=int, default=10000, help="registered clients (>= the largest cohort)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--systems", nargs="+", choices=tuple(SYSTEMS), default=["inline", "ray-2"])
    parser.add_argument("--mode", choices=("sync", "fedbuff"), default="sync",
                        help="fedbuff: asynchronous FedBuff, as many clients in flight and buffered as --per-round")
    parser.add_argument("--out", default="benchmarks/results/scale-sweep")
    args = parser.parse_args()
    if args.population < max(args.per_round):
        parser.error(f"--population {args.population} is smaller than the largest cohort {max(args.per_round)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = scale_study({"per_round": tuple(sorted(args.per_round)), "rounds": args.rounds, "repeats": args.repeats,
                          "systems": tuple(args.systems), "population": args.population, "mode": args.mode}, out)
    print(result["markdown"])
    print("\n".join(result["shapes"]))


if __name__ == "__main__":
    main()
