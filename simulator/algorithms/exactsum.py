"""Exactly associative sums of weighted client vectors on a fixed-point grid (metafleet issue 17).

A release sums x_i = a_i u_i over its clients: u_i is the upload as the server counts it (the update; under DP
clipped, x_i = a_i f_i v_i, or clipped and locally noised), a_i its coefficient (w_i / sum_j w_j for a weighted
mean, FedBuff's s(tau_i) c_i / sum_j c_j, DP's w_i / m). The sum has to be the same whatever the number of
workers, the chunks the cohort is cut into and the order the chunks complete in, so it is computed as follows.

**Scheme.** Each x_i is computed once in float64 (one rounding: |x^_ij - x_ij| <= 2^-53 |x_ij|), then rounded
once to the grid 2^-F: q_ij = rint(x^_ij 2^F), an int64 (computed as rint(u_ij (a_i f_i 2^F)): the same number,
since scaling by 2^F is exact). The q_i are summed in int64: integer addition is exact,
so it is associative and commutative, and any split into partial sums (one per worker call, ``Partial``) and any
order of combining them gives the same integer total Q_j; the result is Q_j 2^-F (one more rounding, to float64,
only when |Q_j| > 2^53). A worker therefore sends one int64 vector per call, not one vector per client.

**Error bound.** Per element, |Q_j 2^-F - sum_i x_ij| <= k 2^-(F+1) + 2^-53 sum_i |x_ij| (k rows on the grid),
plus 2^-53 |result| for the final conversion. The float64 sum in row order it replaces had (k - 1) 2^-53
sum_i |x_ij| (Higham, "Accuracy and Stability of Numerical Algorithms", Eq. 4.4). With the default grid
(F = 42) the grid term is 1.1e-13 per client, far below half an ulp of the float32 mean that the server applies
(2^-25 |mean| = 3e-10 for |mean| = 0.01): the float32 results of the two schemes differ by at most one ulp, and
only where the exact sum lies within about k 2^-(F+1) of a float32 rounding boundary.

**Overflow bound.** A grid is (F, R): R = 2^e bounds the elements of an upload (|u_ij| < R), S' = 2^s >= sum_i |a_i|
bounds the coefficients (1 for a weighted mean, m'/m for DP's fixed denominator), and F = 62 - e - s, so R S' 2^F =
2^62. A row is put on the grid only if f_i max_j |u_ij| < R (so |x^_ij| < a_i R (1 + 2^-53)); then any partial sum
of q's is below sum_i (a_i R (1 + 2^-53) 2^F + 1/2) <= 2^62 (1 + 2^-20) (1 + 2^-53) + k / 2 < 2^63 for k < 2^61: no
int64 sum in any order can overflow. A row that fails the test (a diverging client) is an *outlier*: it is kept as
its float64 x^_i and added to the exact part on the driver one at a time in cohort order, so the result is still a
function of the rows alone (not bit-exact float64 arithmetic any more, but deterministic).

R comes from a bound every worker knows before it sees the data: the clip norm C under DP (|f_i v_ij| <=
||f_i v_i|| <= C), C (1 + 8 sigma) with local noise, else ``DEFAULT_BOUND`` = 2^20.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from simulator.params import readonly_tensor

#: |u_ij| below which an upload sits on the default grid (F = 42, 2^-42 = 2.3e-13); larger elements are outliers
DEFAULT_BOUND = 2.0 ** 20
#: the int64 range used: every partial sum stays below 2^62 (1 + 2^-20) + k / 2 < 2^63
RANGE_BITS = 62
#: values gathered or converted per block (rows x P) where a whole array would be a large temporary (a FedBuff
#: buffer's rows, ``selected_partial``; the int64 total's float64 image, ``to_float64``)
BLOCK_ELEMENTS = 1 << 22


def ceil_log2(y: float) -> int:
    """ceil(log2 y) for y > 0, exactly (``math.frexp``: y = m 2^e with m in [0.5, 1))."""
    m, e = math.frexp(y)
    return e - 1 if m == 0.5 else e


@dataclass(frozen=True)
class Grid:
    """The fixed-point grid 2^-``frac_bits`` and the element bound ``limit`` R = 2^e of uploads kept on it."""

    frac_bits: int
    limit: float

    @classmethod
    def for_bound(cls, bound: float = DEFAULT_BOUND, coef_sum: float = 1.0) -> Grid:
        """The finest grid for uploads with |u_ij| <= ``bound`` and coefficients with sum_i |a_i| <= ``coef_sum``.
        Both are padded by 2^-20 before rounding up to a power of two, so that a bound of exactly C = 2^e still
        has room, and a weight sum of 1 + (rounding) still counts as 1."""
        if not (bound > 0 and math.isfinite(bound)) or not coef_sum >= 0:
            raise ValueError(f"need a finite bound > 0 and a coefficient sum >= 0, got {bound}, {coef_sum}")
        e = min(ceil_log2(bound * (1.0 + 2.0 ** -20)), ceil_log2(DEFAULT_BOUND))  # R <= 2^20
        s = max(0, ceil_log2(coef_sum / (1.0 + 2.0 ** -20))) if coef_sum > 0 else 0
        return cls(RANGE_BITS - e - s, math.ldexp(1.0, e))


@dataclass(frozen=True)
class Partial:
    """One call's share of a sum: the int64 total of its rows on the grid, and its outliers (float64 x_i, with
    their keys: client ids, by which the driver puts them in cohort order)."""

    grid: Grid
    total: np.ndarray                 # P int64
    outlier_keys: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    outliers: np.ndarray | None = None  # n x P float64, or None when there is none


def row_peaks(rows: np.ndarray) -> np.ndarray:
    """Each row's largest magnitude max_j |u_ij| in float64 (0 for an empty row): NaN when the row holds a NaN, inf
    when it holds an infinity (numpy's max and min propagate both), so one pass answers both "is it finite"
    (``client.reduce.finite_rows``) and "does it fit the grid" (``Accumulator.add``)."""
    rows = np.asarray(rows)
    return np.maximum(rows.max(axis=1, initial=0.0), -rows.min(axis=1, initial=0.0)).astype(np.float64)


#: float64 elements ``on_grid`` works on at a time (512 KiB, a core's L2): the k rows' columns in blocks this large
ON_GRID_ELEMENTS = 1 << 16


def on_grid(rows: np.ndarray, scales: np.ndarray, into: np.ndarray | None = None,
            select: np.ndarray | None = None) -> np.ndarray:
    """sum_i rint(u_i s_i) in int64, added into ``into`` (P int64, in place) or, without it, as a new array; the
    rows are ``rows`` (k x P), or only those of indices ``select`` (read in place, never copied whole), with one
    float64 scale each in ``scales``. Each product is taken in float64 (one rounding, as numpy's float32 x float64
    multiply), rounded half to even, converted exactly and summed exactly: the integers of numpy's
    ``multiply``/``rint``/``astype``/``sum``. Computed over blocks of columns (``ON_GRID_ELEMENTS`` values of the
    rows) in reused buffers, each block's integers written or added straight into the total, so each step stays in
    cache and nothing row-sized is allocated: every element is computed alone and integer sums are exact, so neither
    the blocking nor the order of the rows changes a bit (its cost in a worker: ``benchmarks.exactsum_speed``)."""
    r = readonly_tensor(np.ascontiguousarray(rows))  # only read (rows may be the object store's)
    pick = None if select is None else torch.from_numpy(np.asarray(select, np.int64))
    s = torch.from_numpy(np.asarray(scales, np.float64))[:, None]
    k, size = (r.shape[0] if pick is None else pick.numel()), r.shape[1]
    if s.shape[0] != k:
        raise ValueError(f"need one scale per summed row: {k} rows, {s.shape[0]} scales")
    if k == 0 or size == 0:
        return np.zeros(size, np.int64) if into is None else into
    total = np.empty(size, np.int64) if into is None else into
    out = torch.from_numpy(total)
    width = max(1, ON_GRID_ELEMENTS // k)
    x = torch.empty((k, min(width, size)), dtype=torch.float64)
    q = torch.empty_like(x, dtype=torch.int64)
    column = torch.empty(min(width, size), dtype=torch.int64) if k > 1 and into is not None else None
    picked = torch.empty((k, min(width, size)), dtype=r.dtype) if pick is not None else None
    for c in range(0, size, width):
        w = min(width, size - c)
        xb, qb = x[:, :w], q[:, :w]
        if picked is None:
            xb.copy_(r[:, c:c + w])  # float32 -> float64: exact
        else:
            xb.copy_(torch.index_select(r[:, c:c + w], 0, pick, out=picked[:, :w]))
        xb.mul_(s).round_()
        qb.copy_(xb)  # integral values: converted exactly
        ob = out[c:c + w]  # one row's integers are the block's sum: no reduction over one row (a slow copy)
        if into is None and k == 1:
            ob.copy_(qb[0])
        elif into is None:
            torch.sum(qb, dim=0, out=ob)
        else:
            ob.add_(qb[0] if column is None else torch.sum(qb, dim=0, out=column[:w]))
    return total


class Accumulator:
    """Adds weighted rows onto a grid (in place, O(P) memory whatever the number of rows); ``partial`` hands the
    result over. Order-free: any sequence of ``add`` calls over the same rows gives the same ``Partial`` total."""

    def __init__(self, grid: Grid, size: int) -> None:
        self.grid, self.size = grid, size
        self.total: np.ndarray | None = None  # the first rows' integers are written, later ones added
        self.keys: list[int] = []
        self.rows: list[np.ndarray] = []
        self._scale = math.ldexp(1.0, grid.frac_bits)

    def add(self, rows: np.ndarray, coefs: np.ndarray, keys: np.ndarray, factors: np.ndarray | None = None,
            peaks: np.ndarray | None = None) -> None:
        """Add x_i = (a_i f_i) u_i for each row u_i (finite; k x P, float32 or float64), ``coefs`` a_i (the nominal
        coefficients the grid was sized for), ``factors`` f_i in [0, 1] (DP clip factors; default 1); ``peaks``
        max_j |u_ij| of each row when the caller knows them (``row_peaks``), else computed here."""
        rows = np.asarray(rows)
        a = np.asarray(coefs, np.float64)
        f = np.ones_like(a) if factors is None else np.asarray(factors, np.float64)
        if rows.ndim != 2 or rows.shape[1] != self.size or a.shape != (len(rows),) or f.shape != a.shape or \
                (peaks is not None and np.shape(peaks) != a.shape):
            raise ValueError(f"need k x {self.size} rows and k coefficients, got {rows.shape}, {a.shape}, {f.shape}")
        peak = row_peaks(rows) if peaks is None else np.asarray(peaks, np.float64)
        fits = (peak * f < self.grid.limit) & (a != 0)  # |f_i u_ij| < R (NaN fails: an outlier)
        for i in np.flatnonzero(~fits & (a != 0)).tolist():  # zero coefficients add nothing
            self.keys.append(int(keys[i]))
            self.rows.append(rows[i].astype(np.float64) * (a[i] * f[i]))
        # x_i 2^F = u_i (a_i f_i 2^F): scaling by a power of two is exact; every fitting row in one pass over the
        # columns (``on_grid``), the others skipped in place
        if fits.any():
            sel = None if fits.all() else np.flatnonzero(fits)
            scales = a * f * self._scale
            self.total = on_grid(rows, scales if sel is None else scales[sel], into=self.total, select=sel)

    def partial(self) -> Partial:
        keys = np.array(self.keys, np.int64)
        total = np.zeros(self.size, np.int64) if self.total is None else self.total
        return Partial(self.grid, total, keys, np.stack(self.rows) if self.rows else None)


class Merger:
    """Adds the partials of one sum as they arrive (a worker's blocks, a release's calls): their int64 totals into
    one buffer of its own (a copy of the first: never a caller's array, so each partial may be freed once added),
    their outliers kept. Integer addition is exact: any order of ``add`` gives the same ``partial``."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.grid: Grid | None = None
        self.total: np.ndarray | None = None
        self.keys: list[np.ndarray] = []
        self.rows: list[np.ndarray] = []

    def add(self, p: Partial) -> None:
        if self.grid is not None and p.grid != self.grid:
            raise ValueError(f"partials of one sum on different grids: {self.grid} and {p.grid}")
        if p.total.size != self.size:
            raise ValueError(f"a partial of {p.total.size} values in a sum of {self.size}")
        self.grid = p.grid
        if self.total is None:
            self.total = np.array(p.total, np.int64, copy=True)
        else:
            self.total += p.total
        if p.outliers is not None:
            self.keys.append(p.outlier_keys)
            self.rows.append(p.outliers)

    def partial(self) -> Partial:
        if self.grid is None or self.total is None:
            raise ValueError("nothing to merge")
        return Partial(self.grid, self.total, np.concatenate(self.keys) if self.keys else np.zeros(0, np.int64),
                       np.concatenate(self.rows) if self.rows else None)


def merge(partials: Iterable[Partial], size: int) -> Partial:
    """One partial from several of one sum (``Merger``)."""
    m = Merger(size)
    for p in partials:
        m.add(p)
    return m.partial()


def outlier_order(p: Partial, order: np.ndarray) -> list[int]:
    """The rows of ``p.outliers`` in the order their keys (client ids) have in ``order`` (the cohort)."""
    position = {int(c): i for i, c in enumerate(np.asarray(order).tolist())}
    return np.argsort([position[int(k)] for k in p.outlier_keys.tolist()], kind="stable").tolist()


def combine(partials: Iterable[Partial], order: np.ndarray, size: int) -> np.ndarray:
    """sum_i x_i in float64 from the partials of one release (``merge``: the int64 totals summed exactly, in any
    order), times 2^-F, then the outliers added one at a time in the order of ``order`` (the cohort's client ids).
    No partial at all sums to zeros."""
    parts = iter(partials)
    first = next(parts, None)
    if first is None:
        return np.zeros(size)
    m = merge(itertools.chain([first], parts), size)
    out = to_float64(m.total, m.grid.frac_bits)  # m.total is merge's own copy: converted in place
    if m.outliers is not None:
        for i in outlier_order(m, order):
            out += m.outliers[i]
    return out


def to_float64(total: np.ndarray, frac_bits: int) -> np.ndarray:
    """Q 2^-F in float64, written over the int64 buffer of ``total`` block by block (no second P-sized array; the
    same bits as ``total.astype(np.float64) * 2^-F``)."""
    out, scale = total.view(np.float64), math.ldexp(1.0, -frac_bits)
    for b in range(0, total.size, BLOCK_ELEMENTS):
        out[b:b + BLOCK_ELEMENTS] = total[b:b + BLOCK_ELEMENTS].astype(np.float64) * scale
    return out


def weight_total(weights: np.ndarray) -> float:
    """sum_i w_i correctly rounded (``math.fsum``), so a normalization w_i / sum_j w_j does not depend on the order
    of the weights either."""
    return math.fsum(np.asarray(weights, np.float64).tolist())


def exact_dot(coefs: np.ndarray, rows: np.ndarray, bound: float = DEFAULT_BOUND,
              factors: np.ndarray | None = None) -> np.ndarray:
    """sum_i a_i f_i u_i over all rows at once (the driver's own sums: FedBuff's buffer, a whole cohort), on the
    grid ``Grid.for_bound(bound, sum |a_i|)``: bit for bit what the partials of any split of the rows combine to."""
    a = np.asarray(coefs, np.float64)
    acc = Accumulator(Grid.for_bound(bound, float(np.abs(a).sum())), rows.shape[1])
    keys = np.arange(len(rows))
    acc.add(rows, a, keys, factors)
    return combine([acc.partial()], keys, rows.shape[1])
