"""The Ray actor of the pool (``actors.pool``): one ``ClientWorker`` serving many clients per call.

``ClientActor`` is a thin Ray wrapper around ``simulator.client.worker.ClientWorker``, which builds its own
clients' shards and model; ``start_call`` starts one call of a chunk and returns its result's reference.
``FAULT_ENV`` (tests only) makes an actor SIGKILL itself at the start of its N-th call: ``die_on_call:N`` (every
actor) or ``die_on_call:N:W`` (only worker W); ``die_once_on_call`` spares the replacements (``actors.pool``).
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

import numpy as np
import ray

from simulator.client.worker import ClientWorker
from simulator.contract import EvalResult, Method, Reduction, TrainResult, WorkerSpec

#: test-only fault injection (see the module docstring)
FAULT_ENV = "METAFLEET_FAULT_INJECT"


@ray.remote
class ClientActor:
    """A Ray actor serving many clients: ``train`` and ``evaluate`` take a list of client ids."""

    def __init__(self, spec: WorkerSpec, worker_id: int, log_level: int = logging.WARNING, fault: str = "") -> None:
        logging.basicConfig(level=log_level, format="%(name)s: %(message)s")
        self.worker = ClientWorker(spec, worker_id)
        self.calls, self.die_on_call = 0, 0
        if fault:
            n, _, only = fault.partition(":")[2].partition(":")
            self.die_on_call = int(n) if not only or int(only) == worker_id else 0

    def describe(self) -> dict[str, object]:
        return {**self.worker.describe(), "node": ray.get_runtime_context().get_node_id()}

    def _call(self) -> None:
        self.calls += 1
        if self.calls == self.die_on_call:
            os.kill(os.getpid(), signal.SIGKILL)

    def train(self, theta: np.ndarray, keys: int | list[int], client_ids: list[int],
              reduce: Reduction | None = None) -> TrainResult:
        self._call()
        return self.worker.train(theta, keys, client_ids, reduce)

    def prefetch(self, client_ids: list[int]) -> int:
        """Build the shards of the clients this actor trains next (queued behind its current call, so it runs
        while the driver aggregates); not counted as a call by the fault injection."""
        return self.worker.prefetch(client_ids)

    def evaluate(self, theta: np.ndarray, round_idx: int, client_ids: list[int]) -> EvalResult:
        self._call()
        return self.worker.evaluate(theta, round_idx, client_ids)


def start_call(actor: Any, method: Method, model_ref: Any, keys: int | list[int], client_ids: list[int],
               reduce: Reduction | None = None) -> Any:
    """Start ``actor.train`` or ``actor.evaluate`` on a chunk; returns the result's object reference. ``reduce``:
    the chunk's share of a training call's ``Reduction`` (``Reduction.parts``; None: per-client vectors come
    back)."""
    if method == "evaluate":
        return actor.evaluate.remote(model_ref, keys, client_ids)
    return actor.train.remote(model_ref, keys, client_ids, reduce)
