"""Run the benchmark studies and leave figures and numbers under ``benchmarks/results/``.

    python -m benchmarks.run                              # small preset, all four studies (~5-7 min on 2 cores)
    python -m benchmarks.run --preset full                # more clients and rounds (~50-65 min, estimated, not run)
    python -m benchmarks.run --only algorithms,scale      # a subset
    python -m benchmarks.run --out /tmp/results           # elsewhere

The studies (details in each module's docstring):

1. ``algorithms`` (``benchmarks.studies``): FedAvg, Reptile, FOMAML and MAML on the sinusoid task and on
   Synthetic(1,1), 3 seeds: held-out loss after adaptation against round and simulated time, and the final
   loss (and accuracy) before and after adaptation.
2. ``heterogeneity`` (``benchmarks.studies``): Dirichlet(alpha) label skew, alpha in {0.1, 0.5, 10}, on the
   Gaussian-mixture pool, Reptile and FedAvg, 3 seeds: personalization gain (accuracy after - before adaptation).
3. ``stragglers`` (``benchmarks.stragglers``, run through its own ``main`` with this preset and
   ``--out <out>/stragglers``): sync, deadline, overselect and FedBuff under heavy-tailed device speeds.
4. ``scale`` (``benchmarks.scale``): steady client updates per second on the anchor workload against clients
   per round and against Ray actors (1, 2), with the inline backend as reference; one shared local Ray.

Each study writes ``<out>/<study>/``: PNG figures, a CSV (and ``.md``, ``.json``) of its table and the run
directories under ``runs/``, and prints its markdown table. ``<out>/summary.md`` collects every table, the
shape checks and the wall time of each study; ``<out>/summary.json`` has the timings. Studies 1-3 use the
inline backend with one torch thread per run (two runs at a time in separate processes), so everything but
wall time is deterministic per seed: a second invocation reproduces the same losses, accuracies and
simulated times bit for bit. Study 4 measures wall-clock throughput, which varies between invocations.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from benchmarks.common import Timer, default_jobs

STUDIES = ("algorithms", "heterogeneity", "stragglers", "scale")


@contextlib.contextmanager
def _argv(argv: list[str]) -> Iterator[None]:
    """Temporarily replace ``sys.argv`` (``benchmarks.stragglers.main`` parses it)."""
    saved = sys.argv
    sys.argv = argv
    try:
        yield
    finally:
        sys.argv = saved


def stragglers_study(preset: str, out: Path, jobs: int) -> dict[str, Any]:
    """Study 3: ``benchmarks.stragglers.main`` at this preset; its table is read back from its CSV."""
    from benchmarks import stragglers

    print("stragglers: benchmarks.stragglers at the same preset (it prints its own plan and table)", flush=True)
    with _argv(["benchmarks.stragglers", "--preset", preset, "--out", str(out), "--jobs", str(jobs)]):
        stragglers.main()
    table = pd.read_csv(out / "stragglers.csv")
    shapes = []
    for algorithm, group in table.groupby("algorithm", sort=False):
        g = group.set_index("policy")
        parts = []
        for policy in ("deadline", "overselect", "fedbuff"):
            v = g.at[policy, "speedup_vs_sync"] if policy in g.index else math.nan
            bound = "> " if bool(g.at[policy, "speedup_is_lower_bound"]) else ""
            parts.append(f"{policy} {bound}{v:.1f}x" if not math.isnan(v) else f"{policy} did not reach the target")
        shapes.append(f"{algorithm}: simulated time to target vs sync: " + ", ".join(parts))
    return {"table": table, "markdown": stragglers.markdown(table), "shapes": shapes}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=("small", "full"), default="small")
    parser.add_argument("--only", default=",".join(STUDIES),
                        help=f"comma-separated studies to run, of {', '.join(STUDIES)} (default: all)")
    parser.add_argument("--out", default="benchmarks/results", help="results root; each study writes <out>/<study>/")
    parser.add_argument("--jobs", type=int, default=0,
                        help="runs at once in separate processes for studies 1-3 (0 = min(2, CPUs))")
    args = parser.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in only if s not in STUDIES]
    if unknown or not only:
        parser.error(f"--only: unknown or no studies {unknown}; choose from {', '.join(STUDIES)}")
    jobs = args.jobs or default_jobs()
    root = Path(args.out)
    total = Timer()
    results: dict[str, dict[str, Any]] = {}
    timings: dict[str, float] = {}
    for study in (s for s in STUDIES if s in only):
        out = root / study
        out.mkdir(parents=True, exist_ok=True)
        started = Timer()
        print(f"\n=== {study} ({args.preset} preset) ===", flush=True)
        if study == "algorithms":
            from benchmarks.studies import algorithms_study

            results[study] = algorithms_study(args.preset, out, jobs)
        elif study == "heterogeneity":
            from benchmarks.studies import heterogeneity_study

            results[study] = heterogeneity_study(args.preset, out, jobs)
        elif study == "stragglers":
            results[study] = stragglers_study(args.preset, out, jobs)
        else:
            from benchmarks.scale import scale_study

            results[study] = scale_study(args.preset, out)
        timings[study] = started()
        print(f"\n{results[study]['markdown']}\n")
        for line in results[study]["shapes"]:
            print(f"  shape: {line}")
        print(f"{study}: {timings[study]:.0f} s wall; wrote {out}/", flush=True)
    timings["total"] = total()
    lines = [f"# Benchmark results ({args.preset} preset)", "",
             "Written by `python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:]) + "`.",
             ""]
    for study, result in results.items():
        lines += [f"## {study} ({timings[study]:.0f} s wall)", "", result["markdown"], ""]
        lines += [f"- {line}" for line in result["shapes"]] + [""]
    lines.append(f"Total wall time: {timings['total']:.0f} s ({timings['total'] / 60:.1f} min), {jobs} job(s).")
    (root / "summary.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "summary.json").write_text(json.dumps({"preset": args.preset, "jobs": jobs, "studies": list(results),
                                                   "wall_s": timings}, indent=2) + "\n", encoding="utf-8")
    print(f"\nall done: {', '.join(f'{s} {t:.0f} s' for s, t in timings.items())}; wrote {root}/summary.md")


if __name__ == "__main__":
    main()
