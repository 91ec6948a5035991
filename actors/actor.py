"""The Ray actor of the pool (``actors.pool``): one ``ClientWorker`` serving many clients per call.

``ClientActor`` is a thin Ray wrapper around ``simulator.client.worker.ClientWorker``, which builds its own
clients' shards and model; ``start_call`` starts one call of a chunk and returns its result's reference.
``FAULT_ENV`` (tests only) makes an actor SIGKILL itself at the start of its N-th call: ``die_on_call:N`` (every
actor) or ``die_on_call:N:W`` (only worker W); ``die_once_on_call`` spares the replacements (``actors.pool``);
``die_on_release`` / ``die_once_on_release`` count its ``release`` and ``release_rows`` calls (combining a
release's partials or kept rows) instead.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import signal
from typing import Any

import numpy as np
import ray

from simulator.algorithms.exactsum import Partial
from simulator.client.reduce import release_mean, selected_mean
from simulator.client.worker import ClientWorker
from simulator.contract import EvalResult, Method, Reduction, Release, Selection, TrainResult, WorkerSpec

#: test-only fault injection (see the module docstring)
FAULT_ENV = "METAFLEET_FAULT_INJECT"


@ray.remote
class ClientActor:
    """A Ray actor serving many clients: ``train`` and ``evaluate`` take a list of client ids."""

    def __init__(self, spec: WorkerSpec, worker_id: int, log_level: int = logging.WARNING, fault: str = "") -> None:
        logging.basicConfig(level=log_level, format="%(name)s: %(message)s")
        self.worker = ClientWorker(spec, worker_id)
        self.calls, self.die_on_call, self.releases, self.die_on_release = 0, 0, 0, 0
        if fault:
            name, _, rest = fault.partition(":")
            n, _, only = rest.partition(":")
            mine = int(n) if not only or int(only) == worker_id else 0
            if name.endswith("on_release"):
                self.die_on_release = mine
            else:
                self.die_on_call = mine
        gc.collect()  # the worker is built: what survives is frozen for the actor's life (``frozen_heap``)
        gc.freeze()

    def describe(self) -> dict[str, object]:
        return {**self.worker.describe(), "node": ray.get_runtime_context().get_node_id()}

    def gpu_memory(self) -> dict[str, int | None]:
        """The worker's CUDA memory cap and peaks so far (``ClientWorker.gpu_memory``; None on a CPU)."""
        return self.worker.gpu_memory()

    def _call(self) -> None:
        self.calls += 1
        if self.calls == self.die_on_call:
            os.kill(os.getpid(), signal.SIGKILL)

    def train(self, theta: np.ndarray, keys: int | list[int], client_ids: list[int],
              reduce: Reduction | None = None, summarized: bool = False) -> TrainResult:
        self._call()
        return self.worker.train(theta, keys, client_ids, reduce, summarized)

    @ray.method(num_returns=2)
    def train_rows(self, theta: np.ndarray, keys: int | list[int], client_ids: list[int]) -> tuple[TrainResult,
                                                                                                  np.ndarray]:
        """A submitted chunk whose vectors stay in this node's object store (their own reference): the driver fetches
        the per-client scalars (``summarize``), and a release picks the rows it sums (``release_rows``)."""
        self._call()
        res = self.worker.train(theta, keys, client_ids, summarized=True)
        return dataclasses.replace(res, vectors=np.empty((0, res.vectors.shape[1]), np.float32)), res.vectors

    @ray.method(num_returns=2)
    def train_kept(self, theta: np.ndarray, keys: int | list[int], client_ids: list[int],
                   reduce: Reduction) -> tuple[TrainResult, Partial]:
        """``train`` of a reduced chunk whose partial stays in this node's object store (its own reference): the
        driver fetches the per-client scalars, and the partials go to ``release`` (``system.combine``)."""
        self._call()
        res = self.worker.train(theta, keys, client_ids, reduce)
        return dataclasses.replace(res, partial=None), res.partial

    def release(self, release: Release, size: int, *partials: Partial) -> np.ndarray:
        """A release's float32 mean from its partials (Ray resolves their references here, from the object store):
        the only model-sized vector that reaches the driver. Counted apart by the fault injection (``on_release``)."""
        self._release()
        return release_mean(list(partials), release, size)

    def release_rows(self, selection: Selection, release: Release, size: int, *blocks: np.ndarray) -> np.ndarray:
        """The float32 mean of the kept rows ``selection`` picks from ``blocks`` (Ray resolves their references here,
        from the object store; FedBuff's buffer): the only model-sized vector that reaches the driver."""
        self._release()
        return selected_mean(list(blocks), selection, release, self.worker.spec.seed, size)

    def _release(self) -> None:
        self.releases += 1
        if self.releases == self.die_on_release:
            os.kill(os.getpid(), signal.SIGKILL)

    def prefetch(self, client_ids: list[int]) -> int:
        """Build the shards of the clients this actor trains next (queued behind its current call, so it runs
        while the driver aggregates); not counted as a call by the fault injection."""
        return self.worker.prefetch(client_ids)

    def evaluate(self, theta: np.ndarray, round_idx: int, client_ids: list[int]) -> EvalResult:
        self._call()
        return self.worker.evaluate(theta, round_idx, client_ids)


def start_call(actor: Any, method: Method, model_ref: Any, keys: int | list[int], client_ids: list[int],
               reduce: Reduction | None = None, keep: bool = False, summarized: bool = False) -> tuple[Any, Any]:
    """Start ``actor.train`` or ``actor.evaluate`` on a chunk; returns the references of its result and, when
    ``keep``, of its partial sum (``train_kept``) or of its vectors (``train_rows``: a submitted chunk), else None.
    ``reduce``: the chunk's share of a training call's ``Reduction`` (``Reduction.parts``; None: per-client vectors
    come back, with their scalars when ``summarized``)."""
    if method == "evaluate":
        return actor.evaluate.remote(model_ref, keys, client_ids), None
    if keep:
        result, kept = (actor.train_kept.remote(model_ref, keys, client_ids, reduce) if reduce is not None
                        else actor.train_rows.remote(model_ref, keys, client_ids))
        return result, kept
    return actor.train.remote(model_ref, keys, client_ids, reduce, summarized), None
