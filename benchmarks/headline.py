"""The project's headline figures, regenerated as two sweeps (``actors.sweep``) on whatever Ray it is given.

**heterogeneity.** FedAvg, Reptile and FOMAML on the Gaussian-mixture pool split over clients by
Dirichlet(alpha) label skew, alpha in {0.1, 0.5, 10}, 3 seeds (27 trials): held-out accuracy and loss after
adaptation against round, each setting drawn as its mean over the seeds with a 95% Student-t band.

**stragglers.** Reptile and FOMAML under heavy-tailed device speeds with the four round policies of
``benchmarks.stragglers`` (sync, deadline, overselect, FedBuff), 3 seeds (24 trials): the policies are one
``zip`` axis, each with the rounds (server updates) that reach the simulated horizon of 20 synchronous
rounds, as ``benchmarks.stragglers.plan_runs`` plans them on seed 0's device profiles.

    python -m benchmarks.headline                       # a local Ray; 51 trials of the small preset
    python -m benchmarks.headline --address HOST:PORT   # a cluster: trials spread over its nodes
    python -m benchmarks.headline --quick               # 1 seed and fewer rounds: a smoke test (~1 min)

Writes ``<out>/<study>/`` (a sweep directory: ``metafleet compare`` / ``report`` / ``--resume`` accept it),
``<out>/<study>.txt`` (the compare table), ``<out>/<study>.html`` (the report) and the figures
``<out>/<study>_*.png``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from actors import sweep
from analysis.load import load_runs
from analysis.plots import curves, save_figures
from analysis.report import write_report
from analysis.terminal import compare_lines
from benchmarks import stragglers
from simulator.config.schema import ExperimentConfig
from simulator.config.toml import flatten_dict, parse_overrides, set_dotted, to_dict
from simulator.study import Study, expand

SEEDS = (0, 1, 2)
GAUSSIAN = {"data": {"name": "gaussian", "partition": "dirichlet", "num_clients": 200, "eval_clients": 50},
            "clients": {"per_round": 20}, "eval": {"clients": 50, "adapt_steps": 10, "adapt_lr": 0.1},
            "algorithm": {"local_steps": 5, "batch_size": 10, "local_lr": 0.1, "server_lr": 1.0},
            "system": {"backend": "inline"}, "metrics": {"flush_every": 1000}}


def heterogeneity(seeds: tuple[int, ...], rounds: int) -> Study:
    base = {**GAUSSIAN, "rounds": rounds, "eval": {**GAUSSIAN["eval"], "every": max(1, rounds // 20)}}
    return expand(base, {"grid": {"algorithm.name": ["fedavg", "reptile", "fomaml"],
                                  "data.dirichlet_alpha": [0.1, 0.5, 10.0]}, "seeds": list(seeds)})


def straggler_modes(seeds: tuple[int, ...], sync_rounds: int) -> Study:
    """The four policies as one zip axis: every key on which their overrides differ, in policy order."""
    preset = {**stragglers.PRESETS["small"], "sync_rounds": sync_rounds}
    specs = stragglers.plan_runs(preset, "reptile", 0, "inline", 1.0)
    policies = [parse_overrides(list(s.overrides)) for s in specs]
    common = {k: v for k, v in policies[0].items() if all(p.get(k) == v for p in policies)}
    base = set_dotted({}, {k: v for k, v in common.items() if k not in ("name", "seed", "algorithm.name")})
    defaults = flatten_dict(to_dict(ExperimentConfig())) | flatten_dict(base)  # where a policy leaves a key
    varied = sorted({k for p in policies for k in p} - set(common))
    zipped = {k: [p.get(k, defaults[k]) for p in policies] for k in varied}
    same = {k: v[0] for k, v in zipped.items() if all(x == v[0] for x in v)}  # e.g. FedBuff's keys: base, not axis
    base = set_dotted(base, same)
    zipped = {k: v for k, v in zipped.items() if k not in same}
    return expand(base, {"grid": {"algorithm.name": list(stragglers.ALGORITHM_NAMES)}, "zip": zipped,
                         "seeds": list(seeds)})


def figures(sweep_dir: Path, out: Path, stem: str) -> list[Path]:
    runset = load_runs([sweep_dir])
    figs = {f"{stem}_loss": curves(runset.rounds, "eval_loss_post", "round", band="t"),
            f"{stem}_loss_by_sim_time": curves(runset.rounds, "eval_loss_post", "sim_time_s", band="t")}
    if runset.rounds["eval_metric_post"].notna().any():
        figs[f"{stem}_accuracy"] = curves(runset.rounds, "eval_metric_post", "round", band="t")
    paths = save_figures(figs, out, "png")
    (out / f"{stem}.txt").write_text("\n".join(compare_lines(runset, "t", width=100)) + "\n")
    write_report(runset, figs, out / f"{stem}.html", title=f"metafleet headline: {stem}")
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/headline")
    parser.add_argument("--address", default=None, help="Ray address (default: a local Ray)")
    parser.add_argument("--quick", action="store_true", help="1 seed, fewer rounds: a smoke test")
    parser.add_argument("--only", choices=("heterogeneity", "stragglers"), help="run one of the two studies")
    args = parser.parse_args()
    out = Path(args.out)
    seeds = (0,) if args.quick else SEEDS
    studies = {"heterogeneity": heterogeneity(seeds, 10 if args.quick else 60),
               "stragglers": straggler_modes(seeds, 4 if args.quick else 20)}
    for stem, study in studies.items():
        if args.only and stem != args.only:
            continue
        sweep_dir = out / stem
        start = time.perf_counter()
        resume = sweep_dir if (sweep_dir / "index.json").is_file() else None
        result = sweep.run_sweep(study, None if resume else sweep_dir, address=args.address, resume=resume)
        took = time.perf_counter() - start
        paths = figures(sweep_dir, out, stem)
        print(f"{stem}: {len(result.trials)} trials ({dict(result.counts)}) in {took:.0f} s; "
              f"{', '.join(str(p) for p in paths)}; {out / (stem + '.txt')}")
        print((out / f"{stem}.txt").read_text())


if __name__ == "__main__":
    main()
