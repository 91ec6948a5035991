"""Weighted mean of client vectors, summed on the exact fixed-point grid (``exactsum``, F = 42 bits by default):
each contribution is rounded once to 2^-42, so a float64 result is within k 2^-43 + 2^-53 sum|x| of the exact sum."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from simulator.algorithms.aggregation import weighted_mean


def test_weighted_mean_small_example():
    vectors = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    out = weighted_mean(vectors, torch.tensor([1.0, 3.0], dtype=torch.float64))
    assert out.tolist() == [2.5, 3.5]  # (1*[1, 2] + 3*[3, 4]) / 4


def test_weighted_mean_float32_and_integer_weights():
    vectors = torch.tensor([[2.0, -4.0, 0.5], [6.0, 8.0, 1.5]], dtype=torch.float32)
    out = weighted_mean(vectors, torch.tensor([1, 1]))
    assert out.dtype == torch.float32
    assert out.tolist() == [4.0, 2.0, 1.0]


#: the grid's bound for k rows of magnitude <= 8: k half-steps of 2^-42, plus float64 rounding of each x_i
def _bound(k: int) -> float:
    return k * 2.0 ** -43 + (k + 1) * 8 * 2.0 ** -53


def test_uniform_weights_give_the_plain_mean():
    rows = torch.tensor([[1.0], [2.0], [6.0]], dtype=torch.float64)
    assert weighted_mean(rows, torch.ones(3, dtype=torch.float64)).item() == pytest.approx(3.0, abs=_bound(3))
    # weights are normalised: scaling them changes nothing (the coefficients w_i / sum w are the same floats)
    a = weighted_mean(rows, torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64))
    b = weighted_mean(rows, torch.tensor([10.0, 20.0, 50.0], dtype=torch.float64))
    assert a.item() == (1 + 4 + 30) / 8  # coefficients 1/8, 2/8, 5/8 and the rows sit on the grid: exact
    assert torch.equal(a, b)


def test_single_client_is_returned_unchanged():
    row = torch.tensor([[0.1, -7.25, 3.0]], dtype=torch.float32)  # float32 values >= 2^-19 sit on the 2^-42 grid
    assert torch.equal(weighted_mean(row, torch.tensor([42.0], dtype=torch.float64)), row[0])
    row64 = row.double() + 1e-12  # a float64 row is rounded once, to the nearest multiple of 2^-42
    torch.testing.assert_close(weighted_mean(row64, torch.tensor([42.0], dtype=torch.float64)), row64[0],
                               rtol=0, atol=_bound(1))


def test_permuting_rows_with_their_weights():
    gen = np.random.default_rng(0)
    ints = torch.from_numpy(gen.integers(-50, 50, size=(6, 5)).astype(np.float64))
    weights = torch.tensor([1.0, 2.0, 1.0, 1.0, 2.0, 1.0], dtype=torch.float64)  # sum 8: exact fractions
    perm = torch.from_numpy(gen.permutation(6))
    assert torch.equal(weighted_mean(ints, weights), weighted_mean(ints[perm], weights[perm]))
    expected = (weights[:, None] * ints).sum(0) / 8
    assert torch.equal(weighted_mean(ints, weights), expected)

    floats = torch.from_numpy(gen.standard_normal((7, 4)).astype(np.float32))
    w = torch.from_numpy(gen.uniform(0.5, 3.0, 7).astype(np.float32))
    perm = torch.from_numpy(gen.permutation(7))
    assert torch.equal(weighted_mean(floats, w), weighted_mean(floats[perm], w[perm]))  # exactly associative


@pytest.mark.parametrize(
    ("vectors", "weights", "match"),
    [
        (torch.zeros(0, 3), torch.zeros(0), "empty"),
        (torch.ones(2, 3), torch.zeros(2), "positive"),
        (torch.ones(2, 3), torch.tensor([1.0, -1.0]), "positive"),
        (torch.ones(2, 3), torch.ones(3), "k x P"),
        (torch.ones(3), torch.ones(3), "k x P"),
        (torch.ones(2, 3, 1), torch.ones(2), "k x P"),
        (torch.ones(2, 3), torch.ones(2, 1), "k x P"),
    ],
    ids=["empty", "zero-total", "cancelling", "too-many-weights", "1-d", "3-d", "2-d-weights"],
)
def test_weighted_mean_rejects_bad_inputs(vectors, weights, match):
    with pytest.raises(ValueError, match=match):
        weighted_mean(vectors, weights)


def test_sums_in_small_column_blocks_and_fedbuff_stay_bit_equal(monkeypatch):
    from simulator.algorithms import exactsum
    from simulator.algorithms.aggregation import fedbuff_mean

    v = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0], [9.0, 10.0]], dtype=torch.float32)
    n = torch.tensor([1.0, 1.0, 2.0, 2.0, 4.0], dtype=torch.float64)
    whole = weighted_mean(v, n)
    monkeypatch.setattr(exactsum, "ON_GRID_ELEMENTS", 5)  # 5 rows: one column a block
    blocked = weighted_mean(v, n)
    assert blocked.dtype == torch.float32
    torch.testing.assert_close(blocked, torch.tensor([6.4, 7.4]), rtol=0, atol=1e-6)  # (1 + 3 + 10 + 14 + 36) / 10, ...
    assert torch.equal(blocked, whole)
    assert torch.equal(fedbuff_mean(v, torch.ones(5, dtype=torch.float64), n), blocked)
