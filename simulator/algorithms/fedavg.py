"""FedAvg, Reptile and Personalized FedAvg: local SGD from the server model, returning the model change.

- FedAvg (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from Decentralized
  Data", Alg. 1): ``local_steps`` SGD steps on the client's data from theta to phi_i; the client returns
  delta_i = phi_i - theta and the server takes theta <- theta + server_lr * sum_i n_i delta_i / sum_i n_i.
- Reptile (Nichol, Achiam, Schulman 2018, "On First-Order Meta-Learning Algorithms", Alg. 2, batched
  version): the same client step, and the server moves theta <- theta + server_lr * mean_i delta_i
  (equal weights: every client is one task).
- Personalized FedAvg (Jiang, Konecny, Rush, Kannan 2019, "Improving Federated Learning Personalization
  via Model Agnostic Meta Learning", Sec. 3 / Alg. 1): FedAvg with server momentum SGD until model
  version ``switch_round``, then Reptile fine-tuning (uniform weights) with server Adam at
  ``finetune_server_lr`` whose moments start afresh: the same client step, a server-side schedule.
- FedAsync's client (Xie et al. 2019, "Asynchronous Federated Optimization", Alg. 1): the same local SGD on
  f(x) + rho/2 ||x - x_tau||^2, x_tau the model it received (``async.proximal_rho``; ``with_proximal``).

The local step trains on all of a training client's data (support and query splits together).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from functools import partial

import numpy as np
import torch
from torch import nn

from simulator.algorithms.record import Algorithm, ClientUpdate, LossFn, ServerPhase, batch_samples
from simulator.algorithms.stacked import Group, VectorizedCohort
from simulator.algorithms.steps import batch_plan, full_loss, inner_loop, processed
from simulator.config.schema import AlgorithmConfig, ConfigError, ExperimentConfig
from simulator.data.base import ClientShard
from simulator.params import Params, flat_delta, load_flat


def local_sgd_update(model: nn.Module, theta: torch.Tensor, shard: ClientShard, cfg: AlgorithmConfig,
                     rng: np.random.Generator, loss: LossFn, rho: float = 0.0) -> ClientUpdate:
    """The FedAvg / Reptile client step (McMahan et al. 2017, Alg. 1 ClientUpdate; Nichol et al. 2018,
    Alg. 2): starting from theta, ``local_steps`` SGD steps on the client's data reach phi_i; returns
    the delta phi_i - theta. ``rho`` > 0: each step descends f + rho/2 ||x - theta||^2 (FedAsync's client,
    Xie et al. 2019, Alg. 1)."""
    data = shard.all
    plan = batch_plan(rng, len(data), cfg.batch_size, cfg.local_steps)
    load_flat(model, theta)
    before = full_loss(model, data, loss)
    phi = inner_loop(model, data, plan, cfg.local_lr, loss, rho=rho)
    after = full_loss(model, data, loss)
    return ClientUpdate(flat_delta(phi, theta), before, after, processed(len(data), plan))


def local_sgd_cohort(engine: VectorizedCohort, theta: torch.Tensor, shards: Sequence[ClientShard],
                     rngs: Sequence[np.random.Generator], cfg: AlgorithmConfig, rho: float = 0.0) -> list[ClientUpdate]:
    """``local_sgd_update`` for a whole cohort at once (``simulator.algorithms.stacked``)."""
    data = [s.all for s in shards]
    plans = [batch_plan(r, len(d), cfg.batch_size, cfg.local_steps) for r, d in zip(rngs, data, strict=True)]

    def local(params: Params, g: Group) -> Params:
        return engine.sgd(params, g, cfg.local_steps, cfg.local_lr, rho)

    fused = None if rho else engine.fused_sgd(cfg.local_steps, cfg.local_lr)  # plain MLPs: written-out backward
    return engine.delta_updates(theta, data, plans, cfg.batch_size, local, fused)


def local_sgd_samples(cfg: AlgorithmConfig, n_support: int, n_query: int) -> int:
    return batch_samples(cfg, n_support + n_query, cfg.local_steps)


def pfedavg_schedule(cfg: AlgorithmConfig, base: ServerPhase, version: int) -> ServerPhase:
    """Personalized FedAvg's two phases: FedAvg (the config's server optimizer, n_i weights) before model
    version ``switch_round``, Reptile with a fresh server Adam at ``finetune_server_lr`` from it on."""
    if version < cfg.switch_round:
        return base
    return ServerPhase(cfg.switch_round, "uniform", "adam", cfg.finetune_server_lr)


def pfedavg_configure(cfg: ExperimentConfig, given: frozenset[str]) -> ExperimentConfig:
    """``switch_round = 0`` means half of the rounds (written out); the keys pfedavg cannot serve."""
    a = cfg.algorithm
    if a.switch_round == 0:
        a = replace(a, switch_round=max(1, cfg.rounds // 2))
        cfg = replace(cfg, algorithm=a)
    if a.server_optimizer != "sgd":
        raise ConfigError("algorithm.name = \"pfedavg\" runs FedAvg with server SGD (set algorithm.server_momentum, "
                          "e.g. 0.9) and then Adam fine-tuning at algorithm.finetune_server_lr; set "
                          "algorithm.server_optimizer = \"sgd\"")
    if a.switch_round >= cfg.rounds:
        raise ConfigError(f"algorithm.switch_round = {a.switch_round} is not before rounds = {cfg.rounds}, so pfedavg "
                          "would never fine-tune; lower algorithm.switch_round (0 = half of the rounds)")
    if cfg.system.mode == "async" and cfg.async_.rule == "fedasync":
        raise ConfigError("algorithm.name = \"pfedavg\" needs a server optimizer to switch phases, which async.rule = "
                          "\"fedasync\" does not have; use async.rule = \"fedbuff\"")
    return cfg


FEDAVG = Algorithm("fedavg", local_sgd_update, local_sgd_samples, weighting="samples", update="delta",
                   vectorized_step=local_sgd_cohort, summary="FedAvg: local SGD, deltas weighted by n_i")
REPTILE = Algorithm("reptile", local_sgd_update, local_sgd_samples, weighting="uniform", update="delta",
                    vectorized_step=local_sgd_cohort, summary="Reptile: local SGD, deltas averaged uniformly")
PFEDAVG = Algorithm("pfedavg", local_sgd_update, local_sgd_samples, weighting="samples", update="delta",
                    vectorized_step=local_sgd_cohort, schedule=pfedavg_schedule, configure=pfedavg_configure,
                    summary="Personalized FedAvg: FedAvg, then Reptile fine-tuning with server Adam")


def with_proximal(algorithm: Algorithm, rho: float) -> Algorithm:
    """``algorithm`` with FedAsync's proximal client (Xie et al. 2019, Alg. 1: local SGD on
    f(x) + rho/2 ||x - x_tau||^2), sequential and vectorized; ``rho`` 0 returns it unchanged. Only local-SGD
    clients (``fedavg``, ``reptile``) have that form: any other record raises ConfigError."""
    if not rho:
        return algorithm
    if algorithm.client_step is not local_sgd_update or algorithm.vectorized_step is not local_sgd_cohort:
        raise ConfigError(f"async.proximal_rho = {rho} adds FedAsync's proximal term to local SGD clients "
                          f"(fedavg, reptile), not to algorithm {algorithm.name!r}; set async.proximal_rho = 0")
    return replace(algorithm, client_step=partial(local_sgd_update, rho=rho),
                   vectorized_step=partial(local_sgd_cohort, rho=rho))
