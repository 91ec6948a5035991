"""The cost of the exact sum on a worker: ``exactsum.Accumulator.add`` of one anchor-sized block against the float64
dot product it replaced. Run it with another tree first on ``PYTHONPATH`` to time that tree's ``Accumulator``.

A block is 100 anchor clients' update vectors (MLP 60-64-10: 4,554 float32 values each) with FedAvg's weights;
each figure is the best of 5 means of ``--calls`` calls (50), one thread, in milliseconds.

    python -m benchmarks.exactsum_speed [--clients 100] [--size 4554]
    python -m benchmarks.exactsum_speed --clients 20 --size 6603710 --calls 3   # a worker's block of CNN clients
    PYTHONPATH=/tmp/before python benchmarks/exactsum_speed.py    # the Accumulator of a worktree of an older commit
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import numpy as np
import torch

from simulator.algorithms.exactsum import Accumulator, Grid


def best_ms(fn: Callable[[], object], calls: int = 50, repeats: int = 5) -> float:
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--size", type=int, default=4554)
    parser.add_argument("--calls", type=int, default=50, help="calls per mean (5 means, the best is reported)")
    args = parser.parse_args()
    if args.clients < 1 or args.size < 1 or args.calls < 1:
        parser.error(f"--clients, --size and --calls must be at least 1, got {args.clients}, {args.size} and "
                     f"{args.calls}")
    torch.set_num_threads(1)
    gen = np.random.default_rng(0)
    rows = (gen.standard_normal((args.clients, args.size)) * 0.01).astype(np.float32)
    coefs = np.full(args.clients, 1.0 / args.clients)
    grid, keys = Grid.for_bound(), np.arange(args.clients)

    def accumulate() -> None:
        Accumulator(grid, args.size).add(rows, coefs, keys)

    timings = {"Accumulator.add (the exact sum, with its bound check)": best_ms(accumulate, args.calls),
               "float64 weights @ rows (the inexact sum it replaced)": best_ms(lambda: coefs @ rows.astype(np.float64),
                                                                               args.calls)}
    print(f"{args.clients} rows x {args.size} values:")
    for name, ms in timings.items():
        print(f"  {name}: {ms:.2f} ms")


if __name__ == "__main__":
    main()
