"""Where the time goes before the first client update: ``python -m benchmarks.startup``.

Times, in one process and in order, the steps ``metafleet run`` takes (quickstart config, local Ray):
importing metafleet (torch and Ray), ``prepare()``, ``ray.init``, starting the actor pool, the first
cohort (every process pays torch's one-time imports on its first ``torch.func.grad``) and a second one.
"""

from __future__ import annotations

import os
import time


def main() -> None:
    t0 = time.perf_counter()
    from actors.backends import make_backend
    from simulator.experiment import load_config
    from simulator.rounds.context import prepare
    from simulator.scheduling import sample_cohort

    t1 = time.perf_counter()
    cfg = load_config(None, [])
    prepared = prepare(cfg)
    t2 = time.perf_counter()
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(include_dashboard=False, logging_level="ERROR")
    t3 = time.perf_counter()
    with make_backend(cfg) as backend:
        t4 = time.perf_counter()
        theta = prepared.theta0.numpy()
        list(backend.train(theta, 0, sample_cohort(cfg.seed, 0, cfg.data.num_clients, cfg.clients.per_round)))
        t5 = time.perf_counter()
        list(backend.train(theta, 1, sample_cohort(cfg.seed, 1, cfg.data.num_clients, cfg.clients.per_round)))
        t6 = time.perf_counter()
    ray.shutdown()
    steps = {"imports": t1 - t0, "prepare": t2 - t1, "ray.init": t3 - t2, "actors up": t4 - t3,
             "first cohort": t5 - t4, "second cohort": t6 - t5}
    print("  ".join(f"{k} {v:.2f} s" for k, v in steps.items()) + f"  | to the first update {t5 - t0:.2f} s")


if __name__ == "__main__":
    main()
