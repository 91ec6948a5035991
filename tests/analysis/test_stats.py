"""analysis.stats: the mean and the Student-t or min-max interval over seeds, with exact numbers.

The t quantiles are checked against closed forms, not against scipy: with 1 degree of freedom Student's t
is the Cauchy distribution, t_{p,1} = tan(pi (p - 1/2)); with 2, t_{p,2} = (2p - 1) / sqrt(2 p (1 - p)).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from analysis.stats import band, format_interval, interval, t_quantile

T_975_1 = math.tan(0.475 * math.pi)                 # 12.7062...
T_975_2 = 0.95 / math.sqrt(2 * 0.975 * 0.025)      # 4.3026...


def test_t_quantiles_match_the_closed_forms():
    assert t_quantile(2) == pytest.approx(T_975_1, rel=1e-13)
    assert t_quantile(3) == pytest.approx(T_975_2, rel=1e-13)
    assert t_quantile(3, level=0.9) == pytest.approx(0.9 / math.sqrt(2 * 0.95 * 0.05), rel=1e-13)
    with pytest.raises(ValueError, match="at least 2"):
        t_quantile(1)


def test_t_interval_of_one_two_three():
    # mean 2, s = 1, half-width t_{0.975,2} * 1 / sqrt(3) = 2.48413771...
    iv = interval([1.0, 2.0, 3.0])
    assert iv.mean == 2.0 and iv.n == 3 and iv.kind == "t" and iv.has_interval
    assert iv.half_width == pytest.approx(T_975_2 / math.sqrt(3), rel=1e-13)
    assert iv.half_width == pytest.approx(2.4841377117503, rel=1e-12)
    assert (iv.low, iv.high) == (2.0 - iv.half_width, 2.0 + iv.half_width)
    two = interval([1.0, 3.0])  # s = sqrt(2): half-width t_{0.975,1} sqrt(2) / sqrt(2)
    assert two.mean == 2.0 and two.half_width == pytest.approx(T_975_1, rel=1e-13)


def test_min_max_interval_and_non_finite_values_left_out():
    iv = interval([4.0, 1.0, math.nan, 2.0, math.inf], kind="minmax")
    assert (iv.mean, iv.low, iv.high, iv.n, iv.half_width) == (7.0 / 3.0, 1.0, 4.0, 3, None)
    assert interval([5.0, math.nan]).n == 1


def test_a_single_seed_has_no_interval_and_none_has_no_mean():
    one = interval([0.5])
    assert one.mean == 0.5 and one.n == 1 and not one.has_interval
    assert one.low is None and one.high is None and one.half_width is None
    assert format_interval(one) == "0.5 (n=1)"
    none = interval([math.nan])
    assert none.n == 0 and math.isnan(none.mean) and format_interval(none) == "-"


def test_format_interval():
    assert format_interval(interval([1.0, 2.0, 3.0])) == "2 ± 2.484"
    assert format_interval(interval([1.0, 2.0, 4.0], "minmax"), ".3f") == "2.333 [1.000, 4.000]"


def test_band_is_the_interval_of_every_row():
    values = np.array([[1.0, 2.0, 3.0], [5.0, np.nan, np.nan], [np.nan] * 3, [1.0, 3.0, np.nan]])
    mean, low, high, n = band(values)
    np.testing.assert_array_equal(n, [3, 1, 0, 2])
    np.testing.assert_allclose(mean[[0, 1, 3]], [2.0, 5.0, 2.0], rtol=0)
    assert np.isnan(mean[2])
    half = np.array([T_975_2 / math.sqrt(3), T_975_1])
    np.testing.assert_allclose(high[[0, 3]] - mean[[0, 3]], half, rtol=1e-13)
    np.testing.assert_allclose(mean[[0, 3]] - low[[0, 3]], half, rtol=1e-13)
    assert np.isnan(low[[1, 2]]).all() and np.isnan(high[[1, 2]]).all()  # one seed or none: no band
    _, low, high, _ = band(values, "minmax")
    np.testing.assert_array_equal(low[[0, 3]], [1.0, 1.0])
    np.testing.assert_array_equal(high[[0, 3]], [3.0, 3.0])
    assert np.isnan(low[1]) and np.isnan(high[2])


def test_bad_kind_or_level_is_refused():
    with pytest.raises(ValueError, match="interval kind must be one of t, minmax"):
        interval([1.0, 2.0], kind="std")
    with pytest.raises(ValueError, match="level"):
        interval([1.0, 2.0], level=95)
    with pytest.raises(ValueError, match="2-d"):
        band(np.zeros(3))
