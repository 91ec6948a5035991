"""A user's own algorithm in one file, written only through the public record (the README's example).

FedProx (Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith 2020, "Federated Optimization in Heterogeneous
Networks", Eq. 2): client k approximately minimises h_k(w; w^t) = F_k(w) + mu/2 ||w - w^t||^2 by local
SGD from the server model w^t, whose gradient adds mu (w - w^t) to the loss gradient; the server
averages the deltas weighted by n_k, as FedAvg does. With mu = 0 it is FedAvg, bit for bit.

Used by ``test_user_algorithm.py`` as ``algorithm.factory = "tests.simulator.proximal_algorithm:fedprox"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import numpy as np
import torch
from torch import nn

from simulator.algorithms.record import Algorithm, ClientUpdate, LossFn, batch_samples
from simulator.algorithms.stacked import Group, VectorizedCohort
from simulator.algorithms.steps import batch_plan, full_loss, processed, take
from simulator.config.schema import AlgorithmConfig
from simulator.data.base import ClientShard
from simulator.params import Params, flatten, load_flat


def fedprox_update(model: nn.Module, theta: torch.Tensor, shard: ClientShard, cfg: AlgorithmConfig,
                   rng: np.random.Generator, loss: LossFn, mu: float) -> ClientUpdate:
    """``local_steps`` SGD steps on F_k(w) + mu/2 ||w - theta||^2 from theta; returns w - theta."""
    data = shard.all
    plan = batch_plan(rng, len(data), cfg.batch_size, cfg.local_steps)
    load_flat(model, theta)
    before = full_loss(model, data, loss)
    params = list(model.parameters())
    anchor = [p.detach().clone() for p in params]
    for batch in plan:
        x, y = take(data, batch)
        grads = torch.autograd.grad(loss(model(x), y), params)
        with torch.no_grad():
            for p, g, a in zip(params, grads, anchor, strict=True):
                p.add_(g + mu * (p - a), alpha=-cfg.local_lr)
    after = full_loss(model, data, loss)
    return ClientUpdate(flatten(params) - theta, before, after, processed(len(data), plan))


def fedprox_cohort(engine: VectorizedCohort, theta: torch.Tensor, shards: Sequence[ClientShard],
                   rngs: Sequence[np.random.Generator], cfg: AlgorithmConfig, mu: float) -> list[ClientUpdate]:
    """The same steps for a whole cohort at once, on the engine's stacked parameters."""
    data = [s.all for s in shards]
    plans = [batch_plan(r, len(d), cfg.batch_size, cfg.local_steps) for r, d in zip(rngs, data, strict=True)]

    def local(params: Params, g: Group) -> Params:
        step_grad = engine.step_grad(g.plans is None)
        anchor = {n: p.detach().clone() for n, p in params.items()}
        params = {n: p.detach().clone() for n, p in params.items()}
        for s in range(cfg.local_steps):
            x, y = engine.take(g, s)
            grads = step_grad(params, x, y, g.mask)
            for n, p in params.items():
                p.add_(grads[n] + mu * (p - anchor[n]), alpha=-cfg.local_lr)
        return params

    return engine.delta_updates(theta, data, plans, cfg.batch_size, local)


def fedprox(mu: float = 0.01, vectorized: bool = True) -> Algorithm:
    """The record: FedAvg's samples and weighting, the proximal client step (and its vectorized twin)."""
    return Algorithm(
        name="fedprox", client_step=partial(fedprox_update, mu=mu),
        samples=lambda cfg, n_support, n_query: batch_samples(cfg, n_support + n_query, cfg.local_steps),
        weighting="samples", update="delta",
        vectorized_step=partial(fedprox_cohort, mu=mu) if vectorized else None,
        summary=f"FedProx (mu = {mu}): local SGD on the loss plus mu/2 ||w - w_t||^2")


def fedprox_mu0() -> Algorithm:
    return fedprox(0.0)


def fedprox_sequential() -> Algorithm:
    return fedprox(0.5, vectorized=False)


def not_a_record() -> str:
    return "fedprox"
