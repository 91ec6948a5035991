"""Per-FedAvg (FO and HF): MAML steps on the one-step-adapted objective, returning the model change.

Per-FedAvg (Fallah, Mokhtari, Ozdaglar 2020, "Personalized Federated Learning with Theoretical Guarantees:
A Model-Agnostic Meta-Learning Approach", Alg. 1, Eqs. 8-10): every local step draws independent batches
D, D', D'' of the client's whole local data and takes a MAML step on F_i(w) = f_i(w - alpha grad f_i(w));
the client returns w_final - w_0 and the server averages uniformly (theta <- theta + server_lr * mean delta;
with server_lr 1 the paper's average of the clients' models). The step maths (``per_fedavg_step``) is a
pure function of parameter dicts and a gradient oracle, shared with the vectorized path, which passes an
oracle batched over a client dimension.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from simulator.algorithms.record import Algorithm, ClientUpdate, LossFn, Plan, batch_samples
from simulator.algorithms.stacked import Group, VectorizedCohort
from simulator.algorithms.steps import batch_plan, descend, full_loss, processed, take
from simulator.config.schema import AlgorithmConfig
from simulator.data.base import ClientShard
from simulator.params import Params, flatten, load_flat

#: gradient of the client loss at some parameters on batch ``which`` of the current step (0: D, 1: D', 2: D'')
GradAt = Callable[[Params, int], Params]


def outer_lr(cfg: AlgorithmConfig) -> float:
    """Per-FedAvg's beta: ``outer_lr``, or ``local_lr`` when it is 0."""
    return cfg.outer_lr or cfg.local_lr


def per_fedavg_plans(rng: np.random.Generator, n: int, cfg: AlgorithmConfig, hessian_free: bool) -> list[Plan]:
    """The batch streams D, D' (and D'' for HF) of ``local_steps`` steps each, drawn one after the
    other from the client's generator: independent seeded permutation streams over all local data."""
    return [batch_plan(rng, n, cfg.batch_size, cfg.local_steps) for _ in range(3 if hessian_free else 2)]


def per_fedavg_samples(cfg: AlgorithmConfig, n_support: int, n_query: int, hessian_free: bool) -> int:
    """Samples a Per-FedAvg client step processes: 2 (FO) or 3 (HF; D'' counted once) batches per step."""
    return batch_samples(cfg, n_support + n_query, cfg.local_steps * (3 if hessian_free else 2))


def per_fedavg_step(w: Params, grad_at: GradAt, alpha: float, beta: float, delta: float | None) -> Params:
    """One local step of Per-FedAvg (Fallah et al. 2020, Alg. 1 lines 6-8).

    w~ = w - alpha grad f(w, D);  v = grad f(w~, D').
    FO (Eq. 9, delta None):  w <- w - beta v.
    HF (Eq. 10):  w <- w - beta (v - alpha d),  d = [grad f(w + delta v, D'') - grad f(w - delta v, D'')] / (2 delta),
    the finite-difference estimate of the Hessian-vector product H(w, D'') v in Eq. 8's
    w <- w - beta (I - alpha H(w, D'')) v.
    """
    v = grad_at(descend(w, grad_at(w, 0), alpha), 1)
    if delta is None:
        return descend(w, v, beta)
    diff = gradient_difference(grad_at, w, v, delta)
    return {n: w[n] - beta * (v[n] - alpha * diff[n] / (2 * delta)) for n in w}


def gradient_difference(grad_at: GradAt, w: Params, v: Params, delta: float) -> Params:
    """grad f(w + delta v, D'') - grad f(w - delta v, D''): divided by 2 delta, Eq. 10's central-difference
    estimate of the Hessian-vector product H(w, D'') v, with an error of O(delta^2 |v|^2) where the loss is
    smooth, and O(1) where a ReLU kink lies within delta |v| of w (``benchmarks.hvp_error`` measures it)."""
    plus = grad_at({n: w[n] + delta * v[n] for n in w}, 2)
    minus = grad_at(descend(w, v, delta), 2)
    return {n: plus[n] - minus[n] for n in w}


def _grad_at(model: nn.Module, loss: LossFn, p: Params, x: torch.Tensor, y: torch.Tensor) -> Params:
    """grad_p loss(model_p(x), y), first order (no graph kept)."""
    leaves = {n: t.detach().requires_grad_(True) for n, t in p.items()}
    value = loss(functional_call(model, leaves, (x,)), y)
    return dict(zip(leaves, torch.autograd.grad(value, list(leaves.values())), strict=True))


def per_fedavg_update(model: nn.Module, theta: torch.Tensor, shard: ClientShard, cfg: AlgorithmConfig,
                      rng: np.random.Generator, loss: LossFn, hessian_free: bool) -> ClientUpdate:
    """Per-FedAvg client step (Fallah et al. 2020, Alg. 1): ``local_steps`` steps of ``per_fedavg_step``
    from theta on the client's whole local data (support and query), alpha = ``local_lr``,
    beta = ``outer_lr`` (0 = ``local_lr``), delta = ``hf_delta``; returns w_final - theta."""
    data = shard.all
    plans = per_fedavg_plans(rng, len(data), cfg, hessian_free)
    load_flat(model, theta)
    before = full_loss(model, data, loss)
    w = {n: p.detach().clone() for n, p in model.named_parameters()}
    delta = cfg.hf_delta if hessian_free else None
    for s in range(cfg.local_steps):
        batches = [take(data, plan[s]) for plan in plans]
        w = per_fedavg_step(w, lambda p, which: _grad_at(model, loss, p, *batches[which]),  # noqa: B023
                            cfg.local_lr, outer_lr(cfg), delta)
    final = flatten(w)
    load_flat(model, final)
    after = full_loss(model, data, loss)
    samples = sum(processed(len(data), plan) for plan in plans)
    return ClientUpdate(final - theta.to(final.device), before, after, samples)


def per_fedavg_cohort(engine: VectorizedCohort, theta: torch.Tensor, shards: Sequence[ClientShard],
                      rngs: Sequence[np.random.Generator], cfg: AlgorithmConfig,
                      hessian_free: bool) -> list[ClientUpdate]:
    """``per_fedavg_update`` for a whole cohort: the batch streams D, D', D'' are interleaved into one index
    plan (step s uses rows 2s, 2s+1 or 3s, 3s+1, 3s+2) and the oracle is the engine's batched gradient."""
    data = [s.all for s in shards]
    streams = [per_fedavg_plans(r, len(d), cfg, hessian_free) for r, d in zip(rngs, data, strict=True)]
    m = 3 if hessian_free else 2
    plans = [[b for step in zip(*st, strict=True) for b in step] for st in streams]
    fd_step = cfg.hf_delta if hessian_free else None

    def local(params: Params, g: Group) -> Params:
        step_grad = engine.step_grad(g.plans is None)
        for s in range(cfg.local_steps):
            batches = [engine.take(g, m * s + j) for j in range(m)]
            params = per_fedavg_step(params, lambda p, which: step_grad(p, *batches[which], g.mask),  # noqa: B023
                                     cfg.local_lr, outer_lr(cfg), fd_step)
        return params

    return engine.delta_updates(theta, data, plans, cfg.batch_size, local)


PERFEDAVG_FO = Algorithm("perfedavg_fo", partial(per_fedavg_update, hessian_free=False),
                         partial(per_fedavg_samples, hessian_free=False),
                         vectorized_step=partial(per_fedavg_cohort, hessian_free=False),
                         summary="Per-FedAvg, first-order (Fallah et al. 2020, Eq. 9)")
PERFEDAVG_HF = Algorithm("perfedavg_hf", partial(per_fedavg_update, hessian_free=True),
                         partial(per_fedavg_samples, hessian_free=True),
                         vectorized_step=partial(per_fedavg_cohort, hessian_free=True),
                         summary="Per-FedAvg, Hessian-free (finite-difference Hessian-vector product, Eq. 10)")
