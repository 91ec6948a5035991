"""Deadlines on the client actors' calls, so that a stuck process can never hang a run.

A Ray actor runs its calls one after another. For each actor the watchdog keeps its outstanding calls in
submission order and the moment its oldest one started, which is when the actor was last seen to make
progress: when the call was submitted to an idle actor, or when the call before it was seen done. The
oldest call's deadline is that moment plus

    max(system.call_timeout_s, SLACK x (slowest seconds per client seen so far) x clients in the call)

so a generous fixed bound covers the first calls (they also build shards and warm up), and a call of many
clients on a slow model is never cut short once its speed has been measured. A call past its deadline is
treated like one whose actor died (``actors.pool``): the actor is killed and replaced and the call runs
again, counted against ``system.max_failures``. An actor stopped with SIGSTOP, a forward pass that never
returns, or a deadlocked data loader all end this way. ``call_timeout_s = 0`` turns deadlines off.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

#: a call may take this many times the slowest per-client speed seen so far before it counts as stuck
SLACK = 20.0
#: a call that has run this fraction of its allowed time is reported as late (once), before it is overdue
LATE = 0.5


@dataclass
class _Actor:
    calls: deque[tuple[Any, int]] = field(default_factory=deque)  # (result reference, clients), oldest first
    since: float = 0.0  # when its oldest outstanding call started


class Watchdog:
    """Which calls are overdue; the pool tells it when calls start, finish or are dropped (see the module
    docstring). Actors are keyed by their handle's identity, calls by their result reference."""

    def __init__(self, timeout_s: float, clock: Any = time.monotonic) -> None:
        self.timeout_s, self.clock = timeout_s, clock
        self.per_client = 0.0  # slowest seconds per client of any call seen done
        self._actors: dict[int, _Actor] = {}
        self._owner: dict[Any, int] = {}  # call reference -> its actor's key
        self._reported: set[int] = set()  # ids of the calls already reported late

    def started(self, actor: Any, ref: Any, clients: int) -> None:
        state = self._actors.setdefault(id(actor), _Actor())
        if not state.calls:
            state.since = self.clock()
        state.calls.append((ref, max(1, clients)))
        self._owner[ref] = id(actor)

    def done(self, ref: Any, timed: bool = True) -> None:
        """A call finished (its result is ready, an error included); the actor's next call starts now.
        ``timed``: it was seen as soon as it finished, so its duration measures the clients' speed."""
        key = self._owner.pop(ref, None)
        if key is None:
            return
        state, now = self._actors[key], self.clock()
        if state.calls and state.calls[0][0] is ref:
            clients = state.calls.popleft()[1]
            if timed:
                self.per_client = max(self.per_client, (now - state.since) / clients)
            state.since = now
        else:  # finished out of order (its actor was replaced, or it was resubmitted): no timing from it
            state.calls = deque(c for c in state.calls if c[0] is not ref)

    def dropped(self, actor: Any) -> None:
        """Forget an actor (killed or replaced): its calls are resubmitted elsewhere, as new calls."""
        self.forget(id(actor))

    def forget(self, key: int) -> None:
        """``dropped`` by the actor's key."""
        state = self._actors.pop(key, None)
        for ref, _ in state.calls if state else ():
            self._owner.pop(ref, None)

    def calls(self, key: int) -> list[Any]:
        """The outstanding calls of the actor ``key``, oldest first."""
        state = self._actors.get(key)
        return [r for r, _ in state.calls] if state else []

    def load(self, actor: Any) -> int:
        """Clients in the actor's calls not yet seen done."""
        state = self._actors.get(id(actor))
        return sum(clients for _, clients in state.calls) if state else 0

    def outstanding(self, ref: Any) -> list[Any]:
        """The calls of ``ref``'s actor up to and including ``ref``, in order (ref alone if unknown)."""
        state = self._actors.get(self._owner.get(ref, -1))
        if state is None:
            return [ref]
        refs = [r for r, _ in state.calls]
        return refs[:refs.index(ref) + 1] if ref in refs else [ref]

    def _deadline(self, state: _Actor) -> float:
        return state.since + max(self.timeout_s, SLACK * self.per_client * state.calls[0][1])

    def wait_s(self) -> float | None:
        """Seconds until the nearest deadline (None: no deadline, wait as long as it takes)."""
        if self.timeout_s <= 0:
            return None
        deadlines = [self._deadline(s) for s in self._actors.values() if s.calls]
        return max(0.0, min(deadlines) - self.clock()) if deadlines else None

    def overdue(self) -> list[tuple[int, float]]:
        """(actor key, the deadline it missed) of every actor whose oldest call is past its deadline."""
        if self.timeout_s <= 0:
            return []
        now = self.clock()
        return [(key, self._deadline(s) - s.since) for key, s in self._actors.items()
                if s.calls and now > self._deadline(s)]

    def late(self) -> list[tuple[int, float, float]]:
        """(actor key, seconds its oldest call has run, the seconds it is allowed) of every oldest call past
        ``LATE`` of its allowed time, each reported once: the warning before the watchdog acts."""
        if self.timeout_s <= 0:
            return []
        now, out = self.clock(), []
        for key, s in self._actors.items():
            if not s.calls or id(s.calls[0][0]) in self._reported:
                continue
            allowed = self._deadline(s) - s.since
            if now - s.since > LATE * allowed:
                self._reported.add(id(s.calls[0][0]))
                out.append((key, now - s.since, allowed))
        return out
