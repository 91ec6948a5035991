"""The in-process backend: the Ray pool's contract, run by one ``ClientWorker`` in this process.

For tests and debugging (breakpoints, profilers). Its results equal the Ray pool's exactly: every
client's work is a pure function of (model version, client id, seed), and the worker fixes torch's
thread count the same way here as in an actor. Submitted work runs lazily, when its result is first
asked for.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from simulator.client.reduce import release_mean, selected_mean, summarize
from simulator.client.worker import ClientWorker
from simulator.config.schema import SystemConfig
from simulator.contract import (
    Backend,
    EvalResult,
    Keys,
    Method,
    Reduction,
    Release,
    Selection,
    TrainResult,
    WorkerSpec,
    split_work,
)


@dataclass
class InlinePending:
    client_ids: list[int]
    thunk: Callable[[], Any] | None
    value: Any = field(default=None)
    submitted: bool = False
    keep: bool = False


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

    def submit(self, theta: np.ndarray, keys: Keys, client_ids: np.ndarray, keep: bool = False) -> list[InlinePending]:
        pending = self.dispatch("train", theta, keys, client_ids)
        for p in pending:
            p.submitted, p.keep = True, keep
        return pending

    def result(self, pending: InlinePending) -> TrainResult:
        if pending.thunk is not None:
            value, pending.thunk = pending.thunk(), None
            if pending.submitted:  # the per-client scalars, worked out here as a worker does (``Backend.submit``)
                value = summarize(value, self.worker.spec.clip_norms)
            if pending.keep:  # the vectors are the chunk's handle (this process holds them)
                value = dataclasses.replace(value, vectors=value.vectors[:0], kept=value.vectors)
            pending.value = value
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

    def release_rows(self, blocks: list[Any], selection: Selection, release: Release, size: int) -> np.ndarray:
        return selected_mean(blocks, selection, release, self.worker.spec.seed, size)

    def close(self) -> None:
        pass
