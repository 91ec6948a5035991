"""Per-client L2 clipping and adaptive clipping (the pure maths of DP-FedAvg's bounded contributions).

McMahan et al. 2018 ("Learning Differentially Private Recurrent Language Models", Alg. 1, FlatClip):
each client's upload Delta_i is scaled to Delta_i * min(1, C / ||Delta_i||_2), so one client moves the sum
by at most C. Andrew et al. 2021 ("Differentially Private Learning with Adaptive Clipping", Alg. 1, Eq. 4):
the server tracks the ``gamma``-quantile of the update norms geometrically,
C <- C * exp(-eta_C (b~ - gamma)), where b~ = (sum_i 1[||Delta_i|| <= C] + N(0, sigma_b^2)) / m is the noised
fraction of unclipped updates over the expected cohort size m.
"""

from __future__ import annotations

import math

import numpy as np
import torch

#: clipped contributions are scaled to C (1 - SAFETY): their float64 norm is then <= C whatever the rounding of
#: a norm over millions of coordinates (relative error below P * 2**-53 < 2**-28 for P < 2**25 parameters)
SAFETY = 2.0 ** -26


def update_norms(vectors: np.ndarray | torch.Tensor) -> np.ndarray:
    """The L2 norm of every row (k x P), computed in float64 one row at a time (so a row's norm is the same
    whichever chunk of rows it is computed in: in a worker or on the driver)."""
    v = torch.as_tensor(vectors)
    return np.array([float(torch.linalg.vector_norm(row.to(torch.float64))) for row in v], np.float64)


def clip_factors(norms: np.ndarray, clip: float) -> np.ndarray:
    """min(1, C / ||Delta_i||) per client, exactly 1.0 for an update already within the ball (so that clipping
    with a large C changes no bit), and C (1 - 2**-26) / ||Delta_i|| for one outside it (the float64 norm of
    the scaled update is then <= C). A zero-norm update keeps factor 1."""
    norms = np.asarray(norms, np.float64)
    out = np.ones_like(norms)
    over = norms > clip
    out[over] = clip * (1.0 - SAFETY) / norms[over]
    return out


def unclipped_count(norms: np.ndarray, clip: float) -> int:
    """sum_i 1[||Delta_i|| <= C]: the count whose noised value drives the adaptive clip (Andrew et al. 2021)."""
    return int(np.count_nonzero(np.asarray(norms) <= clip))


def adaptive_clip(clip: float, count: int, count_noise: float, denominator: int, quantile: float,
                  lr: float) -> float:
    """Andrew et al. 2021, Alg. 1 (geometric update): C <- C exp(-eta_C (b~ - gamma)),
    b~ = (count + count_noise) / m; ``count_noise`` is the draw from N(0, sigma_b^2)."""
    b = (count + count_noise) / denominator
    return float(clip * math.exp(-lr * (b - quantile)))
