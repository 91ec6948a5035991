"""Meta-SGD in federated form: MAML whose inner-loop rates are learned per parameter.

Meta-SGD (Li, Zhou, Chen, Li 2017, "Meta-SGD: Learning to Learn Quickly for Few-Shot Learning", Eq. 1
and Alg. 1) in FedMeta's federated form (Chen, Luo, Dong, Li, He 2018, Alg. 1 with Meta-SGD): the server
vector is [theta ; alpha], alpha a per-parameter inner learning rate initialised to ``local_lr``; the
client adapts theta' = theta - alpha o grad L_support(theta) (``local_steps`` times, differentiably) and
returns the meta-gradient of L_query(theta') with respect to both theta and alpha (second order, as in
MAML); the server descends its mean like MAML's. Held-out clients adapt with the learned rates.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from simulator.algorithms.maml import maml_samples, meta_objective
from simulator.algorithms.record import Algorithm, ClientUpdate, LossFn, split_vector
from simulator.algorithms.stacked import VectorizedCohort
from simulator.algorithms.steps import inner_loop, meta_batches
from simulator.config.schema import AlgorithmConfig
from simulator.data.base import ClientShard
from simulator.params import flatten, num_parameters, unflatten


def metasgd_update(model: nn.Module, vector: torch.Tensor, shard: ClientShard, cfg: AlgorithmConfig,
                   rng: np.random.Generator, loss: LossFn) -> ClientUpdate:
    """Meta-SGD client step (Li et al. 2017, Alg. 1; federated as in FedMeta, Chen et al. 2018, Alg. 1).

    ``vector`` = [theta ; alpha]. Adapt theta' = theta - alpha o grad L_support(theta) on ``local_steps``
    support batches, differentiably (second order, like MAML), and return the meta-gradient
    [grad_theta L_query(theta') ; grad_alpha L_query(theta')] on one query batch (batches drawn as in
    ``maml.maml_update``)."""
    theta, alpha = split_vector(METASGD, vector, num_parameters(model))
    plan, xq, yq, before, samples = meta_batches(model, theta, shard, cfg, rng, loss)
    leaves = {n: p.detach().requires_grad_(True) for n, p in model.named_parameters()}
    rates = {n: a.detach().requires_grad_(True) for n, a in unflatten(model, alpha).items()}
    fast = inner_loop(model, shard.support, plan, rates, loss, fast=dict(leaves), create_graph=True)
    query_loss = loss(functional_call(model, fast, (xq,)), yq)
    grads = torch.autograd.grad(query_loss, [*leaves.values(), *rates.values()])
    return ClientUpdate(flatten(grads).to(shard.support.x.device), before, float(query_loss.detach()), samples)


def metasgd_cohort(engine: VectorizedCohort, vector: torch.Tensor, shards: Sequence[ClientShard],
                   rngs: Sequence[np.random.Generator], cfg: AlgorithmConfig) -> list[ClientUpdate]:
    """``metasgd_update`` for a whole cohort: [grad_theta ; grad_alpha] L_query(theta') per client, by
    ``vmap(grad(...))`` of the adapted query loss with respect to the stacked theta and alpha."""
    theta, alpha = split_vector(METASGD, vector, num_parameters(engine.model))
    sup, qry, plans, qplans, keys = engine.support_query(shards, rngs, cfg)
    out: list[ClientUpdate | None] = [None] * len(shards)
    for rows, run in engine.groups(keys):
        gs, gq, xq, yq = engine.meta_group(sup, qry, plans, qplans, run)
        q_loss = engine.loss_of(gq.plans is None)
        params, rates = engine.expand(theta, len(run)), engine.expand(alpha, len(run))
        before = engine.step_losses(params, xq, yq, gq.mask, gq.plans is None)
        xs = [engine.take(gs, s) for s in range(cfg.local_steps)]
        meta_loss = meta_objective(engine.loss_of(gs.plans is None), q_loss)
        (g_theta, g_alpha), after = vmap(grad(meta_loss, argnums=(0, 1), has_aux=True))(
            params, rates, xs, gs.mask, xq, yq, gq.mask)
        vectors = torch.cat([engine.rows(g_theta), engine.rows(g_alpha)], dim=1)
        engine.meta_updates(out, rows, vectors, before, after, (sup, qry, plans, qplans))
    return out  # type: ignore[return-value]


METASGD = Algorithm("metasgd", metasgd_update, maml_samples, update="gradient", vectorized_step=metasgd_cohort,
                    second_order=True, learns_lr=True,
                    summary="Meta-SGD: MAML with learned per-parameter inner rates")
