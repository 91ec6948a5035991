"""What an actor adds to client work: the same ``ClientWorker`` in this process and inside a Ray actor, and the CPU
cost of one actor call.

1. Client work: 50 fresh anchor-workload clients per call (``prefetch`` builds their shards, then ``train`` with a
   ``Reduction``), 30 calls each, CPU ms per call (medians), in the driver's process and in one actor, alternated;
   then in two actors at once (as a round of a 2-actor pool runs them), and in one of them alone right after. On a
   machine with at least as many cores as actors, the same client work costing more CPU in two actors at once than
   in one alone says the actors slow each other down (shared caches, memory bandwidth); the driver only waits
   meanwhile. Every call's clients are new ones of the registered population.
2. One call: the CPU the actor and the driver spend per call (``/proc`` for the actor, ``process_time`` here) and
   its wall time, for a bare call (as a ``prefetch``), and for a call that resolves a freshly ``ray.put`` model
   (4,554 float32 values) and carries 50 client ids and a chunk's coefficients (as a round's ``train``).

    python -m benchmarks.actor_overhead [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import ray

from actors.cluster import connect
from benchmarks.cpu_budget import parent_and_cpu
from benchmarks.throughput import ANCHOR
from simulator.algorithms.exactsum import DEFAULT_BOUND, Grid
from simulator.algorithms.server import initial_vector
from simulator.client.worker import ClientWorker
from simulator.contract import Reduction, WorkerSpec
from simulator.experiment import load_config
from simulator.params import flat_params

CHUNK, CALLS = 50, 30
POPULATION = 1_000_000
SPEC = WorkerSpec.from_config(load_config(None, ANCHOR + [f"data.num_clients={POPULATION}", "system.vectorize=true"]))
#: client-work measurements per repeat (in this process, in an actor, two at once, one alone), each on new clients
WORKS_PER_REPEAT = 5


def client_work(worker: ClientWorker, theta: np.ndarray, first: int) -> tuple[float, float]:
    """Median CPU ms per call of building 50 new clients' shards, and of training them."""
    shards, train = [], []
    for r in range(CALLS):
        ids = list(range(first + r * CHUNK, first + (r + 1) * CHUNK))
        red = Reduction(np.array(ids), np.full(CHUNK, 1 / CHUNK), Grid.for_bound(DEFAULT_BOUND, 1.0))
        t0 = time.process_time()
        worker.prefetch(ids)
        t1 = time.process_time()
        worker.train(theta, r, ids, red)
        shards.append(t1 - t0)
        train.append(time.process_time() - t1)
    return 1e3 * statistics.median(shards), 1e3 * statistics.median(train)


@ray.remote(num_cpus=1)
class Probe:
    """An actor holding the same ``ClientWorker`` as the driver's, and an empty method to time calls by."""

    def __init__(self) -> None:
        self.worker = ClientWorker(SPEC)
        self.theta = initial_vector(SPEC.algorithm, flat_params(self.worker.model)).numpy()

    def pid(self) -> int:
        return os.getpid()

    def work(self, first: int) -> tuple[float, float]:
        return client_work(self.worker, self.theta, first)

    def call(self, model: Any = None, ids: Any = None, reduce: Any = None) -> None:
        return None


def _cpu(pid: int) -> float:
    return parent_and_cpu(pid)[1]


def per_call(pid: int, fn: Callable[[], object], n: int = 1000) -> tuple[float, float, float]:
    """(actor pid ``pid``'s CPU, this process's CPU, wall time) in ms per call of ``fn``, after 50 unmeasured."""
    for _ in range(50):
        fn()
    actor0, driver0, wall0 = _cpu(pid), time.process_time(), time.perf_counter()
    for _ in range(n):
        fn()
    return (1e3 * (_cpu(pid) - actor0) / n, 1e3 * (time.process_time() - driver0) / n,
            1e3 * (time.perf_counter() - wall0) / n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    most = POPULATION // (WORKS_PER_REPEAT * CALLS * CHUNK)
    if not 1 <= args.repeats <= most:
        parser.error(f"--repeats must be between 1 and {most} (each repeat trains "
                     f"{WORKS_PER_REPEAT * CALLS * CHUNK:,} new clients of {POPULATION:,}), got {args.repeats}")
    fresh = iter(range(0, POPULATION, CALLS * CHUNK))  # the first client id of each measurement's new clients
    connect(load_config(None, ANCHOR).system)
    local = ClientWorker(SPEC)
    theta = initial_vector(SPEC.algorithm, flat_params(local.model)).numpy()
    probe = Probe.remote()
    pid = ray.get(probe.pid.remote())
    print(f"client work, {CHUNK} new clients a call, CPU ms per call (median of {CALLS}): shards + train")
    for i in range(args.repeats):
        here = client_work(local, theta, next(fresh))
        there = ray.get(probe.work.remote(next(fresh)))
        print(f"  repeat {i}: in this process {here[0]:.2f} + {here[1]:.2f}, "
              f"in an actor {there[0]:.2f} + {there[1]:.2f}")
    other = Probe.remote()
    ray.get(other.pid.remote())
    print(f"client work in two actors at once, then in the first alone (CPU ms per call, median of {CALLS})")
    for i in range(args.repeats):
        both = ray.get([p.work.remote(next(fresh)) for p in (probe, other)])
        alone = ray.get(probe.work.remote(next(fresh)))
        print(f"  repeat {i}: at once {both[0][0]:.2f} + {both[0][1]:.2f} and {both[1][0]:.2f} + {both[1][1]:.2f}, "
              f"alone {alone[0]:.2f} + {alone[1]:.2f}")
    ids, red = list(range(CHUNK)), Reduction(np.arange(CHUNK), np.ones(CHUNK), Grid.for_bound(DEFAULT_BOUND, 1.0))
    print("one actor call, ms per call: actor CPU, driver CPU, wall")
    for name, fn in (("bare call", lambda: ray.get(probe.call.remote())),
                     ("model reference + ids + coefficients",
                      lambda: ray.get(probe.call.remote(ray.put(theta), ids, red)))):
        actor, driver, wall = per_call(pid, fn)
        print(f"  {name}: {actor:.2f}, {driver:.2f}, {wall:.2f}")


if __name__ == "__main__":
    main()
