"""Staleness weights and asynchronous server steps (FedBuff, FedAsync) with hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from simulator.algorithms.aggregation import (
    STALENESS,
    fedasync_mix,
    fedbuff_mean,
    staleness_one,
    staleness_weight,
    weighted_mean,
)


@pytest.mark.parametrize(("name", "tau", "a", "b", "expected"), [
    ("constant", [0, 1, 7], 0.5, 4, [1.0, 1.0, 1.0]),
    ("polynomial", [0, 3, 8], 0.5, 4, [1.0, 0.5, 1 / 3]),      # (1 + tau)^-0.5
    ("polynomial", [1, 3], 1.0, 4, [0.5, 0.25]),                # (1 + tau)^-1
    ("sqrt", [0, 3, 15], 0.5, 4, [1.0, 0.5, 0.25]),             # 1 / sqrt(1 + tau)
    ("hinge", [0, 2, 3, 4, 6], 1.0, 2, [1.0, 1.0, 0.5, 1 / 3, 0.2]),  # 1 / (a (tau - b) + 1) past b
    ("hinge", [5, 14], 10.0, 4, [1 / 11, 1 / 101]),
])
def test_staleness_weights_exact(name, tau, a, b, expected):
    np.testing.assert_allclose(staleness_weight(name, np.array(tau), a, b), expected, rtol=1e-15, atol=0)


def test_staleness_rejects_unknown_and_negative():
    with pytest.raises(ValueError, match="choose one of"):
        staleness_weight("exp", 1.0)
    with pytest.raises(ValueError, match=">= 0"):
        staleness_weight("sqrt", -1.0)
    assert set(STALENESS) == {"constant", "polynomial", "sqrt", "hinge"}


@pytest.mark.parametrize("name", STALENESS)
@pytest.mark.parametrize(("a", "b"), [(0.5, 4.0), (1.7, 0.0), (0.01, 12.5)])
def test_one_updates_weight_is_the_vectors_bit_for_bit(name, a, b):
    """The asynchronous server's per-arrival weight (``staleness_one``) is ``staleness_weight``'s value exactly."""
    taus = np.arange(0, 300)
    want = staleness_weight(name, taus, a, b)
    got = [staleness_one(name, int(t), a, b) for t in taus]
    assert np.array_equal(np.array(got), want) or name == "polynomial"  # numpy's pow: per call vs vectorized
    assert got == [float(staleness_weight(name, float(t), a, b)) for t in taus]
    with pytest.raises(ValueError, match=">= 0"):
        staleness_one(name, -1, a, b)


def test_fedbuff_divides_by_k_not_by_the_weights():
    vectors = torch.tensor([[2.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    weights = torch.from_numpy(staleness_weight("sqrt", np.array([0, 3])))  # 1 and 0.5
    assert fedbuff_mean(vectors, weights).tolist() == [1.0, 1.0]  # (1/2)(1 [2, 0] + 0.5 [0, 4])
    # with no staleness FedBuff is the plain mean
    ones = torch.ones(2, dtype=torch.float64)
    assert fedbuff_mean(vectors, ones).tolist() == [1.0, 2.0]
    with pytest.raises(ValueError):
        fedbuff_mean(vectors[:0], ones[:0])


def test_fedbuff_with_sample_weights_and_its_sync_limit():
    vectors = torch.tensor([[2.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    s = torch.tensor([1.0, 0.5], dtype=torch.float64)
    c = torch.tensor([3.0, 1.0], dtype=torch.float64)
    # (3/4)(1)[2, 0] + (1/4)(0.5)[0, 4] = [1.5, 0.5]
    assert fedbuff_mean(vectors, s, c).tolist() == [1.5, 0.5]
    # fresh updates: bit-for-bit the synchronous weighted mean
    rng = np.random.default_rng(0)
    v = torch.from_numpy(rng.standard_normal((7, 5)))
    n = torch.from_numpy(rng.integers(1, 50, 7).astype(np.float64))
    assert torch.equal(fedbuff_mean(v, torch.ones(7, dtype=torch.float64), n), weighted_mean(v, n))


def test_fedasync_mix_exact():
    theta, client = torch.tensor([0.0, 0.0]), torch.tensor([2.0, 4.0])
    # a_t = 0.5 * s(tau) with s = 0.5: theta <- 0.75 theta + 0.25 theta_client
    assert fedasync_mix(theta, client, 0.5, 0.5).tolist() == [0.5, 1.0]
    assert fedasync_mix(theta, client, 1.0, 1.0).tolist() == [2.0, 4.0]  # full replacement
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fedasync_mix(theta, client, 1.5, 1.0)
