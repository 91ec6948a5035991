"""Personalization on FEMNIST-like LEAF data: FedAvg against the meta-learning family.

The evidence run of the "real datasets and meta-learning family" issue. Chen et al. 2018 (FedMeta)
and Jiang et al. 2019 report that meta-learned initializations personalize better than FedAvg after
a few adaptation steps. This script generates a FEMNIST-like LEAF directory with per-writer
handwriting and label skew (``benchmarks.femnist_like``: 300 writers, data seed 0; skipped when
``--data`` already holds train/ and test/), then runs every algorithm below on it with the same
budget (rounds, clients per round, local steps, batch size, held-out clients, adaptation steps and
rate) over ``--seeds`` seeds (the run seed also permutes which writers are held out), and reports
held-out accuracy before and after ``eval.adapt_steps`` SGD steps on each held-out writer's
support (train) samples, at the final round.

    python -m benchmarks.personalization            # 3 seeds, 100 rounds: ~5-8 min on 2 cores
    python -m benchmarks.personalization --quick    # 1 seed, 40 rounds: ~1-2 min, into OUT-quick/
    python -m benchmarks.personalization --only fedavg,reptile --seeds 1

Runs go through ``benchmarks.stragglers.run_one`` (``load_config(None, overrides)``,
``actors.backends.make_backend``, ``simulator.rounds.run.run``) on the in-process backend with vectorized cohorts
(the fastest on a 2-core machine, benchmarks/README.md), ``--jobs`` runs at once in single-threaded
processes. Model: MLP 784-128-10 (``femnist_cnn`` measured at 25-35 s a round here, ~200x the MLP).
Writes run directories to ``--out/runs``, ``personalization.{csv,md,json}`` to ``--out``, and
``personalization.png`` (gain) and ``personalization_curves.png`` (accuracy after adaptation by
round) to ``--figures`` (``--quick``: to ``--out/figures``, so a quick run leaves the default run's
figures alone). A run that fails is reported in the table and does not stop the others.
"""

from __future__ import annotations

import argparse
import os
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.load import load_runs
from analysis.plots import curves, personalization_gain, save_figures
from benchmarks.common import Timer, final_evals, markdown, mean_std, pm, write_outputs

#: (server step in words, overrides, relative cost) per algorithm; learning rates from short pilots
#: (seed 0, 60 rounds): SGD server steps as in the simulator's defaults, Adam for meta-gradients
ALGORITHMS: dict[str, tuple[str, tuple[str, ...], float]] = {
    "fedavg": ("SGD 1.0", ('algorithm.name="fedavg"',), 1.0),
    "fedavg_m": ("SGD 1.0, momentum 0.9", ('algorithm.name="fedavg"', "algorithm.server_momentum=0.9"), 1.0),
    "reptile": ("SGD 1.0", ('algorithm.name="reptile"',), 1.0),
    "fomaml": ("Adam 0.003", ('algorithm.name="fomaml"', 'algorithm.server_optimizer="adam"',
                              "algorithm.server_lr=0.003"), 2.0),
    "perfedavg_fo": ("SGD 1.0 (beta 0.05)", ('algorithm.name="perfedavg_fo"', "algorithm.outer_lr=0.05"), 0.8),
    "perfedavg_hf": ("SGD 1.0 (beta 0.05)", ('algorithm.name="perfedavg_hf"', "algorithm.outer_lr=0.05"), 1.2),
    "metasgd": ("Adam 0.003", ('algorithm.name="metasgd"', 'algorithm.server_optimizer="adam"',
                               "algorithm.server_lr=0.003"), 2.2),
    "pfedavg": ("SGD 1.0 m 0.9, then Reptile Adam 0.001", ('algorithm.name="pfedavg"', "algorithm.server_momentum=0.9",
                                                           "algorithm.finetune_server_lr=0.001"), 1.2),
}
PRESETS = {"default": {"rounds": 100, "every": 10, "seeds": 3}, "quick": {"rounds": 40, "every": 10, "seeds": 1}}
WORKLOAD = {"writers": 300, "num_clients": 250, "eval_clients": 50, "per_round": 10, "local_steps": 5,
            "batch_size": 10, "local_lr": 0.05, "adapt_steps": 5, "adapt_lr": 0.05, "hidden": 128}


def overrides(algorithm: str, seed: int, rounds: int, every: int, data: Path) -> tuple[str, ...]:
    w = WORKLOAD
    return (f'name="personalization-{algorithm}"', f"seed={seed}", f"rounds={rounds}",
            'data.name="leaf"', f'data.path="{data.resolve()}"', f"data.num_clients={w['num_clients']}",
            f"data.eval_clients={w['eval_clients']}", 'model.name="mlp"', f"model.hidden=[{w['hidden']}]",
            f"algorithm.local_steps={w['local_steps']}", f"algorithm.batch_size={w['batch_size']}",
            f"algorithm.local_lr={w['local_lr']}", f"clients.per_round={w['per_round']}",
            'system.backend="inline"', "system.vectorize=true", "system.threads=1",
            f"eval.every={every}", f"eval.clients={w['eval_clients']}", f"eval.adapt_steps={w['adapt_steps']}",
            f"eval.adapt_lr={w['adapt_lr']}", "metrics.flush_every=1000", *ALGORITHMS[algorithm][1])


def ensure_data(path: Path, writers: int) -> None:
    """Generate the dataset unless ``path`` holds it, then build the loader's cache once (not in every job)."""
    if not ((path / "train").is_dir() and (path / "test").is_dir()):
        from benchmarks.femnist_like import build

        counts = build(path, writers, seed=0)
        print(f"generated {writers} writers ({counts['train']} train, {counts['test']} test samples) in {path}/")
    from simulator.experiment import load_config
    from simulator.rounds.context import prepare

    prepare(load_config(None, list(overrides("fedavg", 0, 1, 1, path))))


def run_safe(over: tuple[str, ...], run_dir: str) -> tuple[dict[str, Any] | None, str]:
    """``run_one`` that returns a failure (exception type and message, traceback printed) instead of raising."""
    from benchmarks.stragglers import run_one

    try:
        return run_one(over, run_dir)[0], ""
    except Exception as exc:  # noqa: BLE001 - one algorithm failing must not stop the study
        traceback.print_exc()
        return None, f"{type(exc).__name__}: {exc}"


def table(dirs: list[str], names: list[str], errors: dict[str, str]) -> tuple[pd.DataFrame, str, pd.DataFrame]:
    """Final-evaluation mean ± std per algorithm over this invocation's finished runs, and their rounds
    labelled by algorithm."""

    runs = load_runs(sorted(d for d in dirs if (Path(d) / "summary.json").is_file()))
    algo = {r.path.name: r.path.name.rsplit("-s", 1)[0] for r in runs.runs}
    rounds = runs.rounds.assign(label=runs.rounds["run"].map(algo))
    finals = final_evals(rounds).assign(algorithm=lambda f: f["run"].map(algo))
    finals["gain"] = finals["eval_metric_post"] - finals["eval_metric_pre"]
    finals["wall_s"] = finals["run"].map(runs.summary.set_index("run")["wall_time_s"])
    stats = mean_std(finals, ["algorithm"], ["eval_metric_pre", "eval_metric_post", "gain", "eval_loss_post",
                                             "wall_s"]).set_index("algorithm")
    rows = []
    for name in names:
        if name not in stats.index:
            rows.append([name, ALGORITHMS[name][0], "failed: " + errors.get(name, "no run"), "-", "-", "-", "-", "0"])
            continue
        s = stats.loc[name]
        rows.append([name, ALGORITHMS[name][0], pm(s.eval_metric_pre_mean, s.eval_metric_pre_std),
                     pm(s.eval_metric_post_mean, s.eval_metric_post_std), pm(s.gain_mean, s.gain_std, "{:+.3f}"),
                     pm(s.eval_loss_post_mean, s.eval_loss_post_std), f"{s.wall_s_mean:.1f}", str(int(s.seeds))])
    header = ["algorithm", "server step", "accuracy before adaptation", "accuracy after", "gain",
              "loss after", "wall s per run", "seeds"]
    return stats.reset_index(), markdown(rows, header), rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/femnist_like", help="LEAF directory (generated if missing)")
    parser.add_argument("--out", default="", help="default benchmarks/results/personalization[-quick]")
    parser.add_argument("--figures", default="", help="default benchmarks/figures (--quick: OUT/figures)")
    parser.add_argument("--seeds", type=int, default=0, help="seeds 0..N-1 (default 3, or 1 with --quick)")
    parser.add_argument("--rounds", type=int, default=0, help="default 100, or 40 with --quick")
    parser.add_argument("--quick", action="store_true", help="1 seed, 40 rounds (~1-2 min)")
    parser.add_argument("--only", default="", help="comma-separated algorithms (default: all)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="runs at once")
    args = parser.parse_args()
    preset = PRESETS["quick" if args.quick else "default"]
    rounds, seeds = args.rounds or preset["rounds"], args.seeds or preset["seeds"]
    names = [n for n in ALGORITHMS if not args.only or n in args.only.split(",")]
    out = Path(args.out or "benchmarks/results/personalization" + ("-quick" if args.quick else ""))
    figures = args.figures or str(out / "figures" if args.quick else "benchmarks/figures")
    data, timer = Path(args.data), Timer()
    ensure_data(data, WORKLOAD["writers"])
    specs = sorted(((n, s) for n in names for s in range(seeds)), key=lambda k: -ALGORITHMS[k[0]][2])
    print(f"{len(specs)} runs ({', '.join(names)} x {seeds} seed(s)), {rounds} rounds, {args.jobs} job(s)")
    errors: dict[str, str] = {}

    def done(name: str, seed: int, result: tuple[dict[str, Any] | None, str]) -> None:
        summary, error = result
        if error:
            errors[name] = error
        print(f"  {name} seed {seed}: " + (f"FAILED {error}" if error else f"{summary['wall_time_s']:.1f} s wall"),
              flush=True)

    jobs = [(n, s, overrides(n, s, rounds, preset["every"], data), str(out / "runs" / f"{n}-s{s}")) for n, s in specs]
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(run_safe, o, d): (n, s) for n, s, o, d in jobs}
            for future in as_completed(futures):
                done(*futures[future], future.result())
    else:
        for n, s, o, d in jobs:
            done(n, s, run_safe(o, d))


    stats, text, labelled = table([d for *_, d in jobs], names, errors)
    save_figures({"personalization": personalization_gain(labelled, metric="accuracy"),
                  "personalization_curves": curves(labelled, y="eval_metric_post")}, figures)
    total = timer()
    settings = {**WORKLOAD, "rounds": rounds, "seeds": seeds, "eval_every": preset["every"], "data": str(data),
                "algorithms": {n: list(ALGORITHMS[n][1]) for n in names}, "errors": errors, "total_wall_s": total}
    write_outputs(out, "personalization", stats, text, settings)
    print("\n" + text)
    w = WORKLOAD
    print(f"\nfinal round {rounds - 1}; mean ± std over {seeds} seed(s); held-out accuracy on {w['eval_clients']} "
          f"writers before and after {w['adapt_steps']} SGD steps (lr {w['adapt_lr']}; Meta-SGD: its learned "
          f"rates); total {total:.0f} s wall; figures in {figures}/")


if __name__ == "__main__":
    main()
