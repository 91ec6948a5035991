"""Statistics over the seeds of a setting: the mean, and a 95% Student-t confidence interval or a min-max band.

With n seeds x_1..x_n of a metric, mean m = (1/n) sum x_i and sample standard deviation
s = sqrt(sum (x_i - m)^2 / (n - 1)), the two-sided confidence interval for the expected value is
m +- t_{(1 + level)/2, n - 1} s / sqrt(n) (Student 1908; e.g. Wasserman, *All of Statistics*, 2004, Sec. 10.4),
with t the quantile of Student's t distribution with n - 1 degrees of freedom (``scipy.stats.t.ppf``). It
assumes the seeds' results are independent draws of a roughly normal quantity; with 2-5 seeds the
interval is wide, as it should be. The min-max band ([min x_i, max x_i]) makes no such assumption.

A single seed has no interval: ``low``, ``high`` and ``half_width`` are None (and NaN in the arrays of
``band``), never a zero-width band. Non-finite values (a run that has not evaluated yet) are left out and
do not count in n.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from scipy.stats import t as student_t

#: interval kinds: ``t`` (Student-t confidence interval of the mean) and ``minmax`` (the range over seeds)
KINDS: tuple[str, ...] = ("t", "minmax")
LEVEL = 0.95


def _check(kind: str, level: float) -> None:
    if kind not in KINDS:
        raise ValueError(f"interval kind must be one of {', '.join(KINDS)}, not {kind!r}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence level must be in (0, 1), not {level!r}")


@dataclass(frozen=True)
class Interval:
    """The mean of ``n`` values and an interval around it (None when n < 2)."""

    mean: float              # NaN when n == 0
    low: float | None
    high: float | None
    n: int
    kind: str                # "t" or "minmax"
    half_width: float | None = None   # t only: t_{(1+level)/2, n-1} s / sqrt(n)

    @property
    def has_interval(self) -> bool:
        return self.low is not None


def t_quantile(n: int, level: float = LEVEL) -> float:
    """t_{(1 + level)/2, n - 1}: the two-sided Student-t quantile for n values (n >= 2)."""
    if n < 2:
        raise ValueError(f"a t-interval needs at least 2 values, got {n}")
    return float(student_t.ppf((1.0 + level) / 2.0, n - 1))


def interval(values: Iterable[float], kind: str = "t", level: float = LEVEL) -> Interval:
    """Mean and interval of the finite ``values``: Student-t at ``level`` (``kind="t"``) or min-max."""
    _check(kind, level)
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    if n == 0:
        return Interval(math.nan, None, None, 0, kind)
    mean = math.fsum(xs) / n
    if n == 1:
        return Interval(mean, None, None, 1, kind)
    if kind == "minmax":
        return Interval(mean, min(xs), max(xs), n, kind)
    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(n, level) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, kind, half)


def band(values: np.ndarray, kind: str = "t", level: float = LEVEL) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                             np.ndarray]:
    """Row-wise ``interval`` of a (points x seeds) array with NaN for missing values: mean, low, high and n per
    point; low and high are NaN where fewer than 2 seeds have a value."""
    _check(kind, level)
    data = np.asarray(values, dtype=float)
    if data.ndim != 2:
        raise ValueError(f"band needs a 2-d (points x seeds) array, got shape {data.shape}")
    finite = np.isfinite(data)
    n = finite.sum(axis=1)
    filled = np.where(finite, data, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n > 0, filled.sum(axis=1) / n, np.nan)
        if kind == "minmax":
            low = np.where(n > 1, np.where(finite, data, np.inf).min(axis=1), np.nan)
            high = np.where(n > 1, np.where(finite, data, -np.inf).max(axis=1), np.nan)
            return mean, low, high, n
        squares = np.where(finite, (data - mean[:, None]) ** 2, 0.0).sum(axis=1)
        sd = np.sqrt(squares / (n - 1))
        quantile = student_t.ppf((1.0 + level) / 2.0, np.maximum(n - 1, 1))
        half = np.where(n > 1, quantile * sd / np.sqrt(n), np.nan)
    return mean, mean - half, mean + half, n


def describe(kind: str, level: float = LEVEL) -> str:
    """What an interval of ``kind`` is, for titles and table notes."""
    _check(kind, level)
    return f"{level:.0%} Student-t confidence interval of the mean" if kind == "t" else "min-max range"


def format_interval(iv: Interval, fmt: str = ".4g") -> str:
    """``0.3992 ± 0.0123`` (t), ``0.3992 [0.3801, 0.4102]`` (min-max), ``0.3992 (n=1)`` without an interval,
    ``-`` without values."""
    if iv.n == 0:
        return "-"
    mean = format(iv.mean, fmt)
    if not iv.has_interval:
        return f"{mean} (n=1)"
    if iv.kind == "t":
        return f"{mean} ± {format(iv.half_width, fmt)}"
    return f"{mean} [{format(iv.low, fmt)}, {format(iv.high, fmt)}]"
