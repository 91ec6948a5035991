"""The Ray actor pool: client actors sized from the cluster's resources, one cohort chunk per call.

Each ``ClientActor`` reserves ``cpus_per_actor`` CPUs and ``gpus_per_actor`` of a GPU (a fraction lets several
actors share one GPU), wraps a ``ClientWorker`` that builds its clients' shards locally, and trains a whole chunk of
the cohort per call. The model travels once per round: the driver ``ray.put``s the flat parameter vector and every
call receives the same object reference (submitted cohorts: once per model version, however many train on it); a
small model (``model_inline``: at most 64 KiB, and 256 KiB over a dispatch's calls) travels inside each call
instead, where a put and the actors' fetches would cost more than its bytes. A reduced call carries its chunk's
share of the ``Reduction`` by value.
With ``system.combine`` "actors" (or "auto" and a large model) the calls' partial sums (FedBuff: the submitted
chunks' vectors) stay in the object store and one actor combines them into the release's mean (``release``,
``release_rows``), so the driver reads one float32 vector a round.

Failures. An actor that dies mid-call (its process killed, out of memory, its node removed) loses that call;
because every client's work is a pure function of (model version, client id, seed), the pool simply runs the same
(method, model ref, keys, client ids) again, on a replacement actor with the same worker id, and the run's metrics
are identical to a run without the fault. When the cluster no longer has room for a replacement (a node is gone),
the lost chunk goes to a surviving actor and the pool shrinks. Each dispatch (one ``train`` or ``evaluate`` call,
or one ``submit`` batch) tolerates ``system.max_failures`` lost calls; the next one raises ``WorkerFailure``. The
pool does this itself instead of Ray's ``max_restarts`` / ``max_task_retries``: those count per actor lifetime
rather than per round, hide failures from the run's logs, and a restart that no node can host waits forever.
Fault injection, for tests only: ``actors.actor.FAULT_ENV``, read in the driver when the pool starts.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, ObjectLostError

from actors.actor import FAULT_ENV, ClientActor, start_call
from actors.calls import (
    FIX,
    LOST,
    Batch,
    KeptPartial,
    KeptRows,
    Placed,
    RayPending,
    Slot,
    creation_error,
    first_line,
    model_inline,
)
from actors.cluster import actors_that_fit, check_gcs, connect, log_level, pool_size
from actors.combine import Combining
from actors.watchdog import Watchdog
from simulator.config.schema import ConfigError, SystemConfig
from simulator.contract import (
    Backend,
    EvalResult,
    Keys,
    Method,
    Reduction,
    TrainResult,
    WorkerFailure,
    WorkerSpec,
    split_cohort,
    split_work,
)

log = logging.getLogger("metafleet.pool")

#: seconds a replacement actor may take to start before the pool gives up on it and shrinks
REPLACE_TIMEOUT_S = 60.0
#: how often the driver checks that the cluster's GCS still answers (``cluster.check_gcs``)
HEALTH_S = 5.0
#: a submitted cohort smaller than this many clients per actor goes out in fewer calls (``RayPool._submitted_work``)
MIN_SUBMIT_CALL = 32


class RayPool(Combining, Backend):
    """A pool of ``ClientActor``s behind the backend contract; it replaces actors that die and runs their
    lost calls again (see the module docstring)."""

    def __init__(self, spec: WorkerSpec, system: SystemConfig, per_round: int) -> None:
        self.spec, self.system = spec, system
        self.replace_timeout_s = REPLACE_TIMEOUT_S
        self._fault = os.environ.get(FAULT_ENV, "")
        self._opts = {"num_cpus": system.cpus_per_actor, "num_gpus": system.gpus_per_actor, "max_restarts": 0}
        self._slots: list[Slot] = []
        self._next = 0  # round-robin over survivors for chunks whose actor could not be replaced
        self._watchdog = Watchdog(system.call_timeout_s)
        self._stuck: dict[int, str] = {}  # actors the watchdog killed -> why
        self._prefetching: list[Any] = []  # prefetch calls not yet seen done (their errors are dropped)
        self._placed: dict[int, Placed] = {}  # worker id -> the clients its actor was given (with prefetch on)
        self._submitted: tuple[np.ndarray, Any] | None = None  # the last submitted model and its object reference
        self._owns_ray = connect(system)
        self._gcs, self._checked, self._gcs_lost = ray.get_runtime_context().gcs_address, time.monotonic(), False
        actors: list[Any] = []
        try:
            res = ray.cluster_resources()
            n = pool_size(system, per_round, res.get("CPU", 0.0), res.get("GPU", 0.0))
            actors.extend(self._start(i, self._fault) for i in range(n))
            try:
                infos = ray.get([a.describe.remote() for a in actors])
            except LOST as exc:  # the worker raised while it built its data or model, or was killed (memory)
                raise ConfigError(f"the client actors could not start: {creation_error(exc)}; fix the config or "
                                  "the factory (every Ray node must be able to import it)") from None
        except BaseException:
            for a in actors:
                ray.kill(a)
            self.close()
            raise
        self._slots = [Slot(i, a, d) for i, (a, d) in enumerate(zip(actors, infos, strict=True))]
        for d in infos:
            log.info("actor %s: %s (%s), %s torch threads, pid %s on %s", d["worker_id"], d["device"],
                     d["device_name"], d["threads"], d["pid"], d["host"])

    @property
    def num_workers(self) -> int:
        return len(self._slots)

    @property
    def actors(self) -> list[Any]:
        """The live actor handles, in worker order."""
        return [s.actor for s in self._slots]

    def describe(self) -> list[dict[str, object]]:
        """Each live actor's device, pid, host and Ray node, and how often its slot was replaced."""
        return [{**s.info, "restarts": s.restarts} for s in self._slots]

    def _start(self, worker_id: int, fault: str = "") -> Any:
        return ClientActor.options(**self._opts).remote(self.spec, worker_id, log_level(), fault)

    def _dispatch(self, method: Method, theta: np.ndarray, keys: Keys, client_ids: np.ndarray,
                  reduce: Reduction | None = None, rows: str = "") -> list[RayPending]:
        """Dispatch the clients as one call per chunk; the model is put in the object store once (a small one
        travels inside the calls: ``model_inline``), and each chunk's share of a reduction travels inside its call.
        ``rows`` (a submitted chunk): "vectors" come back with their scalars, "held" come back and become the
        chunk's ``kept`` handle, "kept" stay in the object store."""
        if time.monotonic() - self._checked >= HEALTH_S:  # actors answer without a GCS, for 60 s: look first
            self._check_gcs()
        work = self._submitted_work(client_ids, keys) if rows else split_work(client_ids, keys, self.num_workers,
                                                                              self.system.clients_per_actor)
        batch = Batch(method, self._model_ref(theta, reuse=bool(rows), calls=len(work)))
        # a chunk's share of the reduction travels inside its call: a ray.put of its own cost more CPU than the
        # rest of the dispatch (benchmarks/README.md)
        parts = reduce.parts([ids for _, ids, _ in work]) if reduce is not None else [None] * len(work)
        keep = (reduce is not None and self.combines_in_actors(theta.size)) or rows == "kept"
        pending = []
        for (w, ids, k), part in zip(work, parts, strict=True):
            slot = self._slots[w]
            ref, partial_ref = start_call(slot.actor, method, batch.model_ref, k, ids, part, keep, bool(rows))
            if self.system.prefetch:  # only prefetch consults the picture
                self._placement(slot).add(slot.actor, ids)
            pending.append(RayPending(ids, ref, keys=k, reduce=part, keep=keep, rows=rows, partial_ref=partial_ref,
                                      slot=slot, actor=slot.actor, batch=batch))
            self._watchdog.started(slot.actor, ref, len(ids))
        return pending

    def _model_ref(self, theta: np.ndarray, reuse: bool, calls: int) -> Any:
        """The model as one dispatch's calls receive it: the array itself when it is small (``model_inline``: each
        call carries a copy), else an object reference: a new ``ray.put``, or (``reuse``: a submitted cohort) the
        last submitted one when ``theta`` is the same array object. The asynchronous server submits several cohorts
        on one model between two server updates (each its refills gathered until one of them is needed), and the
        contract says a submitted model is never changed; a put per cohort cost the driver and the raylet more than
        the rest of the dispatch (``benchmarks/README.md``, "Seventh pass"). The pool holds that one reference (and
        the array) until another model is dispatched or the pool closes."""
        if model_inline(theta.nbytes, calls):
            return theta
        if reuse and self._submitted is not None and self._submitted[0] is theta:
            return self._submitted[1]
        ref = ray.put(theta)
        self._submitted = (theta, ref) if reuse else None
        return ref

    def _submitted_work(self, client_ids: np.ndarray, keys: Keys) -> list[tuple[int, list[int], int | list[int]]]:
        """A submitted cohort's calls: as ``split_work`` when it fills every actor with ``MIN_SUBMIT_CALL`` clients,
        else fewer calls (at least one; more where ``system.clients_per_actor`` caps them), the idlest actors first
        (fewest clients outstanding). FedBuff submits about 20 clients at a time, and on the anchor workload two
        calls of 10 cost the actors and the raylet more than the second actor saves; a client's result does not
        depend on where it trains."""
        calls = min(self.num_workers, max(1, len(client_ids) // MIN_SUBMIT_CALL))
        if calls >= self.num_workers:
            return split_work(client_ids, keys, self.num_workers, self.system.clients_per_actor)
        idle = sorted(range(self.num_workers), key=lambda w: (self._watchdog.load(self._slots[w].actor), w))
        work = split_work(client_ids, keys, calls, self.system.clients_per_actor)
        return [(idle[i % len(idle)], ids, k) for i, (_, ids, k) in enumerate(work)]

    def prefetch(self, client_ids: np.ndarray) -> None:
        """Queue a ``prefetch`` behind each actor's current call, for the clients ``train`` will place on it (the
        same ``split_cohort``): it builds their shards while the driver aggregates the current round."""
        self._settle_prefetch()
        for w, ids in split_cohort(client_ids, self.num_workers, self.system.clients_per_actor):
            slot = self._slots[w]
            placed = self._placement(slot)
            if placed.holds(slot.actor, ids):  # nothing to build there: a call would only cost the actor and Ray
                continue
            self._prefetching.append(slot.actor.prefetch.remote(ids))
            placed.add(slot.actor, ids)

    def _placement(self, slot: Slot) -> Placed:
        placed = self._placed.get(slot.worker_id)
        if placed is None:
            placed = self._placed[slot.worker_id] = Placed(self.spec.shard_cache)
        return placed

    def _settle_prefetch(self) -> None:
        """Forget finished prefetches; one whose actor died raised, which only the next ``train`` call must see."""
        if not self._prefetching:
            return
        done, self._prefetching = ray.wait(self._prefetching, num_returns=len(self._prefetching), timeout=0)
        for ref in done:
            try:
                ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - a hint that failed costs nothing but its shards
                log.debug("a prefetch failed: %s", first_line(exc))

    def submit(self, theta: np.ndarray, keys: Keys, client_ids: np.ndarray, keep: bool = False) -> list[RayPending]:
        """Dispatch a submitted cohort; with ``keep`` its vectors stay in the object store when this pool combines
        in its actors (``combines_in_actors``), else they come to the driver and become the chunks' handles."""
        rows = ("kept" if self.combines_in_actors(theta.size) else "held") if keep else "vectors"
        return self._dispatch("train", theta, keys, client_ids, rows=rows)

    def result(self, pending: RayPending) -> TrainResult:
        """Block until this chunk is done (the others keep running), running it again if its actor
        died; its references (result, and the model once no chunk of its batch needs it) are released."""
        while pending.ref is not None:
            # wait on the actor's calls up to this one: seeing the earlier ones finish is its progress
            refs = self._watchdog.outstanding(pending.ref)
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self._wait_s(), fetch_local=False)
            for ref in ready:
                if ref != pending.ref:
                    self._watchdog.done(ref, timed=False)
            if pending.ref in ready:
                self._fetch(pending)
            else:
                self._idle()
        return pending.value

    def _completed(self, pending: list[RayPending]) -> Iterator[Any]:
        """Yield the dispatched chunks' results as they complete (``ray.wait``), re-running lost ones."""
        waiting = {p.ref: p for p in pending}
        while waiting:
            done, _ = ray.wait(list(waiting), num_returns=1, timeout=self._wait_s())
            if not done:
                self._idle()
                continue
            p = waiting.pop(done[0])
            if self._fetch(p):
                value, p.value = p.value, None  # held only by the caller: a partial sum is freed once added
                yield value
            else:
                waiting[p.ref] = p

    def train(self, theta: np.ndarray, keys: Keys, client_ids: np.ndarray,
              reduce: Reduction | None = None) -> Iterator[TrainResult]:
        """Dispatch every chunk at once; yield results as they complete."""
        return self._completed(self._dispatch("train", theta, keys, client_ids, reduce))

    def evaluate(self, theta: np.ndarray, round_idx: int, client_ids: np.ndarray) -> Iterator[EvalResult]:
        return self._completed(self._dispatch("evaluate", theta, round_idx, client_ids))

    def _fetch(self, p: RayPending) -> bool:
        """Get a chunk's result; if its call was lost, submit it again and return False."""
        try:
            p.value = ray.get(p.ref)
        except LOST as exc:
            self._watchdog.done(p.ref)
            self._recover(p, exc)
            return False
        self._watchdog.done(p.ref)
        if p.keep:
            assert p.slot is not None
            kept = (KeptPartial(p.partial_ref, p.slot.worker_id) if p.reduce is not None
                    else KeptRows(p.partial_ref, p.slot.worker_id))
            p.value = dataclasses.replace(p.value, **{"partial" if p.reduce is not None else "kept": kept})
        elif p.rows == "held":
            p.value = dataclasses.replace(p.value, vectors=p.value.vectors[:0], kept=p.value.vectors)
        p.ref = p.partial_ref = p.slot = p.actor = p.batch = None
        return True

    def _wait_s(self) -> float:
        """How long to wait for results before looking at the cluster: the nearest deadline, at most HEALTH_S."""
        wait = self._watchdog.wait_s()
        return HEALTH_S if wait is None else min(wait, HEALTH_S)

    def _check_gcs(self) -> None:
        self._checked = time.monotonic()
        try:
            check_gcs(self._gcs)
        except WorkerFailure:
            self._gcs_lost = True
            raise

    def _idle(self) -> None:
        """No result for a while: is the cluster still there (``cluster.check_gcs``)? Then the deadlines."""
        self._check_gcs()
        self._kill_overdue()

    def _finished_unseen(self, key: int) -> bool:
        """Mark the calls of actor ``key`` that finished unseen (the async mode waits on one actor) as done;
        True if there were any (the actor is making progress)."""
        refs = self._watchdog.calls(key)
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
        for ref in refs[:len(ready)]:  # an actor finishes its calls in order
            self._watchdog.done(ref, timed=False)
        return bool(ready)

    def _kill_overdue(self) -> None:
        """Kill every actor whose oldest call is past its deadline (``actors.watchdog``): its calls then fail
        as lost ones do, and are run again on its replacement. A call past half its time is reported first."""
        for key, ran, allowed in self._watchdog.late():  # said once, long before the deadline acts
            slot = self._slot_of(key)
            if slot is not None and not self._finished_unseen(key):
                log.warning("actor %d (pid %s on %s): its call has run %.0f s of the %.0f s it is allowed "
                            "(system.call_timeout_s); at the deadline it is killed and the call re-run",
                            slot.worker_id, slot.info.get("pid"), slot.info.get("host"), ran, allowed)
        for key, deadline in self._watchdog.overdue():
            slot = self._slot_of(key)
            if slot is None:  # an actor already replaced: its calls are being run again elsewhere
                self._watchdog.forget(key)
                continue
            if self._finished_unseen(key):
                continue
            why = f"a call ran past its {deadline:.0f} s deadline (system.call_timeout_s)"
            self._stuck[key] = why
            log.warning("actor %d (pid %s on %s): %s; killing it", slot.worker_id, slot.info.get("pid"),
                        slot.info.get("host"), why)
            self._watchdog.dropped(slot.actor)
            ray.kill(slot.actor, no_restart=True)

    def _slot_of(self, key: int) -> Slot | None:
        return next((s for s in self._slots if id(s.actor) == key), None)

    def _recover(self, p: RayPending, exc: BaseException) -> None:
        """Count the lost call against its batch, replace its actor (once per death), resubmit it."""
        batch, slot = p.batch, p.slot
        assert batch is not None and slot is not None
        batch.failures += 1
        reason = self._stuck.get(id(p.actor)) or first_line(exc)
        if batch.failures > self.system.max_failures:
            raise WorkerFailure(
                f"actor {slot.worker_id} (pid {slot.info.get('pid')} on {slot.info.get('host')}) lost its "
                f"'{batch.method}' call of {len(p.client_ids)} clients; {batch.failures} calls were lost in this "
                f"round, more than system.max_failures = {self.system.max_failures}; last Ray error: {reason}; "
                f"{FIX}")
        if slot.actor is p.actor and slot in self._slots and not isinstance(exc, ObjectLostError):
            self._replace(slot, reason)
        if slot not in self._slots:  # no room for a replacement: a survivor runs the chunk
            if not self._slots:
                raise WorkerFailure(f"every actor of the pool was lost and the cluster has no room for a new one "
                                    f"(last Ray error: {reason}); {FIX}")
            slot, self._next = self._slots[self._next % len(self._slots)], self._next + 1
        log.warning("resubmitting %d clients of a lost '%s' call to actor %d (lost call %d of the %d tolerated "
                    "per round)", len(p.client_ids), batch.method, slot.worker_id, batch.failures,
                    self.system.max_failures)
        p.slot, p.actor = slot, slot.actor
        p.ref, p.partial_ref = start_call(slot.actor, batch.method, batch.model_ref, p.keys, p.client_ids, p.reduce,
                                          p.keep, bool(p.rows))
        self._watchdog.started(slot.actor, p.ref, len(p.client_ids))

    def _replace(self, slot: Slot, reason: str) -> None:
        """Start a new actor with the slot's worker id, or drop the slot when the cluster lost the room."""
        old_pid = slot.info.get("pid")
        self._watchdog.dropped(slot.actor)
        ray.kill(slot.actor, no_restart=True)  # usually dead already; never leave a half-alive one behind
        res = ray.cluster_resources()
        cpus, gpus = res.get("CPU", 0.0), res.get("GPU", 0.0)
        if actors_that_fit(self.system, cpus, gpus) < len(self._slots):
            self._drop(slot, f"{reason}; the cluster now holds {cpus:g} CPU, {gpus:g} GPU")
            return
        actor = self._start(slot.worker_id, "" if self._fault.startswith("die_once") else self._fault)
        try:
            info = ray.get(actor.describe.remote(), timeout=self.replace_timeout_s)
        except (GetTimeoutError, *LOST) as exc:
            ray.kill(actor)
            self._drop(slot, f"{reason}; its replacement did not start ({first_line(exc)})")
            return
        slot.actor, slot.info, slot.restarts = actor, info, slot.restarts + 1
        log.warning("actor %d (pid %s) died (%s); replaced by pid %s on %s", slot.worker_id, old_pid, reason,
                    info.get("pid"), info.get("host"))

    def _drop(self, slot: Slot, reason: str) -> None:
        self._slots.remove(slot)
        log.warning("actor %d (pid %s) died (%s); not replaced, continuing with %d actor(s)", slot.worker_id,
                    slot.info.get("pid"), reason, len(self._slots))

    def close(self) -> None:
        if not self._gcs_lost:  # without a GCS, ray.wait and ray.kill would wait; the actors die with their raylet
            self._settle_prefetch()
            for slot in self._slots:
                ray.kill(slot.actor)
        self._prefetching, self._submitted = [], None
        self._slots = []
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
