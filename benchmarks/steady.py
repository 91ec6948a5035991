"""One run's steady client updates/s on the anchor workload, after a warm-up on the same pool: the line to alternate
between two trees when comparing commits in one sitting (each tree on its own ``PYTHONPATH``).

    PYTHONPATH=$TREE python -m benchmarks.steady ray-2 --per-round 100 --population 1000 --rounds 100
    PYTHONPATH=$TREE python -m benchmarks.steady inline --mode fedbuff --per-round 100 --rounds 100

The configuration is ``benchmarks.scale``'s (the anchor workload with this execution, clients per round, rounds and
registered population); the warm-up is a 3-round run of the same configuration on the same backend (actors
started, torch's one-time work done), and the figure printed is the measured run's ``steady_updates_per_s``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from actors.backends import make_backend
from benchmarks.scale import SYSTEMS, overrides
from simulator.config.schema import ConfigError
from simulator.experiment import load_config
from simulator.rounds.run import run

WARMUP_ROUNDS = 3


def steady(system: str, per_round: int, rounds: int, population: int, mode: str = "sync") -> float:
    """The steady updates/s of one ``rounds``-round run after a ``WARMUP_ROUNDS``-round one on the same backend."""
    def config(r: int):
        return load_config(None, overrides(system, per_round, r, population=population, mode=mode))

    cfg = config(rounds)
    with make_backend(cfg) as pool, tempfile.TemporaryDirectory() as tmp:
        run(config(WARMUP_ROUNDS), pool, Path(tmp) / "warm-up")
        return float(run(cfg, pool, Path(tmp) / "run")["steady_updates_per_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("system", choices=sorted(SYSTEMS))
    parser.add_argument("--per-round", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--population", type=int, default=1000)
    parser.add_argument("--mode", choices=["sync", "fedbuff"], default="sync")
    args = parser.parse_args()
    try:
        rate = steady(args.system, args.per_round, args.rounds, args.population, args.mode)
    except ConfigError as exc:  # --rounds 0, --per-round -5, a Ray that cannot start: one line, exit 2
        print(f"steady: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(round(rate))


if __name__ == "__main__":
    main()
