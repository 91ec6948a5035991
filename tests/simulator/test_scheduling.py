"""Client sampling, cohort splitting and the virtual clock."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from simulator.contract import split_cohort
from simulator.scheduling import sample_cohort, select_eval_clients


def test_sample_cohort_properties():
    a = sample_cohort(0, 3, 1000, 20)
    assert a.dtype == np.int64
    assert a.shape == (20,)
    assert len(set(a.tolist())) == 20
    assert np.all(np.diff(a) > 0)
    assert a.min() >= 0 and a.max() < 1000
    assert np.array_equal(a, sample_cohort(0, 3, 1000, 20))        # deterministic per (seed, round)
    assert not np.array_equal(a, sample_cohort(0, 4, 1000, 20))    # another round
    assert not np.array_equal(a, sample_cohort(1, 3, 1000, 20))    # another seed


def test_sample_cohort_whole_population_and_single_client():
    assert sample_cohort(5, 0, 7, 7).tolist() == list(range(7))
    assert sample_cohort(5, 0, 1, 1).tolist() == [0]


def test_sample_cohort_rounds_cover_the_population():
    seen = np.concatenate([sample_cohort(2, r, 50, 5) for r in range(100)])
    assert set(seen.tolist()) == set(range(50))


def test_sample_cohort_million_clients_is_not_o_population():
    # a permutation of 1,000,000 int64 ids would allocate 8 MB; O(per_round) sampling stays far below
    tracemalloc.start()
    ids = sample_cohort(0, 0, 1_000_000, 1000)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 1_000_000
    assert ids.shape == (1000,) and len(np.unique(ids)) == 1000
    assert ids.min() >= 0 and ids.max() < 1_000_000
    assert ids.max() > 500_000  # drawn from the whole range, not a prefix


def test_select_eval_clients():
    ids = select_eval_clients(0, 20, 10, 4)
    assert ids.dtype == np.int64
    assert len(set(ids.tolist())) == 4
    assert np.all(np.diff(ids) > 0)
    assert ids.min() >= 20 and ids.max() < 30
    assert np.array_equal(ids, select_eval_clients(0, 20, 10, 4))
    assert select_eval_clients(3, 100, 5, 5).tolist() == [100, 101, 102, 103, 104]
    assert select_eval_clients(3, 100, 5, 0).tolist() == []


def test_split_cohort_hand_example():
    # order by (id mod 2, id): 0 2 4 1 3 5
    assert split_cohort(np.arange(6), 2) == [(0, [0, 2, 4]), (1, [1, 3, 5])]
    # max_chunk 2: ceil(6 / 2) = 3 chunks, round-robin over the 2 workers
    assert split_cohort(np.arange(6), 2, max_chunk=2) == [(0, [0, 2]), (1, [4, 1]), (0, [3, 5])]
    # fewer clients than workers: one client per call; 7 mod 5 = 2 comes before 4 mod 5 = 4
    assert split_cohort(np.array([4, 7]), 5) == [(0, [7]), (1, [4])]
    assert split_cohort(np.array([], dtype=np.int64), 3) == []


@pytest.mark.parametrize(("workers", "max_chunk"), [(1, 0), (3, 0), (4, 0), (7, 0), (3, 5), (4, 2), (2, 100)])
def test_split_cohort_invariants(workers, max_chunk):
    ids = sample_cohort(1, 0, 500, 37)
    calls = split_cohort(ids, workers, max_chunk)
    got = [c for _, part in calls for c in part]
    assert sorted(got) == ids.tolist()           # every client exactly once
    assert len(got) == len(set(got))
    sizes = [len(part) for _, part in calls]
    assert max(sizes) - min(sizes) <= 1
    assert all(0 <= w < workers for w, _ in calls)
    if max_chunk:
        assert max(sizes) <= max_chunk
    else:
        assert len(calls) == min(workers, ids.size)
    assert [w for w, _ in calls] == [i % workers for i in range(len(calls))]
    # ordered by (id mod workers, id) before cutting
    keys = [(c % workers, c) for c in got]
    assert keys == sorted(keys)
    assert all(isinstance(c, int) for c in got)


def test_split_cohort_is_stable():
    ids = sample_cohort(0, 0, 1000, 40)
    first = split_cohort(ids, 4)
    assert split_cohort(ids, 4) == first
    assert split_cohort(ids[::-1].copy(), 4) == first  # input order does not matter
    # with equal residue classes (10 ids of each residue mod 4) a client's worker is its id mod 4,
    # so a client that is sampled again lands on the same worker (and its cached shard)
    ids = np.array([4 * k + r for r in range(4) for k in range(10)])
    for w, part in split_cohort(ids, 4):
        assert {c % 4 for c in part} == {w}
