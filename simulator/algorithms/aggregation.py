"""Aggregation of client vectors: a weighted mean, exactly associative, and the asynchronous rules.

Every sum here is ``exactsum.exact_dot``: each client's weighted contribution is rounded once to an int64
fixed-point grid (2^-42 by default) and the integers are summed, so the result does not depend on the order of
the rows, on how a cohort was cut into worker calls, or on the order Ray returned them in; a worker can reduce
its own chunk to one ``exactsum.Partial`` (``simulator.client.reduce``) and the driver gets the same sum as from
all the rows. Error bound (per element, vs the exact sum): k 2^-43 + 2^-53 sum_i |w_i v_i| / sum_i w_i, far
below half an ulp of the float32 result (see ``exactsum``).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from simulator.algorithms.exactsum import exact_dot, weight_total


def weighted_mean(vectors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_i w_i v_i / sum_i w_i over rows of ``vectors`` (k x P), in row order, in float64.

    FedAvg (McMahan et al. 2017, Alg. 1): w_i = n_i, the client's sample count; Reptile and
    MAML: w_i = 1, the plain mean. Summed on the exact grid (``exactsum``): the result depends
    only on the set of (row, weight) pairs, not on their order.
    """
    if vectors.ndim != 2 or weights.shape != (vectors.shape[0],):
        raise ValueError(f"need k x P vectors and k weights, got {tuple(vectors.shape)} and {tuple(weights.shape)}")
    if vectors.shape[0] == 0:
        raise ValueError("cannot aggregate an empty cohort")
    w = weights.to(torch.float64)
    total = weight_total(w.numpy())  # correctly rounded: the same whatever the order of the weights
    if not total > 0:
        raise ValueError("client weights must sum to a positive number")
    return _exact_dot(w / total, vectors)


def _exact_dot(w: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """sum_i w_i v_i on the exact grid (``exactsum.exact_dot``), as ``vectors.dtype``."""
    out = exact_dot(w.to(torch.float64).numpy(), vectors.detach().cpu().numpy())
    return torch.from_numpy(out).to(vectors.dtype)


def fixed_denominator_sum(vectors: torch.Tensor, weights: torch.Tensor, denominator: int) -> torch.Tensor:
    """sum_i w_i v_i / m with a FIXED m (not sum_i w_i), in row order: the estimator of DP-FedAvg (McMahan
    et al. 2018, Alg. 1), whose denominator reveals nothing about who took part (``simulator.privacy``).
    Summed as ``weighted_mean`` sums (w_i / m, on the exact grid): with unit weights and k = m rows it is bit
    for bit ``weighted_mean(vectors, ones)``."""
    if vectors.ndim != 2 or weights.shape != (vectors.shape[0],) or vectors.shape[0] == 0 or denominator < 1:
        raise ValueError(f"need k >= 1 vectors (k x P), k weights and m >= 1, got {tuple(vectors.shape)}, "
                         f"{tuple(weights.shape)}, m = {denominator}")
    return _exact_dot(torch.ones_like(weights, dtype=torch.float64) / denominator * weights, vectors)


# ----------------------------------------------------------------------------- asynchronous aggregation

STALENESS = ("constant", "polynomial", "sqrt", "hinge")


def staleness_weight(name: str, tau: np.ndarray | float, a: float = 0.5, b: float = 4.0) -> np.ndarray:
    """s(tau): how much an update computed on a model ``tau`` versions old still counts.

    FedAsync (Xie et al. 2019, Sec. 5.2): constant s = 1; polynomial s_a(tau) = (1 + tau)^-a;
    hinge s_{a,b}(tau) = 1 if tau <= b else 1 / (a (tau - b) + 1). FedBuff (Nguyen et al. 2022,
    Sec. 5) uses s(tau) = 1 / sqrt(1 + tau), named "sqrt" here.
    """
    t = np.asarray(tau, dtype=np.float64)
    if np.any(t < 0):
        raise ValueError(f"staleness must be >= 0, got {tau!r}")
    if name == "constant":
        return np.ones_like(t)
    if name == "polynomial":
        return (1.0 + t) ** -a
    if name == "sqrt":
        return 1.0 / np.sqrt(1.0 + t)
    if name == "hinge":  # the second branch only where it applies (a (tau - b) + 1 may be 0 below b)
        out = np.ones_like(t)
        past = t > b
        out[past] = 1.0 / (a * (t[past] - b) + 1.0)
        return out
    raise ValueError(f"unknown staleness function {name!r}; choose one of {', '.join(STALENESS)}")


def staleness_one(name: str, tau: int, a: float = 0.5, b: float = 4.0) -> float:
    """``staleness_weight`` of one update, without numpy's per-call cost (the asynchronous server weighs every
    arrival): the same IEEE operations, so the same value; the polynomial's power goes through numpy, whose ``pow``
    need not be the C library's."""
    if tau < 0:
        raise ValueError(f"staleness must be >= 0, got {tau!r}")
    t = float(tau)
    if name == "constant":
        return 1.0
    if name == "sqrt":
        return 1.0 / math.sqrt(1.0 + t)
    if name == "hinge":
        return 1.0 if t <= b else 1.0 / (a * (t - b) + 1.0)
    return float(staleness_weight(name, t, a, b))


def fedbuff_mean(vectors: torch.Tensor, weights: torch.Tensor,
                 client_weights: torch.Tensor | None = None) -> torch.Tensor:
    """FedBuff's buffered aggregate (Nguyen et al. 2022, Alg. 1): (1/K) sum_i s(tau_i) v_i.

    ``weights`` are the staleness weights s(tau_i) of the K buffered updates, in buffer order.
    Unlike ``weighted_mean`` the sum is divided by K, not by the sum of the staleness weights, so
    stale updates shrink the server step. The server then applies server_lr (or its optimizer).

    ``client_weights`` c_i generalize 1/K to c_i / sum_j c_j (FedAvg's sample counts n_i); with
    every s(tau_i) = 1 the result is bit-for-bit ``weighted_mean(vectors, c)``, so asynchronous
    FedBuff with a full buffer of fresh updates reproduces a synchronous round exactly.
    """
    if vectors.ndim != 2 or weights.shape != (vectors.shape[0],) or vectors.shape[0] == 0:
        raise ValueError(f"need K >= 1 vectors (K x P) and K weights, got {tuple(vectors.shape)}, "
                         f"{tuple(weights.shape)}")
    return _exact_dot(fedbuff_coefficients(weights, client_weights), vectors)


def fedbuff_coefficients(weights: torch.Tensor, client_weights: torch.Tensor | None = None) -> torch.Tensor:
    """FedBuff's coefficients a_i = s(tau_i) c_i / sum_j c_j (``fedbuff_mean``; c_i = 1 by default), in float64 when
    ``weights`` are: what the asynchronous server's buffer is summed with wherever its rows are."""
    c = torch.ones_like(weights) if client_weights is None else client_weights.to(weights.dtype)
    total = weight_total(c.numpy()) if c.shape == weights.shape and c.numel() else 0.0
    if not total > 0:
        raise ValueError("client weights must be one positive-sum weight per buffered update")
    return (c / total) * weights


def fedasync_mix(theta: torch.Tensor, theta_client: torch.Tensor, mixing: float, weight: float) -> torch.Tensor:
    """FedAsync's update (Xie et al. 2019, Alg. 1): theta <- (1 - a_t) theta + a_t theta_client,
    a_t = mixing * s(tau), where theta_client is the client's model trained from a stale version."""
    alpha = mixing * weight
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"mixing * s(tau) must be in [0, 1], got {alpha}")
    return (1.0 - alpha) * theta + alpha * theta_client
