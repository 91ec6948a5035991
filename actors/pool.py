"""The Ray actor pool: client actors sized from the cluster's resources, one cohort chunk per call.

Each ``ClientActor`` reserves ``cpus_per_actor`` CPUs and ``gpus_per_actor`` of a GPU (a
fraction lets several actors share one GPU), wraps a ``ClientWorker`` that builds its
clients' shards locally, and trains a whole chunk of the cohort per call. The model travels
once per round: the driver ``ray.put``s the flat parameter vector and every call receives the
same object reference.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray

from simulator.config import ConfigError, SystemConfig
from simulator.scheduling import split_work
from simulator.worker import ClientWorker, EvalResult, TrainResult, WorkerSpec

log = logging.getLogger("metafleet.pool")


@dataclass
class RayPending:
    """A submitted chunk: its clients and the object reference of its result (None once fetched)."""

    client_ids: list[int]
    ref: Any
    value: Any = field(default=None)


@ray.remote
class ClientActor:
    """A Ray actor serving many clients: ``train`` and ``evaluate`` take a list of client ids."""

    def __init__(self, spec: WorkerSpec, worker_id: int, log_level: int = logging.WARNING) -> None:
        logging.basicConfig(level=log_level, format="%(name)s: %(message)s")
        self.worker = ClientWorker(spec, worker_id)

    def describe(self) -> dict[str, object]:
        return self.worker.describe()

    def train(self, theta: np.ndarray, keys: int | list[int], client_ids: list[int]) -> TrainResult:
        return self.worker.train(theta, keys, client_ids)

    def evaluate(self, theta: np.ndarray, round_idx: int, client_ids: list[int]) -> EvalResult:
        return self.worker.evaluate(theta, round_idx, client_ids)


def _level() -> int:
    return logging.getLogger("metafleet").getEffectiveLevel()


def connect(system: SystemConfig) -> bool:
    """Start a local Ray (address "") or join a cluster; returns True if this call started it."""
    _probe(system.address)
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray's own messages follow metafleet's verbosity (`metafleet run -v` shows them)
    ray_level = _level() if _level() <= logging.INFO else logging.ERROR
    kwargs: dict[str, object] = {"include_dashboard": False, "logging_level": ray_level, "configure_logging": True}
    if system.address:
        kwargs["address"] = system.address
        if system.ship_code:
            import actors
            import simulator

            kwargs["runtime_env"] = {"py_modules": [simulator, actors]}
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"system.address = {system.address!r}: cannot connect to a Ray cluster ({exc}); "
                          "start one with `ray start --head`, or use --address '' for a local Ray") from None
    return True


def _probe(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast on an unreachable HOST:PORT (``ray.init`` would retry it forever)."""
    if not address or address == "auto" or address.startswith("ray://") or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as exc:
        raise ConfigError(f"system.address = {address!r}: nothing answers there ({exc}); start the cluster "
                          "with `ray start --head`, fix --address, or use --address '' for a local Ray") from None


def pool_size(system: SystemConfig, per_round: int, cpus: float, gpus: float) -> int:
    """Actors to start: ``system.actors`` if set, else as many as the resources hold, no more than
    one per ``clients_per_actor`` clients of a round (and never more than the round's clients)."""
    if system.gpus_per_actor > 0 and gpus <= 0:
        raise ConfigError(f"system.gpus_per_actor = {system.gpus_per_actor} but the Ray cluster has no GPU; "
                          "set system.gpus_per_actor = 0")
    fit = math.floor(cpus / system.cpus_per_actor + 1e-9)
    if system.gpus_per_actor > 0:
        fit = min(fit, math.floor(gpus / system.gpus_per_actor + 1e-9))
    if system.actors:
        if system.actors > fit:
            raise ConfigError(
                f"system.actors = {system.actors} actors of {system.cpus_per_actor} CPU / "
                f"{system.gpus_per_actor} GPU do not fit the cluster ({cpus:g} CPU, {gpus:g} GPU); "
                "lower system.actors or system.cpus_per_actor (fractions such as 0.5 are allowed)")
        return system.actors
    if fit < 1:
        raise ConfigError(f"not one actor of {system.cpus_per_actor} CPU / {system.gpus_per_actor} GPU fits the "
                          f"cluster ({cpus:g} CPU, {gpus:g} GPU); lower system.cpus_per_actor")
    if system.clients_per_actor > 0:
        fit = min(fit, -(-per_round // system.clients_per_actor))
    return max(1, min(fit, per_round))


class RayPool:
    """A fixed pool of ``ClientActor``s with the backend interface the driver uses."""

    def __init__(self, spec: WorkerSpec, system: SystemConfig, per_round: int) -> None:
        self.system = system
        self._owns_ray = connect(system)
        try:
            res = ray.cluster_resources()
            n = pool_size(system, per_round, res.get("CPU", 0.0), res.get("GPU", 0.0))
            opts = {"num_cpus": system.cpus_per_actor, "num_gpus": system.gpus_per_actor}
            self.actors = [ClientActor.options(**opts).remote(spec, i, _level()) for i in range(n)]
            self._describe = ray.get([a.describe.remote() for a in self.actors])
        except BaseException:
            self.close()
            raise
        self.num_workers = n
        for d in self._describe:
            log.info("actor %s: %s (%s), %s torch threads, pid %s on %s", d["worker_id"], d["device"],
                     d["device_name"], d["threads"], d["pid"], d["host"])

    def describe(self) -> list[dict[str, object]]:
        return list(self._describe)

    def submit(self, method: str, theta: np.ndarray, keys: int | np.ndarray,
               client_ids: np.ndarray) -> list[RayPending]:
        """Dispatch the clients as one call per chunk; the model is put in the object store once."""
        model_ref = ray.put(theta)
        pending = [RayPending(ids, getattr(self.actors[w], method).remote(model_ref, k, ids))
                   for w, ids, k in split_work(client_ids, keys, self.num_workers, self.system.clients_per_actor)]
        del model_ref  # the pending calls hold it; it is freed when the last one finishes
        return pending

    def result(self, pending: RayPending) -> TrainResult | EvalResult:
        """Block until this chunk is done (the others keep running); its reference is then released."""
        if pending.ref is not None:
            pending.value, pending.ref = ray.get(pending.ref), None
        return pending.value

    def map(self, method: str, theta: np.ndarray, keys: int | np.ndarray,
            client_ids: np.ndarray) -> Iterator[TrainResult | EvalResult]:
        """Dispatch every chunk at once; yield results as they complete (``ray.wait``)."""
        pending = {p.ref: p for p in self.submit(method, theta, keys, client_ids)}
        refs = list(pending)
        while refs:
            done, refs = ray.wait(refs, num_returns=1)
            yield self.result(pending.pop(done[0]))

    def close(self) -> None:
        for actor in getattr(self, "actors", []):
            ray.kill(actor)
        self.actors = []
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
