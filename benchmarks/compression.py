"""Compressed uploads under a narrow uplink: held-out post-adaptation loss against simulated time.

    python -m benchmarks.compression            # writes benchmarks/figures/compression.png and results/compression.*

Reptile on the sinusoid (the quickstart's model, 1,761 parameters: a 7,044-byte float32 upload), 200 training
clients, 10 per round, 150 rounds, 50 held-out clients evaluated every 10 rounds. Every device computes 100
samples per simulated second and downloads at 0.2 Mbit/s, but uploads at 0.01 Mbit/s (``uplink_ratio`` 0.05):
an uncompressed upload takes 5.6 s against 1 s of compute. Compared: no compression, int8 (1,765 B) and top-k
with k/d = 0.1 (176 values: 1,408 B), seed 0, on the in-process backend (``benchmarks.common.run_specs``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from analysis.load import load_runs
from analysis.plots import curves
from benchmarks.common import Spec, final_evals, markdown, run_specs, save, write_outputs

HERE = Path(__file__).resolve().parent
METHODS = {"none": (), "int8": ('compression.method="int8"',),
           "topk 0.1": ('compression.method="topk"', "compression.fraction=0.1")}
BASE = ("data.num_clients=200", "data.eval_clients=50", "eval.clients=50", "clients.per_round=10", "rounds=150",
        "eval.every=10", 'system.backend="inline"', "metrics.flush_every=1000", "checkpoint_every=0",
        'devices.speed={dist="constant", median=100.0}', 'devices.bandwidth={dist="constant", median=0.2}',
        "devices.uplink_ratio=0.05")


def order(specs: list[Spec]):
    """Sort key putting run names in the order of ``specs``."""
    names = [s.name for s in specs]
    return lambda run: next(i for i, n in enumerate(names) if str(run).endswith(n))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=Path("runs/benchmarks-compression"))
    parser.add_argument("--jobs", type=int, default=1)
    args = parser.parse_args()
    specs = [Spec(name.replace(" ", "-"), (f'name="compression-{name.replace(" ", "-")}"', *BASE, *extra))
             for name, extra in METHODS.items()]
    run_specs(specs, args.runs, args.jobs)

    rs = load_runs([str(args.runs / s.name) for s in specs])
    fig = curves(rs.rounds, y="eval_loss_post", x="sim_time_s",
                 title="held-out loss after adaptation, 0.01 Mbit/s uplink: none vs int8 vs top-k 0.1")
    print("figure:", *save({"compression": fig}, HERE / "figures"))
    last = final_evals(rs.rounds).set_index("run")
    rows = []
    for method, run in zip(METHODS, sorted(rs.rounds["run"].unique(), key=order(specs)), strict=True):
        r = rs.rounds[rs.rounds["run"] == run]
        rows.append({"method": method, "bytes_up_per_round": int(r["bytes_up"].iloc[0]),
                     "sim_time_s": float(last.loc[run, "sim_time_s"]),
                     "eval_loss_post": float(last.loc[run, "eval_loss_post"])})
    table = pd.DataFrame(rows)
    text = markdown([(t.method, f"{t.bytes_up_per_round:,}", f"{t.sim_time_s:,.0f}", f"{t.eval_loss_post:.3f}")
                     for t in table.itertuples()],
                    ["method", "bytes up per round", "simulated s for 150 rounds", "final post-adaptation loss"])
    print(text)
    write_outputs(HERE / "results", "compression", table, text, {"overrides": BASE, "methods": METHODS})


if __name__ == "__main__":
    main()
