"""Round wall time against the registered population: nothing in the driver may be O(population).

The anchor workload (``benchmarks.throughput.ANCHOR``: FedAvg on Synthetic(1,1), 50 samples per
client, MLP 60-64-10) with 1,000 clients per round, in one process (inline backend, vectorized
cohorts), for 1,000 / 10,000 / 100,000 / 1,000,000 registered clients. Each population runs in its
own Python process, so the peak RSS it reports (``resource.getrusage``) is that run's alone.

    python -m benchmarks.population                  # 5 rounds each, 3 repeats; about 3 minutes on 2 cores
    python -m benchmarks.population --rounds 8 --per-round 1000 --populations 1000 1000000
    python -m benchmarks.population --shard-cache 1   # no shard reuse: isolates the population's own cost

Reported per population: the median round wall time from the second round on (the median over
``--repeats`` runs, with their range; repeats are the outer loop, so a shared machine's drifting load
spreads over every population), its ratio to the smallest population's, and the largest peak RSS.
Writes benchmarks/results/population.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

_CHILD = """
import json, resource, sys, tempfile, time
from pathlib import Path
import numpy as np
from actors.backends import make_backend
from benchmarks.throughput import ANCHOR
from simulator.experiment import load_config
from simulator.rounds.run import run
population, per_round, rounds, cache = (int(a) for a in sys.argv[1:5])
cfg = load_config(None, ANCHOR + [f"data.num_clients={population}", f"clients.per_round={per_round}",
                                  f"rounds={rounds}", 'system.backend="inline"', "system.vectorize=true",
                                  f"system.shard_cache={cache}"])
ends = []
with tempfile.TemporaryDirectory() as tmp, make_backend(cfg) as backend:
    start = time.perf_counter()
    run(cfg, backend, Path(tmp) / "run", on_round=lambda row: ends.append(time.perf_counter()))
times = np.diff([start] + ends)
print(json.dumps({"round_s": times.tolist(), "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def measure(population: int, per_round: int, rounds: int, cache: int) -> dict[str, float]:
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(population), str(per_round), str(rounds), str(cache)],
                          capture_output=True, text=True, check=True)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"population": population, "round_s": float(np.median(out["round_s"][1:])), "rss_mb": out["rss_mb"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=1000)
    parser.add_argument("--populations", type=int, nargs="+", default=[1_000, 10_000, 100_000, 1_000_000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shard-cache", type=int, default=65536,
                        help="system.shard_cache; 1 makes every round build its shards, whatever the population")
    parser.add_argument("--out", default="benchmarks/results/population.json")
    args = parser.parse_args()
    runs = [[measure(n, args.per_round, args.rounds, args.shard_cache) for n in args.populations]
            for _ in range(args.repeats)]
    rows = []
    for i, n in enumerate(args.populations):
        times = [rep[i]["round_s"] for rep in runs]
        rows.append({"population": n, "round_s": float(np.median(times)), "runs_s": times,
                     "rss_mb": max(rep[i]["rss_mb"] for rep in runs)})
    base = rows[0]["round_s"]
    lines = [f"| registered clients | round wall time (s; median of {args.repeats}, range; {args.per_round} per "
             f"round) | vs {args.populations[0]:,} | peak RSS (MB) |", "|---|---|---|---|"]
    lines += [f"| {r['population']:,} | {r['round_s']:.3f} ({min(r['runs_s']):.3f}-{max(r['runs_s']):.3f}) | "
              f"{r['round_s'] / base:.2f}x | {r['rss_mb']:.0f} |" for r in rows]
    print("\n".join(lines))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
