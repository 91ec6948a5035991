"""Where a client worker's time goes on the anchor workload (pyinstrument, one process, 1 thread).

    pip install pyinstrument && python -m benchmarks.profile_worker [--rounds 6]

Trains 100 anchor-workload clients per round in one ``ClientWorker`` (the code every backend
runs) and prints pyinstrument's call tree; the first round (shard building) is not profiled.
"""

from __future__ import annotations

import argparse

from benchmarks.throughput import ANCHOR
from simulator.algorithms import initial_vector
from simulator.config import load_config
from simulator.models import flat_params
from simulator.worker import ClientWorker, WorkerSpec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    try:
        from pyinstrument import Profiler
    except ImportError:
        parser.exit(2, "profile_worker: needs pyinstrument; run `pip install pyinstrument`\n")
    cfg = load_config(None, ANCHOR)
    worker = ClientWorker(WorkerSpec.from_config(cfg))
    theta = initial_vector(cfg.algorithm, flat_params(worker.model)).numpy()
    clients = list(range(100))
    worker.train(theta, 0, clients)  # builds and caches the shards
    profiler = Profiler(interval=0.0002)
    profiler.start()
    for r in range(1, args.rounds + 1):
        worker.train(theta, r, clients)
    profiler.stop()
    print(profiler.output_text(unicode=False, color=False))


if __name__ == "__main__":
    main()
