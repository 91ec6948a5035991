"""Round policies in simulated time, the virtual clock, the event queue and exclusion sampling."""

from __future__ import annotations

import numpy as np
import pytest

from simulator.contract import split_work
from simulator.rng import generator
from simulator.scheduling import (
    DROP_REASONS,
    Event,
    EventQueue,
    SampleStreams,
    VirtualClock,
    cohort_size,
    drop_counts,
    plan_round,
    sample_clients,
    sample_cohort,
)
from simulator.scheduling.sampling import STREAMS_AHEAD

NAN = np.nan


def plan(mode, durations, online=None, dropout=None, ids=None, start=0.0, per_round=0, deadline_s=0.0):
    n = len(durations)
    return plan_round(mode, start, np.array(ids if ids is not None else range(n)), np.array(durations, float),
                      np.array(online if online is not None else [True] * n),
                      np.array(dropout if dropout is not None else [NAN] * n), per_round, deadline_s)


# ---------------------------------------------------------------- sync


def test_sync_round_by_hand():
    p = plan("sync", start=10.0, durations=[4.0, 2.0, 100.0, 10.0, 3.0], online=[True, True, False, True, True],
             dropout=[NAN, NAN, 0.1, 0.5, NAN])
    # 0: 10 + 4; 1: 10 + 2; 2: offline -> start (its dropout draw is ignored); 3: drops at 10 + 0.5 * 10; 4: 10 + 3
    assert p.finish.tolist() == [14.0, 12.0, 10.0, 15.0, 13.0]
    assert p.reason.tolist() == ["", "", "offline", "dropout", ""]
    assert p.kept.tolist() == [True, True, False, False, True]
    # the server waits until the drop-out is noticed (15), not for the offline client's 100 s
    assert p.end == 15.0


def test_sync_end_is_the_slowest_completer():
    p = plan("sync", start=2.0, durations=[1.0, 6.0, 3.0], dropout=[0.5, NAN, NAN])
    assert p.finish.tolist() == [2.5, 8.0, 5.0]
    assert p.end == 8.0


def test_round_with_everyone_offline_ends_at_its_start():
    for mode in ("sync", "deadline", "overselect"):
        p = plan(mode, start=7.0, durations=[1.0, 2.0], online=[False, False], per_round=2, deadline_s=5.0)
        assert p.reason.tolist() == ["offline", "offline"]
        assert p.finish.tolist() == [7.0, 7.0]
        assert p.end == 7.0


# ---------------------------------------------------------------- deadline


def test_deadline_keeps_a_client_finishing_exactly_at_the_deadline():
    p = plan("deadline", start=100.0, durations=[5.0, 4.0, 6.0, 5.5], deadline_s=5.0)
    assert p.finish.tolist() == [105.0, 104.0, 106.0, 105.5]
    assert p.reason.tolist() == ["", "", "deadline", "deadline"]
    assert p.end == 105.0  # start + deadline_s, as someone is late


def test_deadline_round_ends_early_when_everyone_is_early():
    p = plan("deadline", start=1.0, durations=[1.0, 3.0, 2.0], deadline_s=5.0)
    assert p.reason.tolist() == ["", "", ""]
    assert p.end == 4.0


def test_deadline_with_offline_and_dropout():
    p = plan("deadline", durations=[2.0, 9.0, 8.0, 1.0], online=[True, True, True, False],
             dropout=[NAN, NAN, 0.25, NAN], deadline_s=4.0)
    # 2 drops at 0.25 * 8 = 2 (reported as a drop-out, not late); 1 is late
    assert p.finish.tolist() == [2.0, 9.0, 2.0, 0.0]
    assert p.reason.tolist() == ["", "deadline", "dropout", "offline"]
    assert p.end == 4.0


# ---------------------------------------------------------------- overselect


def test_overselect_keeps_the_earliest_finishers():
    p = plan("overselect", ids=[10, 11, 12, 13, 14], durations=[5.0, 3.0, 3.5, 1.0, 9.0], per_round=3)
    # order of finish: 13 (1), 11 (3), 12 (3.5) | 10 (5), 14 (9)
    assert p.reason.tolist() == ["overselect", "", "", "", "overselect"]
    assert p.end == 3.5


def test_overselect_ties_go_to_the_lower_client_id():
    p = plan("overselect", ids=[14, 12, 10, 13, 11], durations=[2.0, 2.0, 1.0, 2.0, 2.0], per_round=3)
    # 10 first (1.0); then 11, 12, 13, 14 tie at 2.0: 11 and 12 are kept, whatever their position
    assert p.reason.tolist() == ["overselect", "", "", "overselect", ""]
    assert p.end == 2.0


def test_overselect_with_drop_outs_keeps_per_round():
    p = plan("overselect", durations=[1.0, 2.0, 3.0, 4.0, 5.0], dropout=[0.5, NAN, NAN, 0.5, NAN], per_round=3)
    # drop-outs at 0.5 and 2.0; the other three are exactly per_round
    assert p.finish.tolist() == [0.5, 2.0, 3.0, 2.0, 5.0]
    assert p.reason.tolist() == ["dropout", "", "", "dropout", ""]
    assert int(p.kept.sum()) == 3
    assert p.end == 5.0


def test_overselect_with_too_few_candidates_keeps_all_and_waits_like_sync():
    p = plan("overselect", durations=[1.0, 2.0, 3.0, 8.0, 5.0], online=[True, True, True, True, False],
             dropout=[NAN, 0.5, NAN, 0.5, NAN], per_round=3)
    assert p.reason.tolist() == ["", "dropout", "", "dropout", "offline"]
    # only two candidates: the round lasts until the last online client reports or drops out (4.0)
    assert p.end == 4.0


def test_unknown_mode_raises():
    with pytest.raises(ValueError, match="fifo"):
        plan("fifo", durations=[1.0])


def test_cohort_size():
    assert cohort_size("overselect", 10, 1.3) == 13
    assert cohort_size("overselect", 20, 1.3) == 26
    assert cohort_size("overselect", 50, 1.1) == 55  # 1.1 * 50 = 55.00000000000001 in floating point
    assert cohort_size("overselect", 10, 1.0) == 10
    assert cohort_size("overselect", 3, 1.5) == 5  # ceil(4.5)
    assert cohort_size("sync", 10, 1.3) == 10
    assert cohort_size("deadline", 10, 2.0) == 10


def test_drop_counts():
    reasons = ["", "offline", "dropout", "dropout", "deadline", "overselect", "staleness", "", "staleness",
               "nonfinite"]
    assert drop_counts(reasons) == {"dropped_offline": 1, "dropped_dropout": 2, "dropped_deadline": 1,
                                    "dropped_overselect": 1, "dropped_staleness": 2, "dropped_nonfinite": 1}
    assert drop_counts([]) == {f"dropped_{r}": 0 for r in DROP_REASONS}
    assert len(DROP_REASONS) == 6
    p = plan("deadline", durations=[1.0, 9.0, 1.0], online=[True, True, False], deadline_s=2.0)
    assert drop_counts(p.reason) == {"dropped_offline": 1, "dropped_dropout": 0, "dropped_deadline": 1,
                                     "dropped_overselect": 0, "dropped_staleness": 0, "dropped_nonfinite": 0}


# ---------------------------------------------------------------- clock and events


def test_virtual_clock_only_moves_forward():
    clock = VirtualClock()
    assert clock.now == 0.0
    later = clock.advance_to(5.5)
    assert later.now == 5.5 and clock.now == 0.0
    assert later.advance_to(5.5).now == 5.5
    with pytest.raises(ValueError, match="cannot go back"):
        later.advance_to(5.4)


def test_event_queue_orders_by_time_client_and_seq():
    q = EventQueue()
    assert q.peek_time() is None and len(q) == 0
    for time, cid, seq in [(3.0, 2, 0), (1.0, 5, 1), (3.0, 1, 2), (3.0, 1, 0), (0.5, 9, 7)]:
        q.push(Event(time, cid, seq, info={"unorderable": object()}))
    assert len(q) == 5
    assert q.client_ids() == {1, 2, 5, 9}
    assert q.peek_time() == 0.5
    popped = [q.pop() for _ in range(5)]
    assert [(e.time, e.client_id, e.seq) for e in popped] == [(0.5, 9, 7), (1.0, 5, 1), (3.0, 1, 0), (3.0, 1, 2),
                                                              (3.0, 2, 0)]
    assert q.peek_time() is None and q.client_ids() == set()


def test_the_queued_ids_follow_pushes_and_pops():
    """``client_ids`` is kept as events come and go: a client queued twice (a resumed run's re-submission) stays
    until both of its events are out."""
    q = EventQueue()
    q.push(Event(2.0, 4, 0))
    q.push(Event(1.0, 4, 1))
    q.push(Event(1.5, 6, 2))
    ids = q.client_ids()
    assert ids == {4, 6} and 4 in ids and len(ids) == 2
    assert q.pop().client_id == 4 and q.client_ids() == {4, 6}
    assert q.pop().client_id == 6 and q.client_ids() == {4}
    assert q.pop().client_id == 4 and q.client_ids() == set() and not len(q)


def test_sample_streams_are_the_samplers_own_streams():
    """Seeded ahead in bulk, each key's stream is ``generator(seed, "sample", key)``: the same cohorts, also past
    the first batch of keys and from a key met out of order (a resumed run)."""
    streams, draws = SampleStreams(7), SampleStreams(7)
    exclude = {1, 2, 3}
    for key in [*range(0, STREAMS_AHEAD + 3), 500, 2]:
        got = sample_clients(7, key, 1000, 5, exclude, streams.get(key))
        assert np.array_equal(got, sample_clients(7, key, 1000, 5, exclude))
        assert np.array_equal(draws.get(key).random(3), generator(7, "sample", key).random(3))
    assert np.array_equal(sample_cohort(7, 3, 1000, 9, SampleStreams(7).get(3)), sample_cohort(7, 3, 1000, 9))


def test_events_ignore_info_when_compared():
    assert Event(1.0, 2, 3, info="a") == Event(1.0, 2, 3, info="b")
    assert Event(1.0, 2, 3) < Event(1.0, 3, 0)


# ---------------------------------------------------------------- sampling


def test_sample_clients_without_exclusion_is_sample_cohort():
    for exclude in (set(), frozenset()):
        assert np.array_equal(sample_clients(4, 9, 1000, 20, exclude), sample_cohort(4, 9, 1000, 20))


def test_sample_clients_with_exclusion():
    exclude = {1, 3, 5, 7, 8, 9}
    a = sample_clients(0, 2, 20, 10, exclude)
    assert a.dtype == np.int64 and a.shape == (10,)
    assert not set(a.tolist()) & exclude
    assert np.all(np.diff(a) > 0)                     # distinct, sorted
    assert a.min() >= 0 and a.max() < 20
    assert np.array_equal(a, sample_clients(0, 2, 20, 10, set(exclude)))
    assert not np.array_equal(a, sample_clients(0, 3, 20, 10, exclude))
    # 14 free ids and 14 asked for: exactly the free ones
    assert sample_clients(0, 2, 20, 14, exclude).tolist() == sorted(set(range(20)) - exclude)


def test_sample_clients_returns_fewer_when_fewer_are_free():
    assert sample_clients(1, 0, 5, 4, {0, 2, 4}).tolist() == [1, 3]
    assert sample_clients(1, 0, 5, 4, {0, 1, 2, 3, 4}).tolist() == []
    assert sample_clients(1, 0, 5, 0, set()).tolist() == []


def test_split_work_carries_keys():
    ids = np.arange(6)
    # split_cohort orders by (id mod 2, id): [0, 2, 4] and [1, 3, 5]
    assert split_work(ids, np.arange(10, 16), 2) == [(0, [0, 2, 4], [10, 12, 14]), (1, [1, 3, 5], [11, 13, 15])]
    assert split_work(ids, 7, 2) == [(0, [0, 2, 4], 7), (1, [1, 3, 5], 7)]
    assert split_work(ids, np.int64(3), 2) == [(0, [0, 2, 4], 3), (1, [1, 3, 5], 3)]
    # keys follow their clients from any input order
    assert split_work(np.array([5, 0, 3]), np.array([50, 0, 30]), 1) == [(0, [0, 3, 5], [0, 30, 50])]
    assert split_work(np.array([], np.int64), 1, 2) == []
