"""Shard prefetch on and off (``system.prefetch``), alternated on one local Ray, anchor workload on 2 actors.

With prefetch each actor builds the shards of the clients it trains in round r + 1 while the driver combines round
r (``RayPool.prefetch``, queued behind the actor's current call). Each run starts a fresh pool (empty shard caches)
with seed = the repeat's index, so the two settings see the same cohorts; steady updates/s, medians over repeats.

    python -m benchmarks.prefetch --per-round 100 --population 10000 --rounds 40 --repeats 6
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import ray

from actors.backends import make_backend
from benchmarks.throughput import ANCHOR
from simulator.experiment import load_config
from simulator.rounds.run import run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-round", type=int, default=100)
    parser.add_argument("--population", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--actors", type=int, default=2)
    args = parser.parse_args()
    for flag in ("per_round", "population", "rounds", "repeats", "actors"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.per_round > args.population:
        parser.error(f"--per-round {args.per_round} is more than --population {args.population}")
    ray.init(address="local", num_cpus=args.actors, include_dashboard=False, logging_level="ERROR",
             log_to_driver=False)
    steady: dict[bool, list[float]] = {True: [], False: []}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(args.repeats):
                for on in (True, False):
                    cfg = load_config(None, ANCHOR + [
                        f"rounds={args.rounds}", f"data.num_clients={args.population}",
                        f"clients.per_round={args.per_round}", 'system.backend="ray"', f"system.actors={args.actors}",
                        f"system.prefetch={str(on).lower()}", f"seed={i}"])
                    with make_backend(cfg) as pool:
                        summary = run(cfg, pool, Path(tmp) / f"{on}-{i}")
                    steady[on].append(summary["steady_updates_per_s"])
                    print(f"repeat {i}, prefetch {'on ' if on else 'off'}: {steady[on][-1]:,.0f} updates/s", flush=True)
    finally:
        ray.shutdown()
    on, off = (statistics.median(steady[k]) for k in (True, False))
    print(f"{args.per_round} clients per round of {args.population:,}: prefetch on {on:,.0f}, off {off:,.0f} "
          f"updates/s (medians of {args.repeats}): {on / off:.2f}x")


if __name__ == "__main__":
    main()
