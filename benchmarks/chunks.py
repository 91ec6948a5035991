"""Per-client time of the vectorized path against the number of clients stacked at once (one worker, 1 thread).

    python -m benchmarks.chunks                # 2,000 anchor-workload clients, chunks of 25 to 2,000

The anchor workload's clients are trained by one ``ClientWorker`` in calls of ``chunk`` clients (their
shards built beforehand); each line is the best of 2 passes over all clients. It is the measurement
behind ``simulator.client.worker.CPU_CHUNK``: the worker splits a larger call into chunks of that size.
"""

from __future__ import annotations

import argparse
import time

from benchmarks.throughput import ANCHOR
from simulator.algorithms.server import initial_vector
from simulator.client import worker as worker_module
from simulator.client.worker import ClientWorker
from simulator.contract import WorkerSpec
from simulator.experiment import load_config
from simulator.params import flat_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=2000)
    parser.add_argument("--chunks", type=int, nargs="+", default=[25, 50, 100, 200, 400, 1000, 2000])
    args = parser.parse_args()
    cfg = load_config(None, ANCHOR + [f"data.num_clients={args.clients}"])
    worker = ClientWorker(WorkerSpec.from_config(cfg))
    theta = initial_vector(cfg.algorithm, flat_params(worker.model)).numpy()
    ids = list(range(args.clients))
    worker.train(theta, 0, ids)  # builds and caches every shard
    worker_module.CPU_CHUNK = args.clients  # the calls below are the chunks
    print("| clients per vectorized computation | µs per client (best of 2) |\n|---|---|")
    for chunk in args.chunks:
        best = float("inf")
        for _ in range(2):
            start = time.perf_counter()
            for i in range(0, len(ids), chunk):
                worker.train(theta, 1, ids[i:i + chunk])
            best = min(best, time.perf_counter() - start)
        print(f"| {chunk:,} | {best / len(ids) * 1e6:.0f} |")


if __name__ == "__main__":
    main()
