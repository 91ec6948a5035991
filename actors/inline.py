"""The in-process backend: the Ray pool's interface, run by one ``ClientWorker`` in this process.

For tests and debugging (breakpoints, profilers). Its results equal the Ray pool's exactly:
every client's work is a pure function of (model version, client id, seed), and the worker
fixes torch's thread count the same way here as in an actor.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from simulator.config import SystemConfig
from simulator.scheduling import split_cohort
from simulator.worker import ClientWorker, EvalResult, TrainResult, WorkerSpec


class InlineBackend:
    def __init__(self, spec: WorkerSpec, system: SystemConfig) -> None:
        self.worker = ClientWorker(spec, worker_id=0)
        self.max_chunk = system.clients_per_actor
        self.num_workers = 1

    def describe(self) -> list[dict[str, object]]:
        return [self.worker.describe()]

    def map(self, method: str, theta: np.ndarray, round_idx: int,
            client_ids: np.ndarray) -> Iterator[TrainResult | EvalResult]:
        fn = getattr(self.worker, method)
        for _, chunk in split_cohort(client_ids, 1, self.max_chunk):
            yield fn(theta, round_idx, chunk)

    def close(self) -> None:
        pass
