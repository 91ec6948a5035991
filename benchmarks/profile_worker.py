"""Where a client worker's time goes on the anchor workload (pyinstrument, one process, 1 thread).

    pip install pyinstrument && python -m benchmarks.profile_worker [--rounds 6]
    python -m benchmarks.profile_worker --whole-run [--rounds 20]

Default: trains 100 anchor-workload clients per round in one ``ClientWorker`` (the code every
backend runs) and prints pyinstrument's call tree; the first round (shard building) is not profiled.
``--whole-run``: profiles ``simulator.rounds.run.run`` of a whole run (driver and worker, inline backend,
vectorized cohorts), after a 2-round warm-up run in the same process (torch's one-time imports).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.throughput import ANCHOR
from simulator.algorithms.server import initial_vector
from simulator.client.worker import ClientWorker
from simulator.contract import WorkerSpec
from simulator.experiment import load_config
from simulator.params import flat_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=None, help="6, or 20 with --whole-run")
    parser.add_argument("--whole-run", action="store_true", help="profile the driver and the worker together")
    args = parser.parse_args()
    try:
        from pyinstrument import Profiler
    except ImportError:
        parser.exit(2, "profile_worker: needs pyinstrument; run `pip install pyinstrument`\n")
    if args.whole_run:
        whole_run(Profiler(interval=0.0005), args.rounds or 20)
        return
    cfg = load_config(None, ANCHOR)
    worker = ClientWorker(WorkerSpec.from_config(cfg))
    theta = initial_vector(cfg.algorithm, flat_params(worker.model)).numpy()
    clients = list(range(100))
    worker.train(theta, 0, clients)  # builds and caches the shards
    profiler = Profiler(interval=0.0002)
    profiler.start()
    for r in range(1, (args.rounds or 6) + 1):
        worker.train(theta, r, clients)
    profiler.stop()
    print(profiler.output_text(unicode=False, color=False))


def whole_run(profiler: Any, rounds: int) -> None:
    from actors.backends import make_backend
    from simulator.rounds.run import run

    def once(r: int, prof: Any = None) -> dict[str, Any]:
        cfg = load_config(None, ANCHOR + [f"rounds={r}", 'system.backend="inline"', "system.vectorize=true"])
        with make_backend(cfg) as backend:
            with tempfile.TemporaryDirectory() as tmp:
                if prof is not None:
                    prof.start()
                summary = run(cfg, backend, Path(tmp) / "run")
                if prof is not None:
                    prof.stop()
        return summary

    once(2)
    summary = once(rounds, profiler)
    print(f"steady updates/s: {summary['steady_updates_per_s']:,.0f}")
    print(profiler.output_text(unicode=False, color=False))


if __name__ == "__main__":
    main()
