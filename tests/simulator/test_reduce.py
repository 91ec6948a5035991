"""``client.reduce.release_mean``: a release's float32 mean from its partials, block by block, equals the whole-vector
computation it replaced (``exactsum.combine``, then the renormalization or the central DP noise, then one rounding
to float32) bit for bit, whatever the order of the partials; the blocks' seams, outliers and empty releases
included."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from simulator.algorithms.exactsum import Accumulator, Grid, Merger, combine, merge
from simulator.client.reduce import RELEASE_BLOCK, release_mean
from simulator.contract import Release
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
