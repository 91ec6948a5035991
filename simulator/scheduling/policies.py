"""Round policies in simulated time: which sampled clients count, and when a round ends.

``plan_round`` is the whole decision of a synchronous-style round, made at dispatch from
numbers known then (every client's simulated duration follows from its device profile and the
samples its update will process), so a client whose update will be discarded is never trained:

- ``sync``: wait for every online client that does not drop out (the straggler baseline);
  the round lasts until the slowest finishes (or drops out).
- ``deadline``: the round ends at ``start + deadline_s`` (earlier if everyone is done); updates
  that would arrive later are discarded and counted (FedScale's deadline rounds, Lai et al. 2022).
- ``overselect``: ceil(overselect x per_round) clients are sampled and the first ``per_round`` to
  finish, in simulated time (ties: lower client id), are kept; the round ends with the last kept
  one (Bonawitz et al. 2019, "Towards Federated Learning at Scale", Sec. 2.2).

Asynchronous mode (``simulator.rounds.asynchronous``) uses ``EventQueue``: completions ordered by
(simulated finish time, client id, dispatch number), never by the order Ray returns them.
"""

from __future__ import annotations

import heapq
from collections.abc import KeysView
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from simulator.config.schema import overselect_cohort

#: why a sampled client's update did not count, in the order of the rounds-table columns
DROP_REASONS = ("offline", "dropout", "deadline", "overselect", "staleness", "nonfinite")


def cohort_size(mode: str, per_round: int, overselect: float) -> int:
    """Clients sampled per round: ceil(overselect x per_round) in overselect mode, else per_round."""
    return overselect_cohort(per_round, overselect) if mode == "overselect" else per_round


@dataclass(frozen=True)
class RoundPlan:
    """Per sampled client: its simulated finish (drop-out time for drop-outs, the round start for
    offline clients) and why it was dropped ("" = kept); and the round's end time."""

    finish: np.ndarray
    reason: np.ndarray
    end: float

    @property
    def kept(self) -> np.ndarray:
        return self.reason == ""


def plan_round(mode: str, start: float, client_ids: np.ndarray, durations: np.ndarray, online: np.ndarray,
               dropout_fraction: np.ndarray, per_round: int, deadline_s: float = 0.0) -> RoundPlan:
    """Decide a round of ``mode`` ("sync" | "deadline" | "overselect") started at ``start``."""
    ids = np.asarray(client_ids, np.int64)
    dur = np.asarray(durations, np.float64)
    online = np.asarray(online, bool)
    drops = ~np.isnan(dropout_fraction) & online
    finish = np.where(online, start + np.where(drops, np.nan_to_num(dropout_fraction) * dur, dur), start)
    reason = np.full(ids.size, "", dtype=object)
    reason[~online] = "offline"
    reason[drops] = "dropout"
    active = online  # clients the server hears from or waits for
    last = float(finish[active].max()) if active.any() else start
    end = last
    if mode == "deadline":
        cut = start + deadline_s
        reason[(reason == "") & (finish > cut)] = "deadline"
        end = min(cut, last)
    elif mode == "overselect":
        candidates = np.flatnonzero(reason == "")
        order = candidates[np.lexsort((ids[candidates], finish[candidates]))]
        reason[order[per_round:]] = "overselect"
        if order.size >= per_round:
            end = float(finish[order[per_round - 1]])
    elif mode != "sync":
        raise ValueError(f"plan_round handles sync, deadline and overselect, not {mode!r}")
    return RoundPlan(finish, reason, end)


def drop_counts(reasons: np.ndarray | list[str]) -> dict[str, int]:
    """``{"dropped_offline": n, ...}`` for every reason in ``DROP_REASONS``."""
    r = np.asarray(reasons, dtype=object)
    return {f"dropped_{name}": int(np.sum(r == name)) for name in DROP_REASONS}


@dataclass(frozen=True)
class VirtualClock:
    """Simulated time in seconds; it only moves forward, and never sleeps."""

    now: float = 0.0

    def advance_to(self, t: float) -> VirtualClock:
        if t < self.now:
            raise ValueError(f"simulated time cannot go back from {self.now} to {t}")
        return VirtualClock(t)


@dataclass(order=True)
class Event:
    """An in-flight client's completion (or drop-out), ordered by (time, client id, dispatch number)."""

    time: float
    client_id: int
    seq: int
    info: Any = field(compare=False, default=None)


class EventQueue:
    """Completions of in-flight clients in simulated-time order; ties broken by client id."""

    def __init__(self) -> None:
        self._heap: list[Event] = []
        self._ids: dict[int, int] = {}  # client id -> its events in the queue

    def push(self, event: Event) -> None:
        heapq.heappush(self._heap, event)
        self._ids[event.client_id] = self._ids.get(event.client_id, 0) + 1

    def pop(self) -> Event:
        event = heapq.heappop(self._heap)
        left = self._ids[event.client_id] - 1
        if left:
            self._ids[event.client_id] = left
        else:
            del self._ids[event.client_id]
        return event

    def peek_time(self) -> float | None:
        return self._heap[0].time if self._heap else None

    def __len__(self) -> int:
        return len(self._heap)

    def client_ids(self) -> KeysView[int]:
        """The ids of the queued clients: a live view, kept as events come and go (no pass over the queue)."""
        return self._ids.keys()

    def events(self) -> list[Event]:
        """The queued events (in heap order: push them again to rebuild the queue)."""
        return list(self._heap)
