"""MAML and first-order MAML in federated form (FedMeta).

MAML (Finn, Abbeel, Levine 2017, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks",
Alg. 1 / Eq. 1), federated as in FedMeta (Chen, Luo, Dong, Li, He 2018, "Federated Meta-Learning with
Fast Convergence and Efficient Communication", Alg. 1): a client adapts
theta' = theta - alpha * grad L_support(theta), ``local_steps`` times on support batches, and returns the
meta-gradient grad_theta L_query(theta') on one query batch; the server descends the uniform mean of the
meta-gradients (theta <- theta - server_lr * mean g_i, or through Adam). Second-order MAML differentiates
through the inner steps; first-order MAML (FOMAML, Finn et al. 2017, Sec. 5.2) drops the second-order
terms and returns grad L_query evaluated at theta'.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import numpy as np
import torch
from torch import nn
from torch.func import grad, vmap

from simulator.algorithms.record import Algorithm, ClientUpdate, LossFn, batch_samples
from simulator.algorithms.stacked import VectorizedCohort
from simulator.algorithms.steps import descend, inner_loop, meta_batches
from simulator.config.schema import AlgorithmConfig
from simulator.data.base import ClientShard
from simulator.params import Params, flatten


def maml_update(model: nn.Module, theta: torch.Tensor, shard: ClientShard, cfg: AlgorithmConfig,
                rng: np.random.Generator, loss: LossFn, second_order: bool) -> ClientUpdate:
    """The (FO)MAML client step (see the module docstring): returns grad_theta L_query(theta')."""
    device = shard.support.x.device
    plan, xq, yq, before, samples = meta_batches(model, theta, shard, cfg, rng, loss)
    if not second_order:
        inner_loop(model, shard.support, plan, cfg.local_lr, loss)
        query_loss = loss(model(xq), yq)
        grads = torch.autograd.grad(query_loss, list(model.parameters()))
    else:
        leaves = {n: p.detach().requires_grad_(True) for n, p in model.named_parameters()}
        fast = inner_loop(model, shard.support, plan, cfg.local_lr, loss, fast=leaves, create_graph=True)
        query_loss = loss(torch.func.functional_call(model, fast, (xq,)), yq)
        grads = torch.autograd.grad(query_loss, list(leaves.values()))
    return ClientUpdate(flatten(grads).to(device), before, float(query_loss.detach()), samples)


def maml_samples(cfg: AlgorithmConfig, n_support: int, n_query: int) -> int:
    """``local_steps`` support batches and one query batch."""
    return batch_samples(cfg, n_support, cfg.local_steps) + batch_samples(cfg, n_query, 1)


def meta_objective(inner: Callable[..., torch.Tensor],
                   q_loss: Callable[..., torch.Tensor]) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """One client's meta-objective L_query(theta') for the vectorized path, theta' after inner gradient steps
    ``descend(theta, grad L_support, lr)`` that stay differentiable (``grad`` inside ``grad``: second order),
    returning the loss twice (value and aux). ``lr`` is MAML's scalar rate or Meta-SGD's per-parameter rates,
    which ``grad`` can then differentiate too."""

    def meta_loss(p: Params, lr: float | Params, steps: list[tuple[torch.Tensor, torch.Tensor]], ms: torch.Tensor,
                  xq: torch.Tensor, yq: torch.Tensor, mq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fast = p
        for x, y in steps:
            fast = descend(fast, grad(inner)(fast, x, y, ms), lr)
        loss = q_loss(fast, xq, yq, mq)
        return loss, loss

    return meta_loss


def maml_cohort(engine: VectorizedCohort, theta: torch.Tensor, shards: Sequence[ClientShard],
                rngs: Sequence[np.random.Generator], cfg: AlgorithmConfig, second_order: bool) -> list[ClientUpdate]:
    """``maml_update`` for a whole cohort at once (``vmap(grad(meta_objective))`` for second order)."""
    sup, qry, plans, qplans, keys = engine.support_query(shards, rngs, cfg)
    out: list[ClientUpdate | None] = [None] * len(shards)
    for rows, run in engine.groups(keys):
        gs, gq, xq, yq = engine.meta_group(sup, qry, plans, qplans, run)
        q_loss = engine.loss_of(gq.plans is None)
        params = engine.expand(theta, len(run))
        before = engine.step_losses(params, xq, yq, gq.mask, gq.plans is None)
        if second_order:
            xs = [engine.take(gs, s) for s in range(cfg.local_steps)]
            meta_loss = meta_objective(engine.loss_of(gs.plans is None), q_loss)
            grads, after = vmap(grad(meta_loss, has_aux=True), in_dims=(0, None, 0, 0, 0, 0, 0))(
                params, cfg.local_lr, xs, gs.mask, xq, yq, gq.mask)
        else:
            fast = {n: p.detach() for n, p in engine.sgd(params, gs, cfg.local_steps, cfg.local_lr).items()}
            grads = engine.step_grad(gq.plans is None)(fast, xq, yq, gq.mask)
            after = engine.step_losses(fast, xq, yq, gq.mask, gq.plans is None)
        engine.meta_updates(out, rows, engine.rows(grads), before, after, (sup, qry, plans, qplans))
    return out  # type: ignore[return-value]


FOMAML = Algorithm("fomaml", partial(maml_update, second_order=False), maml_samples, update="gradient",
                   vectorized_step=partial(maml_cohort, second_order=False),
                   summary="first-order MAML: the query gradient after support SGD")
MAML = Algorithm("maml", partial(maml_update, second_order=True), maml_samples, update="gradient",
                 vectorized_step=partial(maml_cohort, second_order=True), second_order=True,
                 summary="MAML: the meta-gradient through the support steps (second order)")
