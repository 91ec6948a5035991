"""Combining a release where its pieces are: the partial sums (or FedBuff's kept rows) a ``RayPool`` left in the
object store become the release's float32 mean in one actor's call, so that the driver reads one vector.

``system.combine`` decides where: "actors" always, "driver" never, "auto" from ``COMBINE_MIN_VALUES`` values on
(the anchor MLP pays no extra call; the FEMNIST CNN combines in an actor). The actor that holds the first piece
combines (``ClientActor.release``, ``ClientActor.release_rows``: ``client.reduce``), reading the others from the
object store; the result has the same bits wherever it is computed. A combining actor that dies is replaced and
the combine runs again (``system.max_failures`` times); a piece lost with its node raises ``PartialLost``, and
the training that made it runs again (``rounds.retry``, with the same results).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import ray
from ray.exceptions import ObjectLostError

from actors.calls import FIX, LOST, KeptPartial, KeptRows, PartialLost, Slot, first_line
from actors.watchdog import Watchdog
from simulator.client.reduce import release_mean, selected_mean
from simulator.config.schema import SystemConfig
from simulator.contract import Release, Selection, WorkerFailure, WorkerSpec
from simulator.rounds.retry import first_line as cause_line

log = logging.getLogger("metafleet.pool")

#: ``system.combine = "auto"``: a model vector of at least this many values (a partial of 8 MiB) is combined in
#: an actor; below it the partials come to the driver (one call fewer a round)
COMBINE_MIN_VALUES = 1 << 20


class Combining:
    """The combining calls of ``actors.pool.RayPool``, which this is mixed into: they use its slots, watchdog,
    waiting and actor replacement."""

    spec: WorkerSpec
    system: SystemConfig
    _slots: list[Slot]
    _watchdog: Watchdog
    _stuck: dict[int, str]

    def _wait_s(self) -> float:
        raise NotImplementedError

    def _idle(self) -> None:
        raise NotImplementedError

    def _replace(self, slot: Slot, reason: str) -> None:
        raise NotImplementedError

    def combines_in_actors(self, size: int) -> bool:
        """Whether a reduced call's partials stay in the object store and an actor combines them
        (``system.combine``; "auto": models of at least ``COMBINE_MIN_VALUES`` values)."""
        mode = self.system.combine
        return mode == "actors" or (mode == "auto" and size >= COMBINE_MIN_VALUES)

    def release(self, partials: list[Any], release: Release, size: int) -> np.ndarray:
        """The release's float32 mean. Partials the driver holds are combined here; kept ones by one actor (the
        one whose chunk finished first, behind at most its prefetch), which reads them from the object store, so
        that the driver maps one float32 vector instead of an int64 partial per call (``_combine``)."""
        kept = [h for h in partials if isinstance(h, KeptPartial)]
        if not kept:
            return release_mean(partials, release, size)
        refs = [h.ref for h in kept] + [ray.put(h) for h in partials if not isinstance(h, KeptPartial)]
        return self._combine(kept[0].worker_id, lambda actor: actor.release.remote(release, size, *refs),
                             "a round's partials", "a partial sum was lost before it was combined ({}); the round's "
                             "training runs again")

    def release_rows(self, blocks: list[Any], selection: Selection, release: Release, size: int) -> np.ndarray:
        """The float32 mean of FedBuff's buffer from its kept rows: computed here when every block is held by the
        driver, else by the actor that holds the first kept block, which reads them from the object store
        (``_combine``)."""
        kept = [b for b in blocks if isinstance(b, KeptRows)]
        if not kept:
            return selected_mean(blocks, selection, release, self.spec.seed, size)
        args = [b.ref if isinstance(b, KeptRows) else b for b in blocks]
        return self._combine(kept[0].worker_id, lambda actor: actor.release_rows.remote(selection, release, size,
                                                                                        *args),
                             "a buffer's rows", "a buffered client's update was lost before the buffer was summed "
                             "({}); the buffer's clients train again")

    def _combine(self, worker_id: int, call: Callable[[Any], Any], what: str, lost: str) -> np.ndarray:
        """Run one combining ``call`` on actor ``worker_id`` (or the first one) and return its mean. A combining
        actor that dies is replaced and the combine runs again (``system.max_failures`` times); an object lost with
        its node re-runs the training that made it (``PartialLost`` with ``lost``, retried by ``rounds.retry``)."""
        slot = next((s for s in self._slots if s.worker_id == worker_id), self._slots[0])
        failures = 0
        while True:
            ref = call(slot.actor)
            self._watchdog.started(slot.actor, ref, 1)
            try:
                while not ray.wait([ref], timeout=self._wait_s(), fetch_local=False)[0]:
                    self._idle()
                value = ray.get(ref)
                self._watchdog.done(ref, timed=False)
                return value
            except ObjectLostError as exc:
                self._watchdog.done(ref, timed=False)
                raise PartialLost(lost.format(cause_line(exc))) from None
            except LOST as exc:
                self._watchdog.done(ref, timed=False)
                failures += 1
                reason = self._stuck.get(id(slot.actor)) or first_line(exc)
                if failures > self.system.max_failures:
                    raise WorkerFailure(f"actor {slot.worker_id} lost the combining of {what} {failures} times, "
                                        f"more than system.max_failures = {self.system.max_failures}; last Ray "
                                        f"error: {reason}; {FIX}") from None
                if slot in self._slots:
                    self._replace(slot, reason)
                if not self._slots:
                    raise WorkerFailure(f"every actor of the pool was lost (last Ray error: {reason}); {FIX}") from None
                slot = slot if slot in self._slots else self._slots[0]
                log.warning("re-running the combining of %s on actor %d", what, slot.worker_id)
