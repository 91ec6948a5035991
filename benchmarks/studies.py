"""Studies 1 and 2 of ``benchmarks.run``: algorithms, and heterogeneity against personalization gain.

**algorithms.** FedAvg, Reptile, FOMAML and MAML on the sinusoid task (Finn et al. 2017) and on FedProx's
Synthetic(1,1) (Li et al. 2020, log-normal client sizes), 3 seeds each: held-out loss after adaptation
against round and against simulated time, and the final loss (and accuracy) before and after adaptation.
Client side: the simulator's defaults for every algorithm and both datasets (10 local / inner SGD steps of
batch 10 at lr 0.02; evaluation after 10 SGD steps at lr 0.02 on each held-out client's support set).
Server side: FedAvg and Reptile move theta by the mean client delta with SGD at lr 1.0 (their usual form);
FOMAML and MAML return meta-gradients, which SGD at lr 1.0 turns into divergence (NaN within 20 rounds on
the sinusoid in a pilot), so they use Adam at lr 0.01 (Kingma & Ba's; chosen for stability in that pilot,
where SGD at 0.1 was also stable and about as good; not tuned for the comparison). With equal client
sizes (the sinusoid) FedAvg's n_i-weighted mean equals Reptile's plain mean, so those two runs coincide.

**heterogeneity.** The Gaussian-mixture pool split over clients by Dirichlet(alpha) label skew,
alpha in {0.1, 0.5, 10} (small alpha = few classes per client), Reptile and FedAvg, 3 seeds, the
stragglers study's client settings (5 local steps of batch 10 at lr 0.1; 10 adaptation steps at lr 0.1).
Personalization gain = held-out accuracy after adaptation - before adaptation, at the final evaluation.

Each study writes ``<out>/<study>/``: PNG figures, ``<study>.csv`` / ``.md`` / ``.json`` (table and
settings) and the run directories under ``runs/``. Runs use the inline backend (one torch thread each,
two at a time in separate processes), so every metric except wall time is deterministic per seed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis import plots
from analysis.load import load_runs
from analysis.styling import MARKERS, PALETTE
from benchmarks.common import Spec, final_evals, markdown, mean_std, pm, run_specs, save, write_outputs

ALGORITHMS = ("fedavg", "reptile", "fomaml", "maml")
DATASETS = ("sinusoid", "synthetic")
#: server step per algorithm (see the module docstring for why)
SERVER = {
    "fedavg": ("algorithm.server_optimizer=\"sgd\"", "algorithm.server_lr=1.0"),
    "reptile": ("algorithm.server_optimizer=\"sgd\"", "algorithm.server_lr=1.0"),
    "fomaml": ("algorithm.server_optimizer=\"adam\"", "algorithm.server_lr=0.01"),
    "maml": ("algorithm.server_optimizer=\"adam\"", "algorithm.server_lr=0.01"),
}
DATA = {
    "sinusoid": ("data.name=\"sinusoid\"", "data.shots=10", "data.query=10"),
    "synthetic": ("data.name=\"synthetic\"", "data.alpha=1.0", "data.beta=1.0", "data.samples_per_client=0"),
}
#: relative cost of a run (for longest-first scheduling): second-order MAML is about twice the others
COST = {"fedavg": 1.0, "reptile": 1.0, "fomaml": 1.0, "maml": 2.2}

ALGORITHM_PRESETS: dict[str, dict[str, Any]] = {
    # 24 runs, 9,600 client updates: about 1.5 min on 2 cores
    "small": {"num_clients": 200, "eval_clients": 25, "per_round": 10, "rounds": 40, "eval_every": 4, "seeds": 3},
    # 24 runs, 144,000 client updates: roughly 15-20 min on 2 cores (scaled from "small", not run)
    "full": {"num_clients": 1000, "eval_clients": 100, "per_round": 20, "rounds": 300, "eval_every": 15,
             "seeds": 3},
}
HETEROGENEITY_PRESETS: dict[str, dict[str, Any]] = {
    # 18 runs, 10,800 client updates: about a minute on 2 cores
    "small": {"num_clients": 200, "eval_clients": 50, "per_round": 10, "rounds": 60, "eval_every": 20,
              "seeds": 3, "alphas": (0.1, 0.5, 10.0), "algorithms": ("reptile", "fedavg")},
    "full": {"num_clients": 1000, "eval_clients": 100, "per_round": 20, "rounds": 200, "eval_every": 20,
             "seeds": 3, "alphas": (0.1, 0.5, 10.0), "algorithms": ("reptile", "fedavg")},
}


def _common(p: dict[str, Any], seed: int, name: str) -> list[str]:
    return [f"name=\"{name}\"", f"seed={seed}", f"rounds={p['rounds']}", f"clients.per_round={p['per_round']}",
            f"data.num_clients={p['num_clients']}", f"data.eval_clients={p['eval_clients']}",
            f"eval.clients={p['eval_clients']}", f"eval.every={p['eval_every']}", "system.backend=\"inline\"",
            "system.threads=1", "metrics.flush_every=1000"]


# ------------------------------------------------------------------------------------------ algorithms
def algorithm_specs(p: dict[str, Any]) -> list[Spec]:
    """4 algorithms x 2 datasets x ``seeds`` seeds; the client settings are the simulator's defaults."""
    specs = []
    for dataset in DATASETS:
        for algorithm in ALGORITHMS:
            for seed in range(p["seeds"]):
                overrides = (_common(p, seed, f"algorithms-{dataset}-{algorithm}") + list(DATA[dataset])
                             + [f"algorithm.name=\"{algorithm}\"", "algorithm.local_steps=10",
                                "algorithm.local_lr=0.02", "algorithm.batch_size=10", "eval.adapt_steps=10",
                                "eval.adapt_lr=0.02", *SERVER[algorithm]])
                specs.append(Spec(f"{dataset}-{algorithm}-s{seed}", tuple(overrides),
                                  COST[algorithm] * (1.2 if dataset == "synthetic" else 1.0),
                                  (("dataset", dataset), ("algorithm", algorithm), ("seed", seed))))
    return specs


def _finals(specs: list[Spec], rounds: pd.DataFrame, summaries: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """Final evaluation of every run with the spec's fields and the run's wall time."""
    finals = final_evals(rounds).set_index("run")
    rows = [{**dict(s.meta), "run": s.name, **finals.loc[s.name].to_dict(),
             "wall_s": float(summaries[s.name]["wall_time_s"])} for s in specs]
    return pd.DataFrame(rows)


def algorithms_study(preset: str, out: Path, jobs: int) -> dict[str, Any]:
    """Run study 1; write its figures, table and runs under ``out``; return the table and markdown."""

    p = ALGORITHM_PRESETS[preset]
    specs = algorithm_specs(p)
    print(f"algorithms: {len(specs)} runs ({len(ALGORITHMS)} algorithms x {len(DATASETS)} datasets x "
          f"{p['seeds']} seeds), {p['rounds']} rounds of {p['per_round']} clients, {jobs} job(s)", flush=True)
    summaries = run_specs(specs, out / "runs", jobs)
    figures: dict[str, Any] = {}
    finals = []
    for dataset in DATASETS:
        names = [s for s in specs if dict(s.meta)["dataset"] == dataset]
        runset = load_runs([out / "runs" / s.name for s in names])
        rounds = runset.rounds.assign(label=runset.rounds["algorithm.name"])
        finals.append(_finals(names, rounds, summaries))
        what = "MSE" if dataset == "sinusoid" else "cross-entropy"
        note = "; FedAvg = Reptile here (equal client sizes)" if dataset == "sinusoid" else ""
        shared = (f"{p['per_round']} of {p['num_clients']} clients per round, {p['eval_clients']} held-out clients; "
                  f"mean and min-max over {p['seeds']} seeds{note}")
        figures[f"{dataset}_loss_by_round"] = plots.curves(
            rounds, "eval_loss_post", "round",
            title=f"{dataset}: held-out loss ({what}) after 10 adaptation steps by round; {shared}")
        figures[f"{dataset}_loss_by_sim_time"] = plots.curves(
            rounds, "eval_loss_post", "sim_time_s",
            title=f"{dataset}: held-out loss ({what}) after 10 adaptation steps by simulated time "
                  f"(log-normal device speeds and bandwidths); {shared}")
        figures[f"{dataset}_personalization_gain"] = plots.personalization_gain(rounds, "loss")
        if dataset == "synthetic":
            figures[f"{dataset}_personalization_gain_accuracy"] = plots.personalization_gain(rounds, "accuracy")
    per_run = pd.concat(finals, ignore_index=True)
    # paired with FedAvg of the same dataset and seed (same held-out clients, data and devices)
    base = per_run[per_run.algorithm == "fedavg"].set_index(["dataset", "seed"])["eval_loss_post"]
    per_run["post_vs_fedavg"] = per_run["eval_loss_post"] - base.reindex(
        pd.MultiIndex.from_frame(per_run[["dataset", "seed"]])).to_numpy()
    per_run["gain_loss"] = per_run["eval_loss_post"] - per_run["eval_loss_pre"]
    per_run["gain_acc"] = per_run["eval_metric_post"] - per_run["eval_metric_pre"]
    stats = mean_std(per_run, ["dataset", "algorithm"],
                     ["eval_loss_pre", "eval_loss_post", "gain_loss", "post_vs_fedavg", "eval_metric_pre",
                      "eval_metric_post", "sim_time_s", "wall_s"])
    stats["all_finite"] = per_run.groupby(["dataset", "algorithm"], sort=False)["finite"].all().to_numpy()
    stats["final_round"] = int(per_run["round"].max())
    text = algorithms_markdown(stats)
    per_run.to_csv(out / "algorithms_runs.csv", index=False)
    settings = {"preset": preset, **p, "algorithms": ALGORITHMS, "datasets": DATASETS,
                "server": {a: list(v) for a, v in SERVER.items()}, "data": {d: list(v) for d, v in DATA.items()},
                "client": "local_steps=10, local_lr=0.02, batch_size=10; eval adapt_steps=10, adapt_lr=0.02"}
    write_outputs(out, "algorithms", stats, text, settings)
    save(figures, out)
    shapes = []
    for dataset in DATASETS:
        s = stats[stats.dataset == dataset].set_index("algorithm")
        better = [a for a in ("reptile", "fomaml", "maml") if s.at[a, "eval_loss_post_mean"]
                  < s.at["fedavg", "eval_loss_post_mean"]]
        shapes.append(f"{dataset}: final post-adaptation loss below FedAvg's for "
                      f"{', '.join(better) if better else 'none'} of reptile, fomaml, maml")
    if not stats["all_finite"].all():
        shapes.append("WARNING: some runs have non-finite losses: " + ", ".join(
            f"{r.dataset}/{r.algorithm}" for r in stats.itertuples() if not r.all_finite))
    return {"table": stats, "markdown": text, "shapes": shapes}


def algorithms_markdown(stats: pd.DataFrame) -> str:
    rows = []
    for r in stats.itertuples():
        acc = r.dataset != "sinusoid"
        rows.append([r.dataset, r.algorithm, pm(r.eval_loss_pre_mean, r.eval_loss_pre_std),
                     pm(r.eval_loss_post_mean, r.eval_loss_post_std), pm(r.gain_loss_mean, r.gain_loss_std),
                     "0 (itself)" if r.algorithm == "fedavg" else pm(r.post_vs_fedavg_mean, r.post_vs_fedavg_std),
                     pm(r.eval_metric_pre_mean, r.eval_metric_pre_std) if acc else "-",
                     pm(r.eval_metric_post_mean, r.eval_metric_post_std) if acc else "-",
                     f"{r.sim_time_mean:,.0f}", f"{r.wall_s_mean:.1f}", "yes" if r.all_finite else "NO"])
    return markdown(rows, ["dataset", "algorithm", "loss before adapt.", "loss after adapt.", "after - before",
                           "after - FedAvg's after (paired)", "acc. before", "acc. after", "sim s", "wall s/run",
                           "finite"])


# ---------------------------------------------------------------------------------------- heterogeneity
def heterogeneity_specs(p: dict[str, Any]) -> list[Spec]:
    """Dirichlet alphas x algorithms x seeds on the Gaussian-mixture pool."""
    specs = []
    for alpha in p["alphas"]:
        for algorithm in p["algorithms"]:
            for seed in range(p["seeds"]):
                overrides = (_common(p, seed, f"heterogeneity-{algorithm}")
                             + ["data.name=\"gaussian\"", "data.partition=\"dirichlet\"",
                                f"data.dirichlet_alpha={float(alpha)!r}", f"algorithm.name=\"{algorithm}\"",
                                "algorithm.local_steps=5", "algorithm.local_lr=0.1", "algorithm.batch_size=10",
                                "algorithm.server_lr=1.0", "eval.adapt_steps=10", "eval.adapt_lr=0.1"])
                specs.append(Spec(f"alpha{alpha:g}-{algorithm}-s{seed}", tuple(overrides), 1.0,
                                  (("alpha", float(alpha)), ("algorithm", algorithm), ("seed", seed))))
    return specs


def heterogeneity_study(preset: str, out: Path, jobs: int) -> dict[str, Any]:
    """Run study 2; write its figures, table and runs under ``out``; return the table and markdown."""

    p = HETEROGENEITY_PRESETS[preset]
    specs = heterogeneity_specs(p)
    print(f"heterogeneity: {len(specs)} runs (alpha in {list(p['alphas'])} x {list(p['algorithms'])} x "
          f"{p['seeds']} seeds), {p['rounds']} rounds of {p['per_round']} clients, {jobs} job(s)", flush=True)
    summaries = run_specs(specs, out / "runs", jobs)
    runset = load_runs([out / "runs" / s.name for s in specs])
    label = {s.name: f"alpha={dict(s.meta)['alpha']:g}, {dict(s.meta)['algorithm']}" for s in specs}
    rounds = runset.rounds.assign(label=runset.rounds["run"].map(label))
    per_run = _finals(specs, rounds, summaries)
    # how skewed the held-out clients are: distinct labels per client and the share of the top label
    skew = {}
    for run in runset.runs:
        hist = run.label_histogram
        held = hist[hist["client_id"] >= int(run.config["data"]["num_clients"])]
        by_client = held.groupby("client_id")["count"]
        skew[run.path.name] = (float(by_client.size().mean()), float((by_client.max() / by_client.sum()).mean()))
    per_run["labels_per_client"] = per_run["run"].map(lambda r: skew[r][0])
    per_run["top_label_share"] = per_run["run"].map(lambda r: skew[r][1])
    per_run["gain_acc"] = per_run["eval_metric_post"] - per_run["eval_metric_pre"]
    stats = mean_std(per_run, ["alpha", "algorithm"], ["labels_per_client", "top_label_share", "eval_metric_pre",
                                                       "eval_metric_post", "gain_acc", "eval_loss_pre",
                                                       "eval_loss_post", "wall_s"])
    stats["all_finite"] = per_run.groupby(["alpha", "algorithm"], sort=False)["finite"].all().to_numpy()
    per_run.to_csv(out / "heterogeneity_runs.csv", index=False)
    rows = [[f"{r.alpha:g}", r.algorithm, pm(r.labels_per_client_mean, r.labels_per_client_std, "{:.2f}"),
             pm(r.top_label_share_mean, r.top_label_share_std, "{:.2f}"),
             pm(r.eval_metric_pre_mean, r.eval_metric_pre_std), pm(r.eval_metric_post_mean, r.eval_metric_post_std),
             pm(r.gain_acc_mean, r.gain_acc_std, "{:+.3f}"), pm(r.eval_loss_pre_mean, r.eval_loss_pre_std),
             pm(r.eval_loss_post_mean, r.eval_loss_post_std), "yes" if r.all_finite else "NO"]
            for r in stats.itertuples()]
    text = markdown(rows, ["Dirichlet alpha", "algorithm", "labels per held-out client", "top-label share",
                           "acc. before adapt.", "acc. after adapt.", "gain (after - before)", "loss before",
                           "loss after", "finite"])
    settings = {"preset": preset, **p, "dataset": "gaussian (pool 50 per client, 10 classes, 20 features)",
                "client": "local_steps=5, local_lr=0.1, batch_size=10, server sgd lr 1.0; "
                          "eval adapt_steps=10, adapt_lr=0.1"}
    write_outputs(out, "heterogeneity", stats, text, settings)
    figures = {"personalization_gain_accuracy": plots.personalization_gain(rounds, "accuracy"),
               "gain_by_alpha": gain_by_alpha(stats, p)}
    save(figures, out)
    shapes = []
    for algorithm in p["algorithms"]:
        g = stats[stats.algorithm == algorithm].sort_values("alpha")["gain_acc_mean"].to_numpy()
        shapes.append(f"{algorithm}: gain by increasing alpha {', '.join(f'{v:+.3f}' for v in g)} -> "
                      + ("decreases with alpha (more skew, larger gain)" if np.all(np.diff(g) < 0)
                         else "NOT monotone in alpha"))
    return {"table": stats, "markdown": text, "shapes": shapes}


def gain_by_alpha(stats: pd.DataFrame, p: dict[str, Any]) -> Any:
    """Accuracy before/after adaptation and the gain against Dirichlet alpha (log x), per algorithm."""
    from matplotlib.figure import Figure


    fig = Figure(figsize=(11, 4.5), layout="constrained")
    left, right = fig.subplots(1, 2)
    for i, algorithm in enumerate(p["algorithms"]):
        s = stats[stats.algorithm == algorithm].sort_values("alpha")
        colour, marker = PALETTE[i], MARKERS[i]
        for column, ls, what in (("eval_metric_pre", "--", "before"), ("eval_metric_post", "-", "after")):
            left.errorbar(s["alpha"], s[f"{column}_mean"], yerr=s[f"{column}_std"].fillna(0), color=colour, ls=ls,
                          marker=marker, capsize=3, label=f"{algorithm}, {what} adaptation")
        right.errorbar(s["alpha"], s["gain_acc_mean"], yerr=s["gain_acc_std"].fillna(0), color=colour,
                       marker=marker, capsize=3, label=algorithm)
    right.axhline(0.0, color="#999999", lw=1)
    for ax, ylabel in ((left, "held-out accuracy (fraction of query samples)"),
                       (right, "personalization gain (accuracy after - before)")):
        ax.set_xscale("log")
        ax.set_xlabel("Dirichlet alpha (log scale; small = more label skew)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(f"Heterogeneity: Gaussian mixture split by Dirichlet(alpha), {p['num_clients']} clients "
                 f"({p['per_round']} per round), {p['rounds']} rounds;\nfinal evaluation on {p['eval_clients']} "
                 f"held-out clients; mean ± std over {p['seeds']} seeds", fontsize="medium")
    return fig
