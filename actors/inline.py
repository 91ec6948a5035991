"""The in-process backend: the Ray pool's contract, run by one ``ClientWorker`` in this process.

For tests and debugging (breakpoints, profilers). Its results equal the Ray pool's exactly: every
client's work is a pure function of (model version, client id, seed), and the worker fixes torch's
thread count the same way here as in an actor. Submitted work runs lazily, when its result is first
asked for.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from simulator.client.reduce import release_mean
from simulator.client.worker import ClientWorker
from simulator.config.schema import SystemConfig
from simulator.contract import (
    Backend,
    EvalResult,
    Keys,
    Method,
    Reduction,
    Release,
    TrainResult,
    WorkerSpec,
    split_work,
)


@dataclass
class InlinePending:
    client_ids: list[int]
    thunk: Callable[[], Any] | None
    value: Any = field(default=None)


class InlineBackend(Backend):
    def __init__(self, spec: WorkerSpec, system: SystemConfig) -> None:
        self.worker = ClientWorker(spec, worker_id=0)
        self.max_chunk = system.clients_per_actor
        self.num_workers = 1

    def describe(self) -> list[dict[str, object]]:
        return [self.worker.describe()]

    def dispatch(self, method: Method, theta: np.ndarray, keys: Keys, client_ids: np.ndarray,
                 reduce: Reduction | None = None) -> list[InlinePending]:
        """Every call of this backend (``train``, ``evaluate``, ``submit``) goes through here: one pending
        chunk per call of at most ``clients_per_actor`` clients, run when its result is asked for."""
        fn = partial(self.worker.train, reduce=reduce) if method == "train" else self.worker.evaluate
        theta = np.array(theta, copy=True)  # the caller may change its array before the work runs
        return [InlinePending(ids, partial(fn, theta, k, ids))
                for _, ids, k in split_work(client_ids, keys, 1, self.max_chunk)]

    def submit(self, theta: np.ndarray, keys: Keys, client_ids: np.ndarray) -> list[InlinePending]:
        return self.dispatch("train", theta, keys, client_ids)

    def result(self, pending: InlinePending) -> TrainResult:
        if pending.thunk is not None:
            pending.value, pending.thunk = pending.thunk(), None
        return pending.value

    def train(self, theta: np.ndarray, keys: Keys, client_ids: np.ndarray,
              reduce: Reduction | None = None) -> Iterator[TrainResult]:
        for pending in self.dispatch("train", theta, keys, client_ids, reduce):
            yield self.result(pending)

    def evaluate(self, theta: np.ndarray, round_idx: int, client_ids: np.ndarray) -> Iterator[EvalResult]:
        for pending in self.dispatch("evaluate", theta, round_idx, client_ids):
            yield self.result(pending)

    def release(self, partials: list[Any], release: Release, size: int) -> np.ndarray:
        return release_mean(partials, release, size)

    def close(self) -> None:
        pass
