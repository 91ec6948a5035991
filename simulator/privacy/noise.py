"""Seeded Gaussian noise and the fixed-denominator private sum (McMahan et al. 2018; Li et al. 2020).

Central DP (DP-FedAvg, McMahan et al. 2018 Alg. 1; DP-Reptile, Li et al. 2020 "Differentially Private
Meta-Learning", Alg. 1): the server releases

    Delta~ = (sum_i w_i f_i Delta_i + N(0, sigma^2 C^2 I)) / m

with f_i the clip factors (``clipping.clip_factors``), w_i = 1 (sync) or the staleness weight s(tau_i) <= 1
(FedBuff), and a FIXED denominator m (the expected cohort size ``clients.per_round``, or FedBuff's K), so the
denominator reveals nothing about who took part. Local DP: every client adds its own N(0, sigma^2 C^2 I)
to its clipped upload, and the server sums the noised uploads over the same m.

Every draw comes from ``simulator.rng``: the central noise from (seed, "dp_noise", round), a client's local
noise from (seed, "dp_local", round or refill key, client id), never global RNG; the sums run in the cohort's
fixed order in float64, so DP runs are bit-identical across actor counts and backends.
"""

from __future__ import annotations

import numpy as np
import torch

from simulator.algorithms.aggregation import fixed_denominator_sum
from simulator.rng import generator


def gaussian(seed: int, purpose: str, key: int, size: int, std: float, client_id: int = 0) -> np.ndarray:
    """``size`` draws of N(0, std^2) in float64 from the stream (seed, purpose, key, client id)."""
    return generator(seed, purpose, key, client_id).standard_normal(size) * std


def private_mean(vectors: np.ndarray, factors: np.ndarray, weights: np.ndarray, denominator: int,
                 noise_sum: np.ndarray | None, dtype: torch.dtype) -> torch.Tensor:
    """(sum_i weights_i factors_i v_i + noise_sum) / denominator, the sum in float64 in row order, cast to ``dtype``.

    ``noise_sum`` None (sigma = 0) adds nothing, so with every factor 1 and unit weights over a full cohort the
    result is bit for bit ``aggregation.weighted_mean`` of the plain run."""
    v = torch.from_numpy(vectors).to(torch.float64)  # exact: float32 -> float64
    total = fixed_denominator_sum(v, torch.from_numpy(np.asarray(factors, np.float64) * weights), denominator)
    if noise_sum is not None:
        total = total + torch.from_numpy(noise_sum) / denominator
    return total.to(dtype)


def local_noise_sum(seed: int, key: int | np.ndarray, client_ids: np.ndarray, size: int, std: float) -> np.ndarray:
    """sum_i N_i, each client's own noise N_i ~ N(0, std^2 I) from (seed, "dp_local", key_i, client_id_i), summed
    in the given (cohort) order in float64. ``key``: the round, or one refill key per client (async)."""
    keys = np.broadcast_to(np.asarray(key, np.int64), (len(client_ids),))
    out = np.zeros(size, np.float64)
    for k, cid in zip(keys.tolist(), np.asarray(client_ids).tolist(), strict=True):
        out += gaussian(seed, "dp_local", k, size, std, cid)
    return out
