"""The per-core bound on the anchor workload: FLOPs of one client update, a core's batched-GEMM rate, and how
close the inline vectorized path comes to rate / FLOPs.

    python -m benchmarks.flops                      # FLOPs, GEMM rate, bound, and 3 inline vectorized runs
    python -m benchmarks.flops --runs 0             # only the FLOP count, the rate and the bound

FLOPs. One anchor client update (shared/anchors.md: MLP 60-64-10, 5 SGD steps of batch 10, 50 samples) counts
the matrix products only, 2 m n k per (m x k)(k x n) product, per sample and dense layer of fan-in i and fan-out o:

- a forward pass: 2 i o;
- a backward pass: 2 i o for the weight gradient, and 2 i o for the input gradient of every layer but the first
  (nothing upstream of the data needs one);
- so 5 steps x 10 samples x (forward + backward), plus two forward passes over all 50 samples (the loss
  before and after local work, which every metafleet client update reports).

The elementwise work (bias adds, activations, softmax, the SGD update) is printed beside it and left out of the
bound, which is therefore an upper bound on what a core could do.

Rate. One torch thread (``torch.set_num_threads(1)``) runs workload-shaped batched GEMMs, ``torch.bmm`` of
[256, 10, 60] x [256, 60, 64] (a step's first-layer forward for 256 clients, the shape of issue 17), the best
of ``--repeats`` timings of ``--calls`` products. Bound = rate / FLOPs per update, in client updates/s per
core. The measured runs are ``benchmarks.throughput.metafleet`` (inline backend, vectorized, steady updates/s of
``--rounds`` rounds); the script prints their median as a fraction of the bound, so the ratio travels across
machines.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.throughput import metafleet


@dataclass(frozen=True)
class Workload:
    """One client update of an MLP: its layer widths, local SGD steps, batch size and local samples."""

    widths: tuple[int, ...] = (60, 64, 10)
    steps: int = 5
    batch: int = 10
    samples: int = 50

    @property
    def dense(self) -> list[tuple[int, int]]:
        return list(zip(self.widths[:-1], self.widths[1:], strict=True))

    def forward_flops(self) -> int:
        """Matrix-product FLOPs of one sample's forward pass."""
        return sum(2 * i * o for i, o in self.dense)

    def backward_flops(self) -> int:
        """Matrix-product FLOPs of one sample's backward pass: weight gradients, and input gradients after layer 1."""
        return sum(2 * i * o for i, o in self.dense) + sum(2 * i * o for i, o in self.dense[1:])

    def update_flops(self) -> int:
        """Matrix-product FLOPs of one client update: the SGD steps and the two full-data loss passes."""
        train = self.steps * self.batch * (self.forward_flops() + self.backward_flops())
        return train + 2 * self.samples * self.forward_flops()

    def elementwise_flops(self) -> int:
        """The rest, roughly: bias adds and activations per sample and pass, a softmax of about 4 operations per
        class, and 2 per parameter for every SGD step (left out of the bound)."""
        params = sum(i * o + o for i, o in self.dense)
        hidden, classes = sum(self.widths[1:-1]), self.widths[-1]
        per_sample = sum(o for _, o in self.dense) + hidden + 4 * classes
        passes = self.steps * self.batch * 2 + 2 * self.samples  # forward and backward of a step, two loss passes
        return passes * per_sample + 2 * params * self.steps


def gemm_rate(clients: int = 256, rows: int = 10, inner: int = 60, cols: int = 64, calls: int = 200,
              repeats: int = 7) -> float:
    """FLOP/s of one torch thread on ``torch.bmm`` of [clients, rows, inner] x [clients, inner, cols]: the best of
    ``repeats`` timings of ``calls`` products (after a warm-up), on seeded random inputs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(clients, rows, inner, generator=gen)
        b = torch.randn(clients, inner, cols, generator=gen)
        out = torch.empty(clients, rows, cols)
        for _ in range(20):
            torch.bmm(a, b, out=out)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(calls):
                torch.bmm(a, b, out=out)
            best = min(best, (time.perf_counter() - start) / calls)
    finally:
        torch.set_num_threads(threads)
    return 2 * clients * rows * inner * cols / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="inline vectorized runs (median reported); 0 = none")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=7, help="GEMM timings, the best is the rate")
    parser.add_argument("--calls", type=int, default=200, help="products per GEMM timing")
    parser.add_argument("--out", default="benchmarks/results/flops.json")
    args = parser.parse_args()
    work = Workload()
    flops, other = work.update_flops(), work.elementwise_flops()
    rates, measured = [gemm_rate(calls=args.calls, repeats=args.repeats)], []
    for _ in range(args.runs):  # the rate between runs too: the bound is the best a core did in this sitting
        measured.append(metafleet(args.rounds, "inline", 1, True))
        rates.append(gemm_rate(calls=args.calls, repeats=args.repeats))
    rate = max(rates)
    bound = rate / flops
    print(f"one client update: {flops / 1e6:.3f} MFLOP in matrix products (+ about {other / 1e6:.3f} MFLOP "
          f"elementwise, not counted)")
    print(f"batched GEMM, 1 thread, bmm [256,10,60] x [256,60,64]: {rate / 1e9:.1f} GFLOP/s "
          f"(best of {len(rates)} measurements: {', '.join(f'{r / 1e9:.1f}' for r in rates)})")
    print(f"per-core bound: {bound:,.0f} client updates/s")
    result: dict[str, object] = {"mflop_per_update": flops / 1e6, "elementwise_mflop": other / 1e6,
                                 "gflops": rate / 1e9, "gflops_all": [r / 1e9 for r in rates],
                                 "bound_updates_per_s": bound, "machine": platform.machine(),
                                 "processor": platform.processor(), "cpus": os.cpu_count(),
                                 "torch": torch.__version__}
    if measured:
        med = float(np.median(measured))
        print(f"inline vectorized, steady (median of {len(measured)}: "
              f"{', '.join(f'{m:,.0f}' for m in measured)}): {med:,.0f} updates/s = {med / bound:.1%} of the bound")
        result.update(measured_updates_per_s=measured, median_updates_per_s=med, fraction_of_bound=med / bound)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
