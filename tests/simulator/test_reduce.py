"""``client.reduce.release_mean``: a release's float32 mean from its partials, block by block, equals the whole-vector
computation it replaced (``exactsum.combine``, then the renormalization or the central DP noise, then one rounding
to float32) bit for bit, whatever the order of the partials; the blocks' seams, outliers and empty releases
included. FedBuff's buffer summed from kept chunks (``selected_mean``) is ``aggregation.fedbuff_mean`` bit for bit
whichever chunks hold its rows, and a submitted chunk's scalars (``summarize``) are the driver's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from simulator.algorithms.aggregation import fedbuff_coefficients, fedbuff_mean, staleness_weight
from simulator.algorithms.exactsum import DEFAULT_BOUND, Accumulator, Grid, Merger, combine, merge
from simulator.client import reduce
from simulator.client.reduce import RELEASE_BLOCK, reduce_rows, release_mean, selected_mean, summarize
from simulator.contract import Reduction, Release, Selection, TrainResult
from simulator.privacy.clipping import update_norms
from simulator.privacy.noise import gaussian

#: two blocks and a ragged third: the seams are where a blocked loop would go wrong
SIZE = 2 * RELEASE_BLOCK + 1237


def _case(seed: int, bound: float = 2.0 ** 4):
    """7 clients in 3 partials (cut 2 / 3 / 2), ids shuffled; clients 3 and 5 have an element past the grid's
    bound, so they are outliers, kept as float64 rows and added in cohort order."""
    gen = np.random.default_rng(seed)
    ids = gen.permutation(100)[:7].astype(np.int64)
    rows = (gen.standard_normal((7, SIZE)) * 10.0 ** gen.integers(-6, 1, (7, SIZE))).astype(np.float32)
    rows[3, 5] = rows[5, RELEASE_BLOCK + 3] = 1e3
    coefs = gen.uniform(0.05, 0.3, 7)
    grid = Grid.for_bound(bound, float(coefs.sum()))
    parts = []
    for lo, hi in ((0, 2), (2, 5), (5, 7)):
        acc = Accumulator(grid, SIZE)
        acc.add(rows[lo:hi], coefs[lo:hi], ids[lo:hi])
        parts.append(acc.partial())
    assert sum(len(p.outlier_keys) for p in parts) == 2
    return ids, parts


@pytest.mark.parametrize("scale", [1.0, 7.0 / 5.0])
def test_the_mean_is_the_whole_vector_computation_bit_for_bit(scale):
    ids, parts = _case(0)
    total = combine(parts, ids, SIZE)
    expected = torch.from_numpy(total * scale if scale != 1.0 else total).to(torch.float32).numpy()
    for order in ([0, 1, 2], [2, 0, 1], [1, 2, 0]):
        got = release_mean([parts[i] for i in order], Release(ids, scale), SIZE)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, expected)
    lone = merge(parts, SIZE)  # one partial (as the driver hands over its merged one): read, not written
    before = lone.total.copy()
    np.testing.assert_array_equal(release_mean([lone], Release(ids, scale), SIZE), expected)
    np.testing.assert_array_equal(lone.total, before)


def test_central_noise_is_added_as_the_mechanism_added_it():
    ids, parts = _case(1)
    std, m = 0.37, 11
    total = combine(parts, ids, SIZE)
    expected = torch.from_numpy(total + gaussian(5, "dp_noise", 9, SIZE, std) / m).to(torch.float32).numpy()
    got = release_mean(parts[::-1], Release(ids, 1.0, std, 5, 9, m), SIZE)
    np.testing.assert_array_equal(got, expected)
    f64 = release_mean(parts, Release(ids, 1.0, std, 5, 9, m), SIZE, np.float64)
    np.testing.assert_array_equal(f64, total + gaussian(5, "dp_noise", 9, SIZE, std) / m)


def test_an_empty_release_is_zero_or_its_noise():
    np.testing.assert_array_equal(release_mean([], Release(np.zeros(0, np.int64)), 5), np.zeros(5, np.float32))
    noise = gaussian(2, "dp_noise", 4, 5, 1.5) / 3
    np.testing.assert_array_equal(release_mean([], Release(np.zeros(0, np.int64), 1.0, 1.5, 2, 4, 3), 5),
                                  noise.astype(np.float32))


def test_the_merger_keeps_its_own_buffer_and_refuses_mixed_sums():
    ids, parts = _case(2)
    first = parts[0].total.copy()
    m = Merger(SIZE)
    for p in parts:
        m.add(p)
    np.testing.assert_array_equal(parts[0].total, first)  # a caller's partial is never written to
    np.testing.assert_array_equal(m.partial().total, parts[0].total + parts[1].total + parts[2].total)
    with pytest.raises(ValueError, match="different grids"):
        m.add(Accumulator(Grid(40, 1.0), SIZE).partial())
    with pytest.raises(ValueError, match="a partial of 3 values in a sum of"):
        m.add(Accumulator(parts[0].grid, 3).partial())
    with pytest.raises(ValueError, match="nothing to merge"):
        Merger(4).partial()


def _scattered(rows: np.ndarray, gen: np.random.Generator, blocks: int = 3):
    """The K buffered rows spread over ``blocks`` chunks in shuffled order, each chunk with a row of its own that
    the release does not pick (a client not in the buffer, here non-finite: picking it would show)."""
    where = gen.integers(0, blocks, len(rows))
    chunks, block_of, row_of = [], np.zeros(len(rows), np.int64), np.zeros(len(rows), np.int64)
    for b in range(blocks):
        mine = gen.permutation(np.flatnonzero(where == b))
        chunk = np.full((len(mine) + 1, rows.shape[1]), np.nan, np.float32)
        for r, pos in enumerate(mine.tolist(), start=1):
            chunk[r], block_of[pos], row_of[pos] = rows[pos], b, r
        chunks.append(chunk)
    return chunks, block_of, row_of


def _buffer(seed: int, k: int = 7, size: int = 3001):
    """A FedBuff buffer: k rows (one with an element past the default grid's bound: an outlier), client 11 twice."""
    gen = np.random.default_rng(seed)
    rows = (gen.standard_normal((k, size)) * 10.0 ** gen.integers(-5, 1, (k, size))).astype(np.float32)
    rows[2, 17] = 3.0 * DEFAULT_BOUND
    ids = np.array([11, 4, 11, 9, 30, 2, 8][:k], np.int64)
    return gen, rows, ids


@pytest.mark.parametrize(("seed", "rows_at_a_time"), [(0, None), (1, 1), (2, 2)])
def test_a_buffer_summed_from_kept_chunks_is_fedbuff_mean_bit_for_bit(seed, rows_at_a_time, monkeypatch):
    gen, rows, ids = _buffer(seed)
    if rows_at_a_time:  # a model as large as BLOCK_ELEMENTS / n: the picked rows are read n at a time
        monkeypatch.setattr(reduce, "BLOCK_ELEMENTS", rows_at_a_time * rows.shape[1])
    s = torch.from_numpy(staleness_weight("sqrt", gen.integers(0, 4, len(rows))))
    c = torch.from_numpy(gen.integers(5, 50, len(rows)).astype(np.float64))
    expected = fedbuff_mean(torch.from_numpy(rows), s, c).numpy()
    coefs = fedbuff_coefficients(s, c).numpy()
    red = Reduction(ids, coefs, Grid.for_bound(DEFAULT_BOUND, float(np.abs(coefs).sum())))
    chunks, block_of, row_of = _scattered(rows, gen)
    sel = Selection(block_of, row_of, red, np.zeros(len(rows), np.int64))
    got = selected_mean(chunks, sel, Release(np.arange(len(rows))), 0, rows.shape[1])
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)


def test_a_private_buffer_is_the_same_whatever_chunks_hold_its_rows():
    # clipped (some rows past C), local noise keyed by (refill group, client id): client 11's two uploads get
    # different noise, and the sum does not depend on which chunk held which row
    gen, rows, ids = _buffer(5)
    rows[2, 17] = 0.0
    rows[[1, 4]] *= np.float32(1e-3 / np.abs(rows[[1, 4]]).max())  # within the ball: not clipped
    k, size = rows.shape
    red = Reduction(ids, np.full(k, 0.8 / k), Grid.for_bound(0.5 * (1 + 8 * 0.2), 0.8), 0.5, 0.2)
    keys = np.array([3, 3, 4, 4, 5, 6, 6], np.int64)
    release = Release(np.arange(k), 1.0, 0.3, 5, 2, k)
    acc = Accumulator(red.grid, size)
    norms = reduce_rows(acc, rows, np.ones(k, bool), red.coefs, np.arange(k), red, 9, keys, ids)
    assert (norms > red.clip).any() and (norms <= red.clip).any()
    expected = release_mean([acc.partial()], release, size)
    for _ in range(3):
        chunks, block_of, row_of = _scattered(rows, gen)
        got = selected_mean(chunks, Selection(block_of, row_of, red, keys), release, 9, size)
        np.testing.assert_array_equal(got, expected)


def test_a_submitted_chunk_is_summarized_where_its_vectors_are():
    gen = np.random.default_rng(3)
    vectors = gen.standard_normal((4, 50)).astype(np.float32)
    vectors[1, 7] = np.nan
    loss = np.array([0.5, 0.4, np.inf, 0.2])
    res = TrainResult(0, np.arange(4), vectors, *(np.zeros(4, np.int64),) * 2, loss, loss, np.zeros(4))
    out = summarize(res)
    np.testing.assert_array_equal(out.accepted, [True, False, False, True])
    assert out.vectors is vectors
    np.testing.assert_array_equal(out.update_norm, [float(torch.linalg.vector_norm(torch.from_numpy(v)))
                                                    for v in vectors])
    np.testing.assert_array_equal(out.clip_norm[[0, 3]], update_norms(vectors[[0, 3]]))
    assert np.isnan(out.clip_norm[[1, 2]]).all()


def test_row_peaks_answer_finiteness_and_the_grid_test_in_one_pass():
    """A row's peak is max |u_ij| exactly; NaN or an infinity anywhere in it makes the peak non-finite, so
    ``finite_rows`` from peaks is numpy's element-by-element isfinite test, and an accumulator given the peaks
    sums to the same partial as one that finds them itself."""
    gen = np.random.default_rng(4)
    rows = gen.standard_normal((6, 33)).astype(np.float32)
    rows[1, 4], rows[2, 0], rows[3, 32], rows[4, 9] = np.nan, np.inf, -np.inf, -50.0
    peaks = reduce.row_peaks(rows)
    np.testing.assert_array_equal(peaks[[0, 4, 5]], np.abs(rows[[0, 4, 5]]).max(axis=1).astype(np.float64))
    assert peaks[4] == 50.0 and np.isnan(peaks[1]) and peaks[2] == peaks[3] == np.inf
    losses = np.array([0.1, 0.2, 0.3, 0.4, 0.5, np.nan])
    np.testing.assert_array_equal(reduce.finite_rows(rows, losses),
                                  np.isfinite(rows).all(axis=1) & np.isfinite(losses))
    np.testing.assert_array_equal(reduce.row_peaks(np.zeros((3, 0), np.float32)), np.zeros(3))
    ok = [0, 4, 5]
    coefs, keys, grid = np.array([0.2, 0.3, 0.5]), np.array([7, 8, 9]), Grid.for_bound(16.0)
    found, given = Accumulator(grid, 33), Accumulator(grid, 33)
    found.add(rows[ok], coefs, keys)
    given.add(rows[ok], coefs, keys, peaks=peaks[ok])
    a, b = found.partial(), given.partial()
    np.testing.assert_array_equal(a.total, b.total)
    np.testing.assert_array_equal(a.outlier_keys, [8]) and np.testing.assert_array_equal(b.outlier_keys, [8])
    with pytest.raises(ValueError):
        given.add(rows[ok], coefs, keys, peaks=peaks)  # one peak per row


@pytest.mark.parametrize("threads", [1, 2])
def test_row_norms_in_one_call_are_each_rows_own_norm(threads):
    """``row_norms32`` reduces each row alone: the bits of the row's 1-D float32 norm (what the asynchronous server and
    a one-client chunk compute), whatever the other rows and their number, on small and model-sized rows."""
    gen = np.random.default_rng(5)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for k, size in [(1, 1), (3, 17), (100, 4554), (2, 300_007), (1, 2_000_003)]:
            rows = (gen.standard_normal((k, size)) * 10.0 ** gen.integers(-4, 4, (k, 1))).astype(np.float32)
            want = [float(torch.linalg.vector_norm(torch.from_numpy(r))) for r in rows]
            np.testing.assert_array_equal(reduce.row_norms32(rows), want)
            np.testing.assert_array_equal(reduce.row_norms32(rows[-1:]), want[-1:])
    finally:
        torch.set_num_threads(before)
    assert reduce.row_norms32(np.zeros((0, 5), np.float32)).shape == (0,)


def test_rows_gathered_across_blocks_are_a_view_when_they_can_be():
    a, b = np.arange(12, dtype=np.float32).reshape(4, 3), -np.arange(6, dtype=np.float32).reshape(2, 3)
    run = reduce.gathered([a, b], np.array([0, 0, 0]), np.array([1, 2, 3]), 3)
    assert np.shares_memory(run, a) and np.array_equal(run, a[1:4])
    mixed = reduce.gathered([a, b], np.array([0, 0, 1]), np.array([3, 0, 1]), 3)
    assert not np.shares_memory(mixed, a) and np.array_equal(mixed, np.stack([a[3], a[0], b[1]]))
    with pytest.raises(IndexError):
        reduce.gathered([a, b], np.array([0, 1]), np.array([0, 2]), 3)
