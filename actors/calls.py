"""A pool's calls: what ``actors.pool`` keeps about each one in flight (its ``Slot``, ``Batch`` and ``RayPending``; a
partial or a chunk's vectors left in the object store, ``KeptPartial`` and ``KeptRows``), how the model travels with
them (``model_inline``), and how a lost one is told:
the Ray errors after which it runs again (``LOST``), the first lines of Ray's errors, and the fix a
``WorkerFailure`` names (``FIX``).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ray.exceptions import (
    NodeDiedError,
    ObjectLostError,
    OutOfMemoryError,
    RayActorError,
    WorkerCrashedError,
)

from simulator.contract import Method, Reduction
from simulator.rounds.retry import ANSI

#: Ray errors after which a call is run again: its actor or node died, or its result was lost
LOST = (RayActorError, WorkerCrashedError, OutOfMemoryError, NodeDiedError, ObjectLostError)


class PartialLost(RuntimeError):
    """A partial kept in the object store was lost with its node before it was combined: the round's training
    runs again (``rounds.retry``), its results the same."""


@dataclass(frozen=True)
class KeptPartial:
    """A chunk's partial sum left in the object store (``ClientActor.train_kept``): its reference, and the worker
    whose node holds it."""

    ref: Any
    worker_id: int


@dataclass(frozen=True, eq=False)
class KeptRows:
    """A submitted chunk's k x P vectors left in the object store (``ClientActor.train_rows``): its reference, and
    the worker whose node holds it. Freed once the driver drops the last handle (every client of the chunk counted
    or rejected)."""

    ref: Any
    worker_id: int


@dataclass(eq=False)
class Slot:
    """One place in the pool: its worker id, its current actor and what that actor said about itself."""

    worker_id: int
    actor: Any
    info: dict[str, object]
    restarts: int = 0


class Placed:
    """The driver's picture of one actor's shard cache: the clients it was given (to train, evaluate or prefetch)
    since it started, least recent first, at most ``capacity`` (the worker's ``shard_cache``). A ``prefetch`` whose
    clients are all in it would build nothing and is not sent. Where a worker's MiB bound (``shard_cache_mb``) evicts
    first, the picture holds clients the actor no longer has: their shards are then built in their call, as without
    prefetch (shards are pure functions of the client, so no result changes)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._actor: Any = None
        self._ids: OrderedDict[int, None] = OrderedDict()

    def add(self, actor: Any, client_ids: Iterable[int]) -> None:
        if actor is not self._actor:  # a replacement starts empty
            self._actor, self._ids = actor, OrderedDict()
        for c in map(int, client_ids):
            self._ids[c] = None
            self._ids.move_to_end(c)
        while len(self._ids) > self.capacity:
            self._ids.popitem(last=False)

    def holds(self, actor: Any, client_ids: Iterable[int]) -> bool:
        """Whether ``actor`` was given every one of these clients and, as far as the count bound says, keeps them."""
        return actor is self._actor and all(int(c) in self._ids for c in client_ids)


#: a model of at most this many bytes travels inside each call's arguments (Ray sends an argument under its 100 KiB
#: ``max_direct_call_object_size`` with the task itself), while one dispatch's calls carry at most
#: ``MODEL_INLINE_TOTAL`` bytes of it together; a larger model, or one going to more calls, is one ``ray.put``
MODEL_INLINE_BYTES = 64 * 1024
MODEL_INLINE_TOTAL = 256 * 1024


def model_inline(nbytes: int, calls: int) -> bool:
    """Whether a model of ``nbytes`` dispatched in ``calls`` calls travels inside them rather than as an object-store
    reference: a ``ray.put``, each actor's fetch from the store and the raylet's part in both cost more than sending
    a small model a few times (the raylet's CPU per anchor round fell from 2.1 to 0.1 ms: ``benchmarks/README.md``,
    "Twelfth pass")."""
    return nbytes <= MODEL_INLINE_BYTES and nbytes * calls <= MODEL_INLINE_TOTAL


@dataclass(eq=False)
class Batch:
    """One dispatch (a ``train``/``evaluate`` call or a ``submit`` batch): what a lost call needs to run
    again, and how many calls it has lost. Its model reference is released with the last chunk fetched."""

    method: Method
    model_ref: Any
    failures: int = 0


@dataclass
class RayPending:
    """A submitted chunk: its clients and keys, the object reference of its result (None once
    fetched), and the slot, actor and batch needed to submit it again if its actor dies."""

    client_ids: list[int]
    ref: Any
    value: Any = field(default=None)
    keys: int | list[int] = 0
    reduce: Reduction | None = field(default=None, repr=False)  # its share of a reduced call, sent by value
    keep: bool = False  # its partial (or vectors) stays in the object store (``KeptPartial``, ``KeptRows``)
    rows: str = ""  # a submitted chunk: "vectors", "held" (they become its handle) or "kept" (``RayPool._dispatch``)
    partial_ref: Any = field(default=None, repr=False)
    slot: Slot | None = field(default=None, repr=False)
    actor: Any = field(default=None, repr=False)
    batch: Batch | None = field(default=None, repr=False)


def first_line(exc: BaseException) -> str:
    """``ErrorType: first line`` of a Ray error, plus the line that says why an actor died."""
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    text = f"{type(exc).__name__}: {lines[0].strip() if lines else ''}"
    why = next((ln.strip() for ln in lines[1:] if not ln.startswith((" ", "\t"))), "")  # after the attributes
    return f"{text} {why.split('. ')[0].rstrip('.')}." if why else text


def creation_error(exc: BaseException) -> str:
    """The error an actor's constructor raised, as ``ErrorType: message``, out of Ray's remote traceback."""
    lines = [ANSI.sub("", ln).rstrip() for ln in str(exc).splitlines()]
    raised = [ln for ln in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b", ln)]
    if not raised:
        return first_line(exc)
    kind, _, message = raised[-1].partition(":")
    return f"{kind.rsplit('.', 1)[-1]}:{message}"


FIX = ("check memory and node health (`ray status`, the Ray logs), raise system.max_failures, "
       "and resume with `metafleet run --resume RUN_DIR`")
