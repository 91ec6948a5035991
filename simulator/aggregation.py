"""Aggregation of client vectors: a weighted mean in a fixed order.

The cohort's vectors are stacked in the order the clients were sampled, never in the order
their results arrived, so the floating-point sum (and the model) is the same whatever the
number of actors or the order Ray returns them in.
"""

from __future__ import annotations

import torch


def weighted_mean(vectors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_i w_i v_i / sum_i w_i over rows of ``vectors`` (k x P), in row order.

    FedAvg (McMahan et al. 2017, Alg. 1): w_i = n_i, the client's sample count; Reptile and
    MAML: w_i = 1, the plain mean.
    """
    if vectors.ndim != 2 or weights.shape != (vectors.shape[0],):
        raise ValueError(f"need k x P vectors and k weights, got {tuple(vectors.shape)} and {tuple(weights.shape)}")
    if vectors.shape[0] == 0:
        raise ValueError("cannot aggregate an empty cohort")
    total = weights.sum()
    if not total > 0:
        raise ValueError("client weights must sum to a positive number")
    w = (weights / total).to(vectors.dtype)
    return w @ vectors
