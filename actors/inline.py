"""The in-process backend: the Ray pool's interface, run by one ``ClientWorker`` in this process.

For tests and debugging (breakpoints, profilers). Its results equal the Ray pool's exactly:
every client's work is a pure function of (model version, client id, seed), and the worker
fixes torch's thread count the same way here as in an actor. Submitted work runs lazily, when
its result is first asked for.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from simulator.config import SystemConfig
from simulator.scheduling import split_work
from simulator.worker import ClientWorker, EvalResult, TrainResult, WorkerSpec


@dataclass
class InlinePending:
    client_ids: list[int]
    thunk: Any
    value: Any = field(default=None)


class InlineBackend:
    def __init__(self, spec: WorkerSpec, system: SystemConfig) -> None:
        self.worker = ClientWorker(spec, worker_id=0)
        self.max_chunk = system.clients_per_actor
        self.num_workers = 1

    def describe(self) -> list[dict[str, object]]:
        return [self.worker.describe()]

    def submit(self, method: str, theta: np.ndarray, keys: int | np.ndarray,
               client_ids: np.ndarray) -> list[InlinePending]:
        fn = getattr(self.worker, method)
        theta = np.array(theta, copy=True)  # the caller may change its array before the work runs
        return [InlinePending(ids, partial(fn, theta, k, ids))
                for _, ids, k in split_work(client_ids, keys, 1, self.max_chunk)]

    def result(self, pending: InlinePending) -> TrainResult | EvalResult:
        if pending.thunk is not None:
            pending.value, pending.thunk = pending.thunk(), None
        return pending.value

    def map(self, method: str, theta: np.ndarray, keys: int | np.ndarray,
            client_ids: np.ndarray) -> Iterator[TrainResult | EvalResult]:
        for pending in self.submit(method, theta, keys, client_ids):
            yield self.result(pending)

    def close(self) -> None:
        pass
