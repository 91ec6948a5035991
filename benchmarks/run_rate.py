"""One anchor run in this process, inline: its steady and whole-run client updates/s, and its wall time.

The anchor workload of ``benchmarks.scale`` (``overrides("inline", per_round, rounds, population=10000, mode)``),
run once by ``simulator.rounds.run.run`` on the in-process backend. ``steady_updates_per_s`` is a median round, so a
pause every hundred rounds (a full collection of Python's collector, say) hardly moves it; ``updates_per_s`` is over
the whole run and shows it; so does the time the run spent in Python's full collections (``gc.callbacks``,
generation 2, counted during ``run`` only), printed beside. Used for the sixth pass of issue 17 in
``benchmarks/README.md``, alternated between trees with ``PYTHONPATH``:

    python -m benchmarks.run_rate --mode fedbuff --rounds 200
    python -m benchmarks.run_rate --mode sync --rounds 200
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

from actors.backends import make_backend
from benchmarks.scale import overrides
from simulator.config.schema import ConfigError
from simulator.experiment import load_config
from simulator.rounds.run import run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("sync", "fedbuff"), default="sync")
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--per-round", type=int, default=100, help="clients per round (FedBuff: in flight, buffered)")
    args = parser.parse_args()
    try:
        cfg = load_config(None, list(overrides("inline", args.per_round, args.rounds, population=10000,
                                               mode=args.mode)))
    except ConfigError as exc:  # --rounds 0, --per-round -5: one line, exit 2
        print(f"run_rate: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    full: list[float] = []  # seconds of each full collection during the run
    began = [0.0]

    def timed(phase: str, info: dict[str, int]) -> None:
        if info["generation"] == 2:
            if phase == "start":
                began[0] = time.perf_counter()
            else:
                full.append(time.perf_counter() - began[0])

    with make_backend(cfg) as backend, tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        gc.callbacks.append(timed)
        try:
            summary = run(cfg, backend, Path(tmp) / "run")
        finally:
            gc.callbacks.remove(timed)
        wall = time.perf_counter() - start
    print(f"{args.mode}: steady {summary['steady_updates_per_s']:,.0f} updates/s, whole run "
          f"{summary['updates_per_s']:,.0f} updates/s, wall {wall:.2f} s; {len(full)} full collections, "
          f"{sum(full):.3f} s")


if __name__ == "__main__":
    main()
