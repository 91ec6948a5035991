"""Client steps and server steps of FedAvg, Reptile, first-order MAML, MAML and Personalized FedAvg.

Every algorithm is a pair of pure functions: a *client step* maps (global parameters theta,
one client's shard, its batch plan) to an update vector, and the *server step* turns the
weighted mean of the cohort's vectors into a pseudo-gradient g that the server optimizer
applies (theta <- theta - server_lr * g for SGD; Adam as in FedOpt, Reddi et al. 2021).

Data use. FedAvg and Reptile train on all of a training client's local data (support and
query splits together); FOMAML and MAML adapt on the support split and take the meta-gradient
on the query split, as in FedMeta (Chen et al. 2018, Alg. 1). Held-out clients only ever
adapt on support and are scored on query (``simulator.evaluation``).

The rest of the meta-learning family (Per-FedAvg, Meta-SGD) lives in ``simulator.meta_algorithms``,
which registers itself in ``ALGORITHMS`` when this module is imported. Personalized FedAvg (Jiang
et al. 2019) needs no client step of its own: its two phases are a server-side switch in
``ServerOptimizer``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from simulator.config import AlgorithmConfig
from simulator.data import ClientShard, Split
from simulator.models import load_flat

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Batch = np.ndarray | None  # indices into a split; None = the whole split


def loss_function(task: str) -> LossFn:
    return F.mse_loss if task == "regression" else F.cross_entropy


def batch_plan(rng: np.random.Generator, n: int, batch_size: int, steps: int) -> list[Batch]:
    """Mini-batch indices for ``steps`` SGD steps: consecutive epochs of seeded permutations.

    ``batch_size`` 0 or >= n means full-batch steps.
    """
    if batch_size <= 0 or batch_size >= n or steps == 0:
        return [None] * steps
    epochs = -(-steps * batch_size // n)
    order = np.concatenate([rng.permutation(n) for _ in range(epochs)])
    return [order[i * batch_size:(i + 1) * batch_size] for i in range(steps)]


def take(split: Split, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    if batch is None:
        return split.x, split.y
    idx = torch.from_numpy(batch).to(split.x.device)
    return split.x[idx], split.y[idx]


def sgd_steps(model: nn.Module, data: Split, plan: Sequence[Batch], lr: float | Sequence[torch.Tensor],
              loss: LossFn) -> None:
    """Plain SGD in place on the model's parameters: p <- p - lr * grad L_batch(p), one step per batch.

    ``lr`` is one rate, or one tensor per parameter (shaped like it) for Meta-SGD's elementwise
    learned rates p <- p - alpha o grad L (Li et al. 2017, Eq. 1)."""
    params = list(model.parameters())
    for batch in plan:
        x, y = take(data, batch)
        grads = torch.autograd.grad(loss(model(x), y), params)
        with torch.no_grad():
            if isinstance(lr, int | float):
                torch._foreach_add_(params, grads, alpha=-lr)
            else:
                torch._foreach_sub_(params, torch._foreach_mul(grads, list(lr)))


def full_loss(model: nn.Module, data: Split, loss: LossFn) -> float:
    with torch.no_grad():
        return float(loss(model(data.x), data.y))


@dataclass(frozen=True)
class ClientUpdate:
    """One client's contribution: ``vector`` is a delta (FedAvg, Reptile) or a meta-gradient (MAML)."""

    vector: torch.Tensor
    loss_before: float
    loss_after: float
    samples_processed: int


def _vector(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([p.reshape(-1) for p in model.parameters()])


def local_sgd_update(model: nn.Module, theta: torch.Tensor, shard: ClientShard, cfg: AlgorithmConfig,
                     rng: np.random.Generator, loss: LossFn) -> ClientUpdate:
    """FedAvg (McMahan et al. 2017, Alg. 1) and Reptile (Nichol et al. 2018, Alg. 2) client step.

    Starting from theta, run ``local_steps`` SGD steps on the client's data to reach phi_i and
    return the delta phi_i - theta. FedAvg's server weights deltas by sample count n_i, Reptile's
    uses equal weights; both then move theta <- theta + server_lr * mean(delta).
    """
    data = shard.all
    plan = batch_plan(rng, len(data), cfg.batch_size, cfg.local_steps)
    load_flat(model, theta)
    before = full_loss(model, data, loss)
    sgd_steps(model, data, plan, cfg.local_lr, loss)
    after = full_loss(model, data, loss)
    processed = sum(len(data) if b is None else len(b) for b in plan)
    return ClientUpdate(_vector(model) - theta.to(data.x.device), before, after, processed)


def meta_batches(model: nn.Module, theta: torch.Tensor, shard: ClientShard, cfg: AlgorithmConfig,
                 rng: np.random.Generator, loss: LossFn) -> tuple[list[Batch], torch.Tensor, torch.Tensor, float, int]:
    """What MAML-style client steps share: ``local_steps`` support batches, one query batch (x, y),
    the query loss at theta (loaded into ``model``) and the samples the step will process."""
    plan = batch_plan(rng, len(shard.support), cfg.batch_size, cfg.local_steps)
    (query_batch,) = batch_plan(rng, len(shard.query), cfg.batch_size, 1)
    xq, yq = take(shard.query, query_batch)
    load_flat(model, theta)
    with torch.no_grad():
        before = float(loss(model(xq), yq))
    processed = sum(len(shard.support) if b is None else len(b) for b in plan) + len(xq)
    return plan, xq, yq, before, processed


def maml_update(model: nn.Module, theta: torch.Tensor, shard: ClientShard, cfg: AlgorithmConfig,
                rng: np.random.Generator, loss: LossFn, second_order: bool) -> ClientUpdate:
    """MAML (Finn et al. 2017, Alg. 1 / Eq. 1) client step in federated form (FedMeta, Chen et al. 2018).

    Adapt theta' = theta - alpha * grad L_support(theta), repeated ``local_steps`` times on
    support batches, then return the meta-gradient grad_theta L_query(theta'). Second-order MAML
    differentiates through the inner updates (create_graph); first-order MAML (FOMAML, Finn et
    al. 2017 Sec. 5.2) drops the second-order terms and returns grad L_query evaluated at theta'.
    """
    device = shard.support.x.device
    plan, xq, yq, before, processed = meta_batches(model, theta, shard, cfg, rng, loss)
    if not second_order:
        sgd_steps(model, shard.support, plan, cfg.local_lr, loss)
        query_loss = loss(model(xq), yq)
        grads = torch.autograd.grad(query_loss, list(model.parameters()))
    else:
        names = [n for n, _ in model.named_parameters()]
        leaves = [p.detach().requires_grad_(True) for p in model.parameters()]
        fast = dict(zip(names, leaves, strict=True))
        for batch in plan:
            x, y = take(shard.support, batch)
            inner = torch.autograd.grad(loss(functional_call(model, fast, (x,)), y), list(fast.values()),
                                        create_graph=True)
            fast = {n: p - cfg.local_lr * g for (n, p), g in zip(fast.items(), inner, strict=True)}
        query_loss = loss(functional_call(model, fast, (xq,)), yq)
        grads = torch.autograd.grad(query_loss, leaves)
    vector = torch.cat([g.reshape(-1) for g in grads]).detach()
    return ClientUpdate(vector.to(device), before, float(query_loss.detach()), processed)


ClientStep = Callable[[nn.Module, torch.Tensor, ClientShard, AlgorithmConfig, np.random.Generator, LossFn],
                      ClientUpdate]


SamplesFn = Callable[[AlgorithmConfig, int, int], int]


@dataclass(frozen=True)
class Algorithm:
    """``weighting``: "samples" (n_i) or "uniform"; ``update``: "delta" (g = -mean) or "gradient" (g = mean).

    ``samples(cfg, n_support, n_query)``: the samples a client step processes (None: the rule of
    FedAvg/Reptile or of (FO)MAML, see ``planned_samples``). ``learns_lr``: the server vector is
    [theta ; alpha], alpha a learned per-parameter inner learning rate (Meta-SGD)."""

    name: str
    client_step: ClientStep
    weighting: str
    update: str
    samples: SamplesFn | None = None
    learns_lr: bool = False


ALGORITHMS: dict[str, Algorithm] = {
    "fedavg": Algorithm("fedavg", local_sgd_update, "samples", "delta"),
    "reptile": Algorithm("reptile", local_sgd_update, "uniform", "delta"),
    "fomaml": Algorithm("fomaml", partial(maml_update, second_order=False), "uniform", "gradient"),
    "maml": Algorithm("maml", partial(maml_update, second_order=True), "uniform", "gradient"),
    # Personalized FedAvg (Jiang et al. 2019): FedAvg until switch_round, then Reptile (ServerOptimizer)
    "pfedavg": Algorithm("pfedavg", local_sgd_update, "samples", "delta"),
}


def batch_samples(cfg: AlgorithmConfig, n: int, count: int) -> int:
    """Samples in ``count`` batches drawn by ``batch_plan`` from a split of n samples."""
    return count * (n if cfg.batch_size <= 0 or cfg.batch_size >= n else cfg.batch_size)


def planned_samples(algorithm: Algorithm, cfg: AlgorithmConfig, n_support: int, n_query: int) -> int:
    """Samples a client step will process (forward/backward), known before it runs: the driver
    turns it into simulated compute time at dispatch. Equals ``ClientUpdate.samples_processed``."""

    if algorithm.samples is not None:
        return algorithm.samples(cfg, n_support, n_query)
    if algorithm.client_step is local_sgd_update:
        return batch_samples(cfg, n_support + n_query, cfg.local_steps)
    return batch_samples(cfg, n_support, cfg.local_steps) + batch_samples(cfg, n_query, 1)


def client_weight(algorithm: Algorithm, num_samples: int) -> float:
    return float(num_samples) if algorithm.weighting == "samples" else 1.0


def pseudo_gradient(algorithm: Algorithm, mean_vector: torch.Tensor) -> torch.Tensor:
    """The server's descent direction: -mean(delta) for FedAvg/Reptile, mean meta-gradient for MAML."""
    return -mean_vector if algorithm.update == "delta" else mean_vector


@dataclass(frozen=True)
class ServerState:
    """The server's model and optimizer moments; ``step`` counts applied server updates."""

    theta: torch.Tensor
    step: int = 0
    momentum: torch.Tensor | None = None   # SGD momentum buffer
    exp_avg: torch.Tensor | None = None    # Adam first moment
    exp_avg_sq: torch.Tensor | None = None  # Adam second moment


def sgd_step(state: ServerState, g: torch.Tensor, lr: float, momentum: float = 0.0) -> ServerState:
    """theta <- theta - lr * b, b = momentum * b + g (b = g when momentum is 0; FedAvgM, Hsu et al. 2019)."""
    buf = g if momentum == 0 or state.momentum is None else momentum * state.momentum + g
    return ServerState(state.theta - lr * buf, state.step + 1, buf if momentum else None)


def adam_step(state: ServerState, g: torch.Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999),
              eps: float = 1e-8) -> ServerState:
    """Adam (Kingma & Ba 2015, Alg. 1) on the pseudo-gradient: FedAdam (Reddi et al. 2021, Alg. 2).

    m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2;  theta <- theta - lr * m_hat / (sqrt(v_hat) + eps).
    """
    b1, b2 = betas
    t = state.step + 1
    m = (1 - b1) * g if state.exp_avg is None else b1 * state.exp_avg + (1 - b1) * g
    v = (1 - b2) * g * g if state.exp_avg_sq is None else b2 * state.exp_avg_sq + (1 - b2) * g * g
    m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
    return ServerState(state.theta - lr * m_hat / (v_hat.sqrt() + eps), t, None, m, v)


def initial_vector(cfg: AlgorithmConfig, model_vector: torch.Tensor) -> torch.Tensor:
    """The server's initial vector: the model's flat parameters (plus, for algorithms that
    meta-learn more than an initialization, their extra parameters).

    Meta-SGD (Li et al. 2017, Sec. 3): [theta ; alpha], alpha = ``local_lr`` for every parameter."""
    if ALGORITHMS[cfg.name].learns_lr:
        return torch.cat([model_vector, torch.full_like(model_vector, cfg.local_lr)])
    return model_vector


def vector_size(algorithm: Algorithm, num_params: int) -> int:
    """Length of the vector the server keeps and sends for a model of ``num_params`` parameters."""
    return 2 * num_params if algorithm.learns_lr else num_params


def split_vector(algorithm: Algorithm, vector: torch.Tensor, num_params: int) -> tuple[torch.Tensor,
                                                                                       torch.Tensor | None]:
    """(model parameters theta, learned rates alpha or None) of a server vector; checks its length."""
    expected = vector_size(algorithm, num_params)
    if vector.numel() != expected:
        raise ValueError(f"{algorithm.name}: the vector has {vector.numel()} values, expected {expected} "
                         f"for a model of {num_params} parameters")
    if algorithm.learns_lr:
        return vector[:num_params], vector[num_params:]
    return vector, None


class ServerOptimizer:
    """The server side of an algorithm: client weighting and the server step (SGD with optional
    momentum, or Adam: FedOpt) applied to a ``ServerState``; ``state.step`` is the model version.

    Personalized FedAvg (Jiang, Konecny, Rush, Kannan 2019, Sec. 3 / Alg. 1) switches algorithm
    at model version ``switch_round``: before it, FedAvg with server momentum SGD (weights n_i,
    ``server_lr``, ``server_momentum``); from it on, Reptile fine-tuning (uniform weights) with
    server Adam at ``finetune_server_lr`` whose moments and bias-correction count start afresh
    (Adam's t = version - switch_round + 1). The phase is a function of ``state.step`` alone, so a
    state replaced from outside (FedAsync, a resumed checkpoint) keeps it."""

    def __init__(self, theta: torch.Tensor, cfg: AlgorithmConfig) -> None:
        self.cfg = cfg
        self.algo = ALGORITHMS[cfg.name]
        self.state = ServerState(theta.detach().clone())

    @property
    def finetuning(self) -> bool:
        """pfedavg: the current model version is in the Reptile fine-tuning phase."""
        return self.algo.name == "pfedavg" and self.state.step >= self.cfg.switch_round

    def client_weight(self, num_samples: int) -> float:
        """Aggregation weight of a client update applied at the current model version."""
        return 1.0 if self.finetuning else client_weight(self.algo, num_samples)

    def step(self, g: torch.Tensor) -> torch.Tensor:
        g = g.to(self.state.theta.dtype)
        if self.finetuning:
            st = self.state
            fresh = st.step == self.cfg.switch_round  # the first fine-tuning step: Adam starts afresh
            phase = ServerState(st.theta, st.step - self.cfg.switch_round, None,
                                None if fresh else st.exp_avg, None if fresh else st.exp_avg_sq)
            new = adam_step(phase, g, self.cfg.finetune_server_lr)
            self.state = ServerState(new.theta, st.step + 1, None, new.exp_avg, new.exp_avg_sq)
        elif self.cfg.server_optimizer == "adam":
            self.state = adam_step(self.state, g, self.cfg.server_lr)
        else:
            self.state = sgd_step(self.state, g, self.cfg.server_lr, self.cfg.server_momentum)
        return self.params

    @property
    def params(self) -> torch.Tensor:
        return self.state.theta.clone()


# the meta-learning family builds on the primitives above and registers itself in ALGORITHMS
import simulator.meta_algorithms  # noqa: E402, F401
