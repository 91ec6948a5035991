"""Pool sizing from cluster resources (pure function; no Ray needed)."""

from __future__ import annotations

import pytest

from actors.calls import Placed
from actors.cluster import pool_size
from actors.watchdog import Watchdog
from simulator.config.schema import ConfigError, SystemConfig


def sys(**kw) -> SystemConfig:
    return SystemConfig(**kw)


@pytest.mark.parametrize(("kw", "per_round", "cpus", "gpus", "expected"), [
    ({}, 100, 2, 0, 2),                                        # one actor per CPU
    ({"cpus_per_actor": 0.5}, 100, 2, 0, 4),                   # fractional CPUs
    ({}, 1, 8, 0, 1),                                          # never more actors than clients per round
    ({"clients_per_actor": 50}, 100, 16, 0, 2),                # one actor per 50 clients
    ({"clients_per_actor": 1, "cpus_per_actor": 0.1}, 10, 2, 0, 10),  # one actor per client
    ({"gpus_per_actor": 0.25}, 100, 16, 1, 4),                 # 4 actors share one GPU
    ({"gpus_per_actor": 0.5}, 100, 16, 2, 4),
    ({"gpus_per_actor": 0.25}, 100, 2, 1, 2),                  # CPUs are the tighter limit
    ({"actors": 3}, 100, 4, 0, 3),                             # explicit count
])
def test_pool_size(kw, per_round, cpus, gpus, expected):
    assert pool_size(sys(**kw), per_round, cpus, gpus) == expected


@pytest.mark.parametrize(("kw", "cpus", "gpus", "key"), [
    ({"gpus_per_actor": 0.5}, 4, 0, "gpus_per_actor"),
    ({"actors": 5}, 2, 0, "system.actors"),
    ({"cpus_per_actor": 4.0}, 2, 0, "cpus_per_actor"),
])
def test_pool_size_rejects_what_does_not_fit(kw, cpus, gpus, key):
    with pytest.raises(ConfigError, match=key):
        pool_size(sys(**kw), 10, cpus, gpus)


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_watchdog_deadlines_in_exact_numbers():
    clock, a, b = _Clock(), object(), object()
    dog = Watchdog(10.0, clock)
    assert dog.wait_s() is None and dog.overdue() == []
    dog.started(a, "a1", 4)
    dog.started(a, "a2", 4)  # queued behind a1: its clock starts when a1 is seen done
    clock.now = 104.0
    dog.started(b, "b1", 2)
    assert dog.wait_s() == 6.0 and dog.outstanding("a2") == ["a1", "a2"] and dog.outstanding("a1") == ["a1"]
    clock.now = 108.0
    dog.done("a1")  # 8 s for 4 clients: 2 s per client, so a 4-client call may take SLACK x 8 = 160 s
    assert dog.per_client == 2.0 and dog.calls(id(a)) == ["a2"]
    assert dog.wait_s() == pytest.approx(104.0 + 20.0 * 2.0 * 2 - 108.0)  # b1's deadline is now the nearest
    clock.now = 104.0 + 80.0 + 0.5
    assert dog.overdue() == [(id(b), 80.0)]
    dog.dropped(b)
    assert dog.overdue() == [] and dog.outstanding("b1") == ["b1"]
    dog.done("a2", timed=False)  # seen late: no speed is measured from it
    assert dog.per_client == 2.0 and dog.wait_s() is None
    assert Watchdog(0.0, clock).wait_s() is None  # call_timeout_s = 0: no deadlines


def test_a_late_call_is_reported_once_before_its_deadline():
    clock, a = _Clock(), object()
    dog = Watchdog(10.0, clock)
    dog.started(a, "a1", 4)
    clock.now = 105.0  # exactly half of the 10 s it is allowed: not yet late
    assert dog.late() == []
    clock.now = 105.5
    assert dog.late() == [(id(a), 5.5, 10.0)] and dog.late() == []  # once
    dog.done("a1")
    dog.started(a, "a2", 4)  # a new call is watched afresh: 5.5 s for 4 clients, so 20 x 1.375 x 4 = 110 s
    clock.now = 105.5 + 55.5
    assert dog.late() == [(id(a), 55.5, 110.0)]
    assert Watchdog(0.0, clock).late() == []


def test_the_drivers_picture_of_a_shard_cache():
    """``Placed``: the clients an actor was given, least recent out first past the cache's count, and nothing for a
    replacement actor (it starts with an empty cache)."""
    first, second = object(), object()
    placed = Placed(capacity=3)
    assert not placed.holds(first, [1])
    placed.add(first, [1, 2, 3])
    assert placed.holds(first, [3, 1]) and placed.holds(first, [])
    placed.add(first, [1, 4])  # 1 touched, 4 in: 2 (least recent) out
    assert placed.holds(first, [1, 3, 4]) and not placed.holds(first, [2])
    assert not placed.holds(second, [1])  # another actor in the slot
    placed.add(second, [7])
    assert placed.holds(second, [7]) and not placed.holds(second, [1]) and not placed.holds(first, [7])
