"""What client steps share: losses, seeded batch plans, and the one inner loop of gradient steps.

Every local or inner loop in metafleet is ``inner_loop``: FedAvg's and Reptile's local SGD, FOMAML's
and MAML's adaptation (first and second order), Meta-SGD's adaptation with learned per-parameter rates,
Per-FedAvg's steps (through ``descend``) and the held-out clients' adaptation at evaluation. One step is

    theta' = theta - lr o grad L_batch(theta)

(Finn et al. 2017, Eq. 1; with per-parameter rates, Meta-SGD, Li et al. 2017, Eq. 1; with FedAsync's proximal
term, Xie et al. 2019, Alg. 1, the gradient of L_batch(theta) + rho/2 ||theta - x_tau||^2), either in place on
a module's own parameters (first order, nothing kept for differentiation) or functionally on a dict of
tensors, optionally keeping the graph so that a meta-gradient can differentiate through the steps.

Data use. FedAvg and Reptile train on all of a training client's local data (support and query splits
together); FOMAML and MAML adapt on the support split and take the meta-gradient on the query split, as
in FedMeta (Chen et al. 2018, Alg. 1). Held-out clients only ever adapt on support and are scored on query.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from simulator.algorithms.record import Batch, LossFn, Plan
from simulator.config.schema import AlgorithmConfig
from simulator.data.base import ClientShard, Split
from simulator.params import Params, load_flat

#: one learning rate, or one per parameter (a tensor shaped like it: Meta-SGD's alpha)
Rate = float | Params


def loss_function(task: str) -> LossFn:
    return F.mse_loss if task == "regression" else F.cross_entropy


def batch_plan(rng: np.random.Generator, n: int, batch_size: int, steps: int) -> Plan:
    """Mini-batch indices for ``steps`` SGD steps: consecutive epochs of seeded permutations, as a
    (steps x batch_size) array whose rows are the batches (one array, no list of slices to build).

    ``batch_size`` 0 or >= n means full-batch steps: ``[None] * steps``.
    """
    if batch_size <= 0 or batch_size >= n or steps == 0:
        return [None] * steps
    epochs = -(-steps * batch_size // n)
    order = rng.permutation(n) if epochs == 1 else np.concatenate([rng.permutation(n) for _ in range(epochs)])
    return order[:steps * batch_size].reshape(steps, batch_size)


def take(split: Split, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    if batch is None:
        return split.x, split.y
    idx = torch.from_numpy(batch).to(split.x.device)
    return split.x[idx], split.y[idx]


def processed(n: int, plan: Plan) -> int:
    """Samples a plan's steps process on a split of n samples."""
    if isinstance(plan, np.ndarray):  # a mini-batch plan: steps x batch size indices
        return plan.size
    return sum(n if b is None else len(b) for b in plan)


def descend(params: Params, grads: Params, lr: Rate) -> Params:
    """One functional gradient step: {n: p - lr o g} (new tensors; differentiable if the inputs are)."""
    if isinstance(lr, dict):
        return {n: params[n] - lr[n] * grads[n] for n in params}
    return {n: params[n] - lr * grads[n] for n in params}


def inner_loop(model: nn.Module, data: Split, plan: Plan, lr: Rate, loss: LossFn,
               fast: Params | None = None, create_graph: bool = False, rho: float = 0.0) -> Params:
    """Gradient steps theta <- theta - lr o grad L_batch(theta), one per batch of ``plan`` (see the module
    docstring).

    ``fast`` None: the steps update the module's own parameters in place, first order (one fused
    ``_foreach_add_`` per step, or ``_foreach_sub_`` of rate o gradient); returns them by name. ``rho`` > 0
    (in place, one rate only) adds FedAsync's proximal gradient rho (theta - x_tau) to every step, x_tau the
    parameters the loop started from (Xie et al. 2019, Alg. 1: the client minimises f(x) + rho/2 ||x - x_tau||^2).
    ``fast`` a dict: functional steps from those tensors through ``functional_call``; with ``create_graph``
    the returned tensors stay differentiable with respect to ``fast`` (and to ``lr``, when it requires grad:
    second-order MAML, Meta-SGD)."""
    if fast is None:
        named = dict(model.named_parameters())
        params = list(named.values())
        rates = None if not isinstance(lr, dict) else [lr[n] for n in named]
        if rho and rates is not None:
            raise ValueError("the proximal term takes one learning rate, not per-parameter rates")
        anchor = [p.detach().clone() for p in params] if rho else None
        for batch in plan:
            x, y = take(data, batch)
            grads = torch.autograd.grad(loss(model(x), y), params)
            with torch.no_grad():
                if anchor is not None:
                    grads = torch._foreach_add(grads, torch._foreach_sub(params, anchor), alpha=rho)
                if rates is None:
                    torch._foreach_add_(params, grads, alpha=-lr)
                else:
                    torch._foreach_sub_(params, torch._foreach_mul(grads, rates))
        return named
    for batch in plan:
        x, y = take(data, batch)
        grads = torch.autograd.grad(loss(functional_call(model, fast, (x,)), y), list(fast.values()),
                                    create_graph=create_graph)
        fast = descend(fast, dict(zip(fast, grads, strict=True)), lr)
    return fast


def full_loss(model: nn.Module, data: Split, loss: LossFn) -> float:
    with torch.no_grad():
        return float(loss(model(data.x), data.y))


def meta_batches(model: nn.Module, theta: torch.Tensor, shard: ClientShard, cfg: AlgorithmConfig,
                 rng: np.random.Generator, loss: LossFn) -> tuple[list[Batch], torch.Tensor, torch.Tensor, float, int]:
    """What MAML-style client steps share: ``local_steps`` support batches, one query batch (x, y), the
    query loss at theta (loaded into ``model``) and the samples the step will process."""
    plan = batch_plan(rng, len(shard.support), cfg.batch_size, cfg.local_steps)
    (query_batch,) = batch_plan(rng, len(shard.query), cfg.batch_size, 1)
    xq, yq = take(shard.query, query_batch)
    load_flat(model, theta)
    with torch.no_grad():
        before = float(loss(model(xq), yq))
    return plan, xq, yq, before, processed(len(shard.support), plan) + len(xq)
