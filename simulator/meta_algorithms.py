"""The rest of the meta-learning family: Per-FedAvg (FO and HF) and Meta-SGD in federated form.

Both are client steps in the sense of ``simulator.algorithms`` (theta, one client's shard, its
seeded batch stream -> an update vector); this module registers them in ``ALGORITHMS`` when
``simulator.algorithms`` is imported. The step maths are pure functions of parameter dicts
(name -> tensor) and a gradient oracle, shared with the vectorized path (``simulator.vectorized``),
which passes a ``vmap``-ed oracle over a client dimension.

- Per-FedAvg (Fallah, Mokhtari, Ozdaglar 2020, "Personalized Federated Learning with Theoretical
  Guarantees: A Model-Agnostic Meta-Learning Approach", Alg. 1, Eqs. 8-10): every local step
  draws independent batches D, D', D'' of the client's whole local data and takes a MAML step
  on the one-step-adapted objective F_i(w) = f_i(w - alpha grad f_i(w)); the client returns
  w_final - w_0 and the server averages uniformly (theta <- theta + server_lr * mean delta; with
  server_lr 1 the paper's average of the clients' models).
- Meta-SGD (Li, Zhou, Chen, Li 2017, "Meta-SGD: Learning to Learn Quickly for Few-Shot
  Learning", Eq. 1 and Alg. 1) in FedMeta's federated form (Chen, Luo, Dong, Li, He 2018,
  "Federated Meta-Learning with Fast Convergence and Efficient Communication", Alg. 1 with
  Meta-SGD): the server vector is [theta ; alpha], alpha a per-parameter inner learning rate; the
  client adapts theta' = theta - alpha o grad L_support(theta) (``local_steps`` times) and returns
  the meta-gradient of L_query(theta') with respect to both theta and alpha (second order, as in
  "maml"); the server descends its mean like MAML's.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from simulator.algorithms import (
    ALGORITHMS,
    Algorithm,
    Batch,
    ClientUpdate,
    LossFn,
    batch_plan,
    batch_samples,
    full_loss,
    meta_batches,
    split_vector,
    take,
)
from simulator.config import AlgorithmConfig
from simulator.data import ClientShard
from simulator.models import load_flat, num_parameters

Params = dict[str, torch.Tensor]
#: gradient of the client loss at some parameters on batch ``which`` of the current step (0: D, 1: D', 2: D'')
GradAt = Callable[[Params, int], Params]


# ------------------------------------------------------------------------------------------ Per-FedAvg


def outer_lr(cfg: AlgorithmConfig) -> float:
    """Per-FedAvg's beta: ``outer_lr``, or ``local_lr`` when it is 0."""
    return cfg.outer_lr or cfg.local_lr


def per_fedavg_plans(rng: np.random.Generator, n: int, cfg: AlgorithmConfig, hessian_free: bool) -> list[list[Batch]]:
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
    g = grad_at(w, 0)
    v = grad_at({n: w[n] - alpha * g[n] for n in w}, 1)
    if delta is None:
        return {n: w[n] - beta * v[n] for n in w}
    plus = grad_at({n: w[n] + delta * v[n] for n in w}, 2)
    minus = grad_at({n: w[n] - delta * v[n] for n in w}, 2)
    return {n: w[n] - beta * (v[n] - alpha * (plus[n] - minus[n]) / (2 * delta)) for n in w}


def _grad_at(model: nn.Module, loss: LossFn, p: Params, x: torch.Tensor, y: torch.Tensor) -> Params:
    """grad_p loss(model_p(x), y), first order (no graph kept)."""
    leaves = {n: t.detach().requires_grad_(True) for n, t in p.items()}
    value = loss(functional_call(model, leaves, (x,)), y)
    return dict(zip(leaves, torch.autograd.grad(value, list(leaves.values())), strict=True))


def _flat(params: Params) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params.values()])


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
    final = _flat(w)
    load_flat(model, final)
    after = full_loss(model, data, loss)
    processed = sum(len(data) if b is None else len(b) for plan in plans for b in plan)
    return ClientUpdate(final - theta.to(final.device), before, after, processed)


# -------------------------------------------------------------------------------------------- Meta-SGD


def metasgd_inner_step(fast: Params, grads: Params, alpha: Params) -> Params:
    """Meta-SGD's adaptation step (Li et al. 2017, Eq. 1): theta' = theta - alpha o grad L_support(theta)."""
    return {n: fast[n] - alpha[n] * grads[n] for n in fast}


def metasgd_update(model: nn.Module, vector: torch.Tensor, shard: ClientShard, cfg: AlgorithmConfig,
                   rng: np.random.Generator, loss: LossFn) -> ClientUpdate:
    """Meta-SGD client step (Li et al. 2017, Alg. 1; federated as in FedMeta, Chen et al. 2018, Alg. 1).

    ``vector`` = [theta ; alpha]. Adapt theta' = theta - alpha o grad L_support(theta) on ``local_steps``
    support batches, differentiably (second order, like MAML), and return the meta-gradient
    [grad_theta L_query(theta') ; grad_alpha L_query(theta')] on one query batch (batches drawn as in
    ``maml_update``)."""
    theta, alpha = split_vector(ALGORITHMS["metasgd"], vector, num_parameters(model))
    plan, xq, yq, before, processed = meta_batches(model, theta, shard, cfg, rng, loss)
    named = list(model.named_parameters())
    leaves = {n: p.detach().requires_grad_(True) for n, p in named}
    rates, start = {}, 0
    for n, p in named:
        rates[n] = alpha[start:start + p.numel()].reshape(p.shape).detach().to(p.device).requires_grad_(True)
        start += p.numel()
    fast = dict(leaves)
    for batch in plan:
        x, y = take(shard.support, batch)
        inner = torch.autograd.grad(loss(functional_call(model, fast, (x,)), y), list(fast.values()),
                                    create_graph=True)
        fast = metasgd_inner_step(fast, dict(zip(fast, inner, strict=True)), rates)
    query_loss = loss(functional_call(model, fast, (xq,)), yq)
    grads = torch.autograd.grad(query_loss, [*leaves.values(), *rates.values()])
    out = torch.cat([g.reshape(-1) for g in grads]).detach()
    return ClientUpdate(out.to(shard.support.x.device), before, float(query_loss.detach()), processed)


ALGORITHMS.update({
    "perfedavg_fo": Algorithm("perfedavg_fo", partial(per_fedavg_update, hessian_free=False), "uniform", "delta",
                              partial(per_fedavg_samples, hessian_free=False)),
    "perfedavg_hf": Algorithm("perfedavg_hf", partial(per_fedavg_update, hessian_free=True), "uniform", "delta",
                              partial(per_fedavg_samples, hessian_free=True)),
    "metasgd": Algorithm("metasgd", metasgd_update, "uniform", "gradient", learns_lr=True),
})
