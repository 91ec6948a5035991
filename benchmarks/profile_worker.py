"""Where a client worker's time goes on the anchor workload (pyinstrument, one process, 1 thread).

    pip install pyinstrument && python -m benchmarks.profile_worker [--rounds 6]
    python -m benchmarks.profile_worker --whole-run [--rounds 20]
    python -m benchmarks.profile_worker --whole-run --ray 2 --population 10000 --rounds 40

Default: trains 100 anchor-workload clients per round in one ``ClientWorker`` (the code every
backend runs) and prints pyinstrument's call tree; the first round (shard building) is not profiled.
``--whole-run``: profiles ``simulator.rounds.run.run`` of a whole run (driver and worker, inline backend,
vectorized cohorts), after a 2-round warm-up run in the same process (torch's one-time imports). With ``--ray N``:
the same with N actors on the local Ray the pool starts (``actors.cluster``); the profile is then the driver's
alone (its own work, and its waits for the actors). ``--population``: registered clients (the anchor has 1,000).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from actors.backends import make_backend
from benchmarks.throughput import ANCHOR
from simulator.algorithms.server import initial_vector
from simulator.client.worker import ClientWorker
from simulator.contract import WorkerSpec
from simulator.experiment import load_config
from simulator.params import flat_params
from simulator.rounds.run import run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=None, help="6, or 20 with --whole-run")
    parser.add_argument("--whole-run", action="store_true", help="profile the driver and the worker together")
    parser.add_argument("--ray", type=int, default=0, metavar="N", help="with --whole-run: N Ray actors")
    parser.add_argument("--population", type=int, default=1000, help="with --whole-run: registered clients")
    args = parser.parse_args()
    if args.ray < 0 or args.population < 100 or (args.rounds is not None and args.rounds < 3):
        parser.error(f"need --ray >= 0, --population >= 100 (a round has 100 clients) and --rounds >= 3, got "
                     f"{args.ray}, {args.population} and {args.rounds}")
    try:
        from pyinstrument import Profiler
    except ImportError:
        parser.exit(2, "profile_worker: needs pyinstrument; run `pip install pyinstrument`\n")
    if args.whole_run:
        whole_run(Profiler(interval=0.0005), args.rounds or 20, args.ray, args.population)
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


def whole_run(profiler: Any, rounds: int, actors: int = 0, population: int = 1000) -> None:
    system = ['system.backend="ray"', f"system.actors={actors}"] if actors else ['system.backend="inline"']

    def once(r: int, prof: Any = None) -> dict[str, Any]:
        cfg = load_config(None, ANCHOR + [f"rounds={r}", f"data.num_clients={population}", "system.vectorize=true",
                                          *system])
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
