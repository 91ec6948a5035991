"""The exact fixed-point sum: associativity (any chunking, any order), its error and overflow bounds, outliers."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from simulator.algorithms.exactsum import (
    DEFAULT_BOUND,
    ON_GRID_ELEMENTS,
    Accumulator,
    Grid,
    combine,
    exact_dot,
    on_grid,
    weight_total,
)


def _rows(gen: np.random.Generator, k: int, p: int) -> np.ndarray:
    """float32 rows spanning 12 decades, with signs: the sums a float64 loop would round differently by order."""
    return (gen.standard_normal((k, p)) * 10.0 ** gen.integers(-8, 4, (k, p))).astype(np.float32)


def _partials(rows, coefs, ids, grid, cuts, order):
    parts = []
    for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
        acc = Accumulator(grid, rows.shape[1])
        acc.add(rows[lo:hi], coefs[lo:hi], ids[lo:hi])
        parts.append(acc.partial())
    return [parts[i] for i in order]


def test_grid_sizes():
    assert Grid.for_bound() == Grid(42, 2.0 ** 20)  # default: R 2^F = 2^62
    assert Grid.for_bound(1.0) == Grid(61, 2.0)  # C = 1 exactly: padded to the next power of two
    assert Grid.for_bound(0.3) == Grid(63, 0.5)  # 0.5 2^63 = 2^62
    assert Grid.for_bound(1e30) == Grid.for_bound()  # a huge clip gives the default grid
    assert Grid.for_bound(1.0, 3.0) == Grid(59, 2.0)  # sum |a_i| <= 4 = 2^2
    assert Grid.for_bound(1.0, 1.0 + 1e-12) == Grid.for_bound(1.0)  # a rounded sum of normalized weights counts as 1
    with pytest.raises(ValueError):
        Grid.for_bound(math.inf)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_any_chunking_and_completion_order_gives_the_same_bits(seed):
    gen = np.random.default_rng(seed)
    k, p = 40, 17
    rows = _rows(gen, k, p)
    rows[5, 3] = 3.0e6  # above 2^20: an outlier, summed on the driver in cohort order
    rows[31, 0] = -2.5e6
    w = gen.uniform(0.1, 5.0, k)
    coefs = w / weight_total(w)
    ids = gen.permutation(1000)[:k]  # the cohort's order is ids' order
    grid = Grid.for_bound(DEFAULT_BOUND, float(np.abs(coefs).sum()))
    want = exact_dot(coefs, rows)
    for _ in range(5):
        cuts = np.unique(np.concatenate([[0, k], gen.integers(0, k, gen.integers(0, 6))]))
        order = gen.permutation(len(cuts) - 1)
        got = combine(_partials(rows, coefs, ids, grid, cuts, order), ids, p)
        np.testing.assert_array_equal(got, want)
    # the float64 loop in two orders is not associative on these rows (so the test can fail)
    fwd = sum(coefs[i] * rows[i].astype(np.float64) for i in range(k))
    bwd = sum(coefs[i] * rows[i].astype(np.float64) for i in reversed(range(k)))
    assert not np.array_equal(fwd, bwd)


def test_error_bound_against_the_exact_rational_sum():
    gen = np.random.default_rng(3)
    k, p = 64, 9
    rows = _rows(gen, k, p)
    coefs = np.full(k, 1.0 / k)
    got = exact_dot(coefs, rows)
    frac = 2.0 ** -(Grid.for_bound().frac_bits + 1)
    for j in range(p):
        exact = sum(Fraction(float(coefs[i])) * Fraction(float(rows[i, j])) for i in range(k))
        sum_abs = float(sum(abs(Fraction(float(coefs[i])) * Fraction(float(rows[i, j]))) for i in range(k)))
        bound = k * frac + 2.0 ** -53 * sum_abs + 2.0 ** -53 * abs(float(exact))
        assert abs(Fraction(float(got[j])) - exact) <= Fraction(bound)


def test_rows_at_the_bound_never_overflow_and_a_row_past_it_is_an_outlier():
    k, p = 1000, 3
    grid = Grid.for_bound(1.0)  # R = 2: every |u_ij| < 2
    rows = np.full((k, p), 2.0 * (1 - 2.0 ** -24), np.float32)  # the largest float32 below R, all the same sign
    rows[:, 1] *= -1
    coefs = np.full(k, 1.0 / k)
    acc = Accumulator(grid, p)
    acc.add(rows, coefs, np.arange(k))
    part = acc.partial()
    assert part.outliers is None and np.abs(part.total).max() < 2 ** 63
    np.testing.assert_allclose(combine([part], np.arange(k), p), rows[0], rtol=0, atol=k * 2.0 ** -(grid.frac_bits + 1))
    big = rows.copy()
    big[7, 2] = 2.0  # exactly R: kept off the grid, as its float64 contribution
    acc = Accumulator(grid, p)
    acc.add(big, coefs, np.arange(k))
    part = acc.partial()
    assert part.outlier_keys.tolist() == [7]
    np.testing.assert_array_equal(part.outliers[0], coefs[7] * big[7].astype(np.float64))


def test_zero_coefficients_and_dp_factors():
    rows = np.array([[1.0, 2.0], [3.0, 4.0], [1e9, 1e9]], np.float32)
    coefs = np.array([0.5, 0.5, 0.0])  # a zero coefficient adds nothing, not even an outlier
    got = exact_dot(coefs, rows, factors=np.array([1.0, 0.5, 1.0]))
    assert got.tolist() == [0.5 + 0.75, 1.0 + 1.0]  # 0.5 [1, 2] + 0.5 * 0.5 [3, 4]
    # with a clip factor the bound applies to f_i u_i, not to the raw row: a clipped large row stays on the grid
    grid = Grid.for_bound(1.0)
    acc = Accumulator(grid, 2)
    acc.add(np.array([[300.0, 400.0]], np.float32), np.array([1.0]), np.array([0]), np.array([1.0 / 500.0]))
    assert acc.partial().outliers is None


def test_weight_total_is_order_free():
    gen = np.random.default_rng(4)
    w = gen.uniform(0, 1, 1000) * 10.0 ** gen.integers(-6, 6, 1000)
    assert weight_total(w) == weight_total(w[::-1]) == weight_total(gen.permutation(w))


def test_on_grid_is_numpys_float64_product_rounded_half_to_even():
    """The torch pass equals numpy's reference bit for bit, ties included (x.5 products round to even)."""
    gen = np.random.default_rng(3)
    rows = _rows(gen, 40, 300)
    rows[0, :8] = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 0.0], np.float32)  # exact ties at scale 1
    scales = np.concatenate([[1.0], 2.0 ** gen.integers(10, 40, 39) * gen.uniform(0.5, 1.0, 39)])
    ref = np.rint(np.multiply(rows, scales[:, None], dtype=np.float64)).astype(np.int64).sum(axis=0)
    got = on_grid(rows, scales)
    assert got.dtype == np.int64 and np.array_equal(got, ref)
    assert np.array_equal(on_grid(rows[:1, :8], np.ones(1)), [0, 2, 2, 0, -2, -2, 4, 0])
    f64 = rows.astype(np.float64)
    on_grid(f64, scales)
    assert np.array_equal(f64, rows.astype(np.float64))  # a float64 input is not scaled in place


@pytest.mark.parametrize("k", [1, 3, 40])
def test_on_grid_in_column_blocks_is_the_whole_array_pass(k):
    """Over several blocks of columns and a ragged last one (``ON_GRID_ELEMENTS`` / k columns a block), the sum is
    numpy's whole-array reference bit for bit."""
    gen = np.random.default_rng(k)
    size = 2 * (ON_GRID_ELEMENTS // k) + 77
    rows = _rows(gen, k, size)
    scales = 2.0 ** gen.integers(10, 40, k) * gen.uniform(0.5, 1.0, k)
    ref = np.rint(np.multiply(rows, scales[:, None], dtype=np.float64)).astype(np.int64).sum(axis=0)
    assert np.array_equal(on_grid(rows, scales), ref)


@pytest.mark.parametrize("k", [1, 2, 40])
def test_on_grid_adds_into_a_total_and_sums_only_the_selected_rows(k):
    """``into``: the block integers are added to the given int64 total in place (it is returned); ``select``: only
    those rows count, each with its own scale, read in place: numpy's reference on the picked rows, bit for bit,
    over several blocks of columns."""
    gen = np.random.default_rng(10 + k)
    size = 2 * (ON_GRID_ELEMENTS // k) + 5
    rows = _rows(gen, k + 3, size)
    scales = 2.0 ** gen.integers(10, 40, k) * gen.uniform(0.5, 1.0, k)
    sel = np.sort(gen.choice(k + 3, k, replace=False))
    ref = np.rint(np.multiply(rows[sel], scales[:, None], dtype=np.float64)).astype(np.int64).sum(axis=0)
    start = gen.integers(-2**40, 2**40, size)
    total = start.copy()
    assert on_grid(rows, scales, into=total, select=sel) is total
    assert np.array_equal(total, start + ref)
    rows.setflags(write=False)  # the object store's arrays are read-only
    assert np.array_equal(on_grid(rows[sel], scales), ref)
    with pytest.raises(ValueError, match="one scale per summed row"):
        on_grid(rows, scales, select=sel[:-1])
