"""Aggregation where the updates are: a worker reduces its chunk of a release to one ``exactsum.Partial``.

Per client, in this order (``reduce_rows``): the upload ``v_i`` (already decoded from its compressed form in the
worker) is rejected when it or its loss is non-finite (under DP it then contributes zero, as before: whether a
release happens never depends on the data); under DP it is clipped to L2 norm C (McMahan et al. 2018, Alg. 1,
FlatClip: f_i = min(1, C / ||v_i||), ``privacy.clipping``); under local DP the client's own noise
N_i ~ N(0, sigma^2 C^2 I) from (seed, "dp_local", key, client id) is added *after* compression and clipping
(u_i = f_i v_i + N_i, in float64); then a_i u_i goes onto the exact grid (``exactsum.Accumulator``). Per-client
scalars travel with the partial: accepted, the float32 norm of v_i (clients.parquet ``update_norm``) and the
float64 norm DP clips by (adaptive clipping counts the unclipped ones on the driver).

A release's partials become the mean the server applies in ``release_mean``, block by block (``Release``: the
exact sum, its outliers, the renormalization or the central DP noise, one rounding to float32), so that it can run
in a worker next to the partials (``system.combine``) or on the driver, with the same bits.

FedBuff's buffer is summed from kept vectors (``Selection``, ``selected_mean``): its coefficients s(tau_i) c_i / sum c
are known only when the buffer is full, so a worker's submitted chunk only works out its per-client scalars
(``summarize``) and its vectors stay where they were computed until a release picks its rows, on the grid of
that release. The rows go through the same ``reduce_rows`` in whatever grouping, so a release is bit for bit the
same whether its rows were reduced in a worker or on the driver, and the same as ``aggregation.fedbuff_mean``.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from simulator.algorithms.exactsum import (
    BLOCK_ELEMENTS,
    Accumulator,
    Grid,
    Partial,
    merge,
    outlier_order,
    row_peaks,
)
from simulator.contract import Reduction, Release, Selection, TrainResult
from simulator.params import readonly_tensor
from simulator.privacy.clipping import clip_factors, update_norms
from simulator.privacy.noise import gaussian


def finite_rows(rows: np.ndarray, losses: np.ndarray, peaks: np.ndarray | None = None) -> np.ndarray:
    """Rows whose upload and loss are all finite (a NaN/inf update never touches the model); ``peaks``: the rows'
    ``row_peaks`` when already known."""
    peaks = row_peaks(rows) if peaks is None else peaks
    return np.isfinite(peaks) & np.isfinite(losses)


def row_norms32(rows: np.ndarray) -> np.ndarray:
    """Each row's L2 norm computed in float32, the rows in one call (``torch.linalg.vector_norm`` over dim 1: each
    row reduced alone, the bits of the row's own 1-D norm, which tests/simulator/test_reduce.py checks)."""
    if len(rows) == 0:
        return np.zeros(0)
    r = readonly_tensor(np.ascontiguousarray(rows))
    return torch.linalg.vector_norm(r, dim=1).to(torch.float64).numpy()


def reduce_rows(acc: Accumulator, rows: np.ndarray, accepted: np.ndarray, coefs: np.ndarray, keys: np.ndarray,
                red: Reduction, seed: int, noise_keys: np.ndarray, client_ids: np.ndarray,
                peaks: np.ndarray | None = None) -> np.ndarray:
    """Add the accepted rows (k x P) with coefficients ``coefs`` to ``acc``, clipped and noised as ``red`` says;
    ``keys`` order the outliers (client ids, or buffer positions), ``noise_keys`` key the local noise (the round,
    or the refill group); ``peaks``: the rows' ``row_peaks`` when known. Returns the float64 norms DP clips by (NaN
    where not clipped or not accepted). When every row is accepted they are added as they are (no copy)."""
    k = len(rows)
    clip_norm = np.full(k, math.nan)
    ok = np.flatnonzero(accepted)
    if not ok.size:
        return clip_norm
    factors = np.ones(ok.size)
    if red.clip > 0:
        clip_norm[ok] = update_norms(rows[ok])
        factors = clip_factors(clip_norm[ok], red.clip)
    if red.local_std <= 0:
        if ok.size == k:
            acc.add(rows, coefs, keys, factors, peaks)
        else:
            acc.add(rows[ok], coefs[ok], keys[ok], factors, None if peaks is None else peaks[ok])
        return clip_norm
    size = rows.shape[1]
    for j, i in enumerate(ok.tolist()):
        u = rows[i].astype(np.float64) * factors[j] + gaussian(seed, "dp_local", int(noise_keys[i]), size,
                                                                 red.local_std, int(client_ids[i]))
        acc.add(u[None], coefs[i:i + 1], keys[i:i + 1])
    return clip_norm


def reduce_result(res: TrainResult, red: Reduction, seed: int, keys: np.ndarray) -> TrainResult:
    """A chunk's result with its vectors reduced to one partial sum and per-client scalars (``keys``: each client's
    batch-stream key, which also keys its local noise). Vectors must be already decoded from compression."""
    peaks = row_peaks(res.vectors)  # one pass: finiteness here, the grid test in the accumulator
    res = summarize(res, clip_norms=False, peaks=peaks)  # accepted, float32 norms; DP's norms come from reduce_rows
    acc = Accumulator(red.grid, res.vectors.shape[1])
    ids = np.asarray(res.client_ids, np.int64)
    clip_norm = reduce_rows(acc, res.vectors, res.accepted, red.coefficients(ids), ids, red, seed, np.asarray(keys),
                            ids, peaks)
    empty = np.empty((0, res.vectors.shape[1]), np.float32)  # not a view: the block's memory is released
    return dataclasses.replace(res, vectors=empty, partial=acc.partial(), clip_norm=clip_norm)


def summarize(res: TrainResult, clip_norms: bool = True, peaks: np.ndarray | None = None) -> TrainResult:
    """A submitted chunk's per-client scalars, worked out where its vectors are (``Backend.submit``): accepted
    (finite), the float32 norm of each upload (``update_norm``) and, with ``clip_norms`` (DP is on), its float64
    norm (``clip_norm``, which DP clips by and adaptive clipping counts; NaN where not accepted or not asked for:
    it costs a float64 pass over the vector); ``peaks``: the vectors' ``row_peaks`` when known. The vectors stay in
    the result."""
    ok = finite_rows(res.vectors, res.loss_after, peaks)
    clip_norm = np.full(len(ok), math.nan)
    if clip_norms:
        clip_norm[ok] = update_norms(res.vectors)[ok]  # row by row: no copy of the accepted rows
    return dataclasses.replace(res, accepted=ok, update_norm=row_norms32(res.vectors), clip_norm=clip_norm)


def selected_partial(blocks: list[np.ndarray], sel: Selection, seed: int, size: int) -> tuple[Partial, np.ndarray]:
    """The exact partial sum of the rows ``sel`` picks from ``blocks`` (k_b x P each), as ``reduce_rows`` adds them
    (clipped, noised as ``sel.reduce`` says; outliers keyed by position), and the float64 norm each position was
    clipped by (NaN without a clip). The picked rows go through ``reduce_rows`` in groups of up to
    ``BLOCK_ELEMENTS`` values, gathered across blocks (a view when a group is consecutive rows of one block), so a
    buffer of many small chunks costs a few large grid passes, and a group never holds more than one block of
    values; every row is reduced alone and the integer sum is exact, so the grouping changes no bit."""
    red, picked, keys = sel.reduce, np.asarray(sel.rows), np.asarray(sel.noise_keys)
    where = np.asarray(sel.blocks)
    acc = Accumulator(red.grid, size)
    norms = np.full(len(picked), math.nan)
    step = max(1, BLOCK_ELEMENTS // max(1, size))  # rows gathered at a time: never a copy of a whole chunk
    order = np.lexsort((picked, where))  # by block, then row: runs of consecutive rows stay views
    arrays = [np.asarray(b) for b in blocks]
    for lo in range(0, order.size, step):
        pos = order[lo:lo + step]
        rows = gathered(arrays, where[pos], picked[pos], size)
        norms[pos] = reduce_rows(acc, rows, np.ones(pos.size, bool), red.coefs[pos], pos, red, seed, keys[pos],
                                 red.client_ids[pos])
    return acc.partial(), norms


def gathered(blocks: list[np.ndarray], block_of: np.ndarray, rows: np.ndarray, size: int) -> np.ndarray:
    """Rows ``rows[j]`` of ``blocks[block_of[j]]`` as one (m x P) array: a view when they are consecutive rows of
    one block, else one buffer filled block by block (``np.take``: no temporary)."""
    first = int(block_of[0])
    if (block_of == first).all() and (rows.size == 1 or bool((np.diff(rows) == 1).all())):
        return blocks[first][rows[0]:rows[-1] + 1]
    out = np.empty((rows.size, size), np.result_type(*(blocks[int(b)].dtype for b in np.unique(block_of))))
    cuts = np.flatnonzero(np.diff(block_of)) + 1
    for a, b in zip([0, *cuts.tolist()], [*cuts.tolist(), rows.size], strict=True):
        block, idx = blocks[int(block_of[a])], rows[a:b]
        if idx.min() < 0 or idx.max() >= len(block):
            raise IndexError(f"row {int(idx.max())} of a block of {len(block)} rows")
        np.take(block, idx, axis=0, out=out[a:b], mode="clip")  # checked above; "clip" writes out unbuffered
    return out


def selected_mean(blocks: list[np.ndarray], sel: Selection, release: Release, seed: int, size: int,
                  dtype: np.dtype | type = np.float32) -> np.ndarray:
    """The float32 mean of one release of kept rows (``selected_partial``, then ``release_mean``)."""
    return release_mean([selected_partial(blocks, sel, seed, size)[0]], release, size, dtype)


#: float64 elements ``release_mean`` converts at a time (2 MiB): it never holds a float64 copy of the sum
RELEASE_BLOCK = 1 << 18


def release_mean(partials: list[Partial], release: Release, size: int,
                 dtype: np.dtype | type = np.float32) -> np.ndarray:
    """The float32 mean of one release from its partials (``merge``: their int64 totals summed exactly, in any
    order), per element: Q 2^-F in float64, + each outlier in cohort order, x ``scale`` (when not 1), + the central
    noise N_j / m, rounded once to float32 (``dtype``). Element by element the same operations, in the same order, as
    ``exactsum.combine`` followed by the renormalization or ``Privacy``'s noise on the whole float64 vector, so
    the bits are those of that computation; only a block of 2 MiB is ever held in float64."""
    if not partials:
        m = Partial(Grid(0, 1.0), np.zeros(size, np.int64))  # no call: a zero sum
    elif len(partials) == 1 and partials[0].total.size == size:
        m = partials[0]  # only read here: a lone partial (the driver's merged one) is not copied again
    else:
        m = merge(partials, size)  # raises on partials of another grid or size
    rows = [m.outliers[i] for i in outlier_order(m, release.order)] if m.outliers is not None else []
    noise = (gaussian(release.noise_seed, "dp_noise", release.noise_key, size, release.noise_std)
             / release.denominator if release.noise_std > 0 else None)
    out, scale = np.empty(size, dtype), math.ldexp(1.0, -m.grid.frac_bits)
    for b in range(0, size, RELEASE_BLOCK):
        block = slice(b, b + RELEASE_BLOCK)
        x = m.total[block].astype(np.float64) * scale
        for row in rows:
            x += row[block]
        if release.scale != 1.0:
            x *= release.scale
        if noise is not None:
            x += noise[block]
        out[block] = x
    return out
