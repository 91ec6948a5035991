"""Wall time of a study as one ``metafleet sweep`` against the same trials as a shell loop of ``metafleet run``.

The study: Reptile and FOMAML x Dirichlet alpha in {0.1, 1.0} x 3 seeds (12 trials) on the Gaussian-mixture
pool, 200 clients, 10 per round, 30 rounds. Three ways, in one invocation, alternated ``--repeats`` times:

- ``loop-ray``: 12 x ``metafleet run`` with the default Ray backend (each run starts its own Ray), as a user's
  first shell loop would;
- ``loop-inline``: 12 x ``metafleet run --set system.backend='"inline"'`` (no Ray at all, one after another);
- ``sweep``: one ``metafleet sweep`` of the same 12 trials (inline trials, as many at once as Ray's CPUs allow).

Every trial's metrics are the same in all three (``tests/actors/test_sweep.py`` checks a sweep trial against the
same config run alone); only wall time differs.

    python -m benchmarks.sweep_speed              # --repeats 1; prints a table, writes --out/sweep_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from simulator.config.toml import dumps_toml
from simulator.study import expand

BASE = {"rounds": 30, "data": {"name": "gaussian", "partition": "dirichlet", "num_clients": 200, "eval_clients": 20},
        "clients": {"per_round": 10}, "eval": {"every": 10, "clients": 20, "adapt_steps": 5},
        "algorithm": {"local_steps": 5, "local_lr": 0.1}, "system": {"backend": "inline"}}
SWEEP = {"grid": {"algorithm.name": ["reptile", "fomaml"], "data.dirichlet_alpha": [0.1, 1.0]}, "seeds": [0, 1, 2]}


def _metafleet(*args: str) -> None:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run([sys.executable, "-m", "actors.cli", *args], check=True, env=env, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


def loop(work: Path, backend: str) -> float:
    """The 12 trials as a shell loop would run them: one ``metafleet run`` after another."""
    study = expand(BASE, SWEEP)
    start = time.perf_counter()
    for t in study.trials:
        sets = [f"{k}={json.dumps(v)}" for k, v in {**t.keys, "seed": t.seed, "system.backend": backend}.items()]
        _metafleet("run", str(work / "base.toml"), "--out", str(work / t.name), "--no-progress", "--no-plots",
                   *[a for s in sets for a in ("--set", s)])
    return time.perf_counter() - start


def sweep(work: Path) -> float:
    start = time.perf_counter()
    _metafleet("sweep", str(work / "study.toml"), "--out", str(work / "sweep"), "--no-progress")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/sweep_speed")
    args = parser.parse_args()
    out = Path(args.out)
    times: dict[str, list[float]] = {"loop-ray": [], "loop-inline": [], "sweep": []}
    for _ in range(args.repeats):
        for way in times:
            work = out / way
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            (work / "base.toml").write_text(dumps_toml(BASE))
            (work / "study.toml").write_text(dumps_toml({**BASE, "sweep": SWEEP}))
            took = sweep(work) if way == "sweep" else loop(work, way.split("-")[1])
            times[way].append(took)
            print(f"{way}: {took:.1f} s", flush=True)
    loop_ray = statistics.median(times["loop-ray"])
    print(f"\n{'way':<12} {'wall s (median)':>16} {'vs loop-ray':>12}")
    for way, values in times.items():
        print(f"{way:<12} {statistics.median(values):>16.1f} {loop_ray / statistics.median(values):>11.2f}x")
    (out / "sweep_speed.json").write_text(json.dumps({"times_s": times, "cpus": os.cpu_count()}, indent=1))


if __name__ == "__main__":
    main()
