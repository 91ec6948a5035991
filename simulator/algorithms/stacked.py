"""The vectorized engine: the local work of many clients as one batched computation.

The clients of a cohort start from the same theta, so their parameters are stacked along a new client
dimension and every local step runs for all of them at once with ``torch.func`` (``vmap(grad(loss))``
over client parameters and batches), or, for plain MLPs, through one batched-matmul forward pass
(``models.stacked_forward``) whose backward gives every client's own gradient; their plain local SGD
(``fused_sgd``) runs ``mlpsgd.StackedMLPSGD``, the backward written out. ``VectorizedCohort`` holds
the pieces an algorithm's ``vectorized_step`` is written with: stacked data groups, per-client
gradients and losses, SGD steps, full-data losses. Each algorithm's vectorized step lives beside its
sequential step (``fedavg``, ``maml``, ``perfedavg``, ``metasgd``), draws the same batch plans from the
same seeded streams and applies the same updates, so its vectors equal the sequential ones up to
floating-point summation order (a test checks allclose for every algorithm).

Models with recurrent layers (``nn.LSTM``) take the sequential path: torch.func has no batching rule
for their fused kernels, and its per-client fallback loop is slower than the sequential path
(measured on CPU: 20x for LEAF's Shakespeare LSTM, 4 clients).

Clients of different sizes share a group whenever their steps use mini-batches (index plans
then have one shape whatever the local size): local data are zero-padded to the group's largest
client and full-data losses are masked means. Full-batch steps need equal sizes, so such clients
are grouped by size.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from simulator.algorithms.mlpsgd import StackedMLPSGD
from simulator.algorithms.record import Algorithm, ClientUpdate, Plan
from simulator.algorithms.steps import batch_plan, processed
from simulator.config.schema import AlgorithmConfig
from simulator.data.base import ClientShard, Split
from simulator.models import stacked_forward
from simulator.params import Params, flatten, unflatten

log = logging.getLogger("metafleet.vectorized")

#: one group's fused local SGD: (theta, group) -> (k x P deltas, k x n losses before, k x n losses after)
FusedSGD = Callable[[torch.Tensor, "Group"], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def unsupported_reason(model: nn.Module, algorithm: Algorithm | None = None,
                       device: torch.device | None = None) -> str | None:
    """Why ``model`` (with ``algorithm``, on ``device``) should not take the vectorized path (None if it
    should): state besides parameters (batch-norm running statistics), randomness in the forward pass
    (dropout), recurrent layers, convolutions on a CPU, or an algorithm without a vectorized client step."""
    if any(True for _ in model.buffers()):
        return "the model has buffers (e.g. batch-norm statistics), which per-client vmap does not carry"
    if any(isinstance(m, nn.modules.dropout._DropoutNd) for m in model.modules()):
        return "the model uses dropout, whose random masks the sequential path draws differently"
    if any(isinstance(m, nn.RNNBase) for m in model.modules()):
        return ("the model has recurrent layers (nn.LSTM/GRU/RNN): torch.func has no vmap batching rule for their "
                "fused kernels and would loop over the clients one by one, slower than the sequential path")
    if device is not None and device.type == "cpu" and any(isinstance(m, nn.modules.conv._ConvNd)
                                                           for m in model.modules()):
        return ("the model has convolutions and the worker runs on a CPU, where vmap over clients' convolutions "
                "measured 1.3-2.5x slower than one client after another (it is used on a GPU)")
    if algorithm is not None and algorithm.vectorized_step is None:
        return f"algorithm {algorithm.name!r} has no vectorized client step (its record's vectorized_step is None)"
    return None


def pointwise_loss(task: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Per-sample loss (the batch mean of it is the sequential path's loss)."""
    if task == "regression":
        return lambda out, y: ((out - y) ** 2).reshape(out.shape[0], -1).mean(dim=1)
    return lambda out, y: F.cross_entropy(out, y, reduction="none")


@dataclass
class Group:
    """Clients whose steps have identical shapes: padded data, index plans and masks, stacked."""

    rows: list[int]            # positions in the cohort
    x: torch.Tensor            # k x n_max x ...
    y: torch.Tensor
    mask: torch.Tensor         # k x n_max (1 = real sample)
    plans: torch.Tensor | None  # k x steps x b indices, None = full-batch steps


def stack(splits: Sequence[Split], plans: Sequence[Plan], rows: list[int]) -> Group:
    n_max = max(len(s) for s in splits)
    device = splits[0].x.device

    def pad(t: torch.Tensor) -> torch.Tensor:
        extra = n_max - t.shape[0]
        return torch.cat([t, t.new_zeros((extra, *t.shape[1:]))]) if extra else t

    x = torch.stack([pad(s.x) for s in splits])
    y = torch.stack([pad(s.y) for s in splits])
    sizes = torch.tensor([len(s) for s in splits], device=device)
    mask = (torch.arange(n_max, device=device) < sizes[:, None]).to(torch.float32)
    full = len(plans[0]) == 0 or plans[0][0] is None
    idx = None if full else torch.from_numpy(np.asarray(plans)).to(device)
    return Group(rows, x, y, mask, idx)


def group_key(n: int, batch_size: int) -> int:
    """Group key of a split: -1 for mini-batch steps (any size), else the size itself (full batch)."""
    return -1 if 0 < batch_size < n else n


class VectorizedCohort:
    """Runs a cohort's client steps for one model architecture, vectorized over clients."""

    def __init__(self, model: nn.Module, task: str) -> None:
        self.model = model
        self.names = [n for n, _ in model.named_parameters()]
        self.shapes = [p.shape for p in model.parameters()]
        self.pointwise = pointwise_loss(task)
        self.stacked = stacked_forward(model)  # a batched-matmul forward for plain MLPs, else None
        self.mlp = StackedMLPSGD.build(model, task)  # local SGD with a written-out backward, plain MLPs

    # ------------------------------------------------------------------ functional pieces
    def expand(self, theta: torch.Tensor, k: int) -> Params:
        """The flat vector ``theta`` as one tensor per parameter with a leading dimension of k clients (copies)."""
        return unflatten(self.model, theta, k)

    @staticmethod
    def rows(params: Params) -> torch.Tensor:
        """Stacked per-client parameters (or gradients) as one flat vector per client: k x P."""
        return flatten(params, clients=True)

    def batch_loss(self, p: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.pointwise(functional_call(self.model, p, (x,)), y).mean()

    def masked_loss(self, p: Params, x: torch.Tensor, y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return (self.pointwise(functional_call(self.model, p, (x,)), y) * m).sum() / m.sum()

    def stacks(self, x: torch.Tensor) -> bool:
        """Whether the stacked forward applies: a plain MLP and (clients, batch, features) inputs."""
        return self.stacked is not None and x.dim() == 3

    def stacked_rows(self, params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """k x n pointwise losses from the stacked forward."""
        assert self.stacked is not None
        out = self.stacked(params, x)
        k, n = out.shape[:2]
        return self.pointwise(out.reshape(k * n, *out.shape[2:]), y.reshape(k * n, *y.shape[2:])).reshape(k, n)

    @staticmethod
    def reduce(rows: torch.Tensor, m: torch.Tensor, full: bool) -> torch.Tensor:
        """Each client's step loss from its pointwise losses (as ``loss_of``): masked or batch mean."""
        return (rows * m).sum(dim=1) / m.sum(dim=1) if full else rows.mean(dim=1)

    def step_grad(self, full: bool) -> Callable[[Params, torch.Tensor, torch.Tensor, torch.Tensor], Params]:
        """Every client's gradient of its step loss, first order: one backward pass through the stacked
        forward (the gradient of the sum of the clients' losses, of which client j's slice is its own
        gradient), else ``vmap(grad(loss))``."""
        vmapped = vmap(grad(self.loss_of(full)))

        def step(params: Params, x: torch.Tensor, y: torch.Tensor, m: torch.Tensor) -> Params:
            if not self.stacks(x):
                return vmapped(params, x, y, m)
            leaves = {n: t.detach().requires_grad_(True) for n, t in params.items()}
            with torch.enable_grad():
                rows = self.stacked_rows(leaves, x, y)
                grads = torch.autograd.grad(self.reduce(rows, m, full).sum(), list(leaves.values()))
            return dict(zip(leaves, grads, strict=True))

        return step

    def step_losses(self, params: Params, x: torch.Tensor, y: torch.Tensor, m: torch.Tensor,
                     full: bool) -> torch.Tensor:
        """Every client's step loss (k values), without gradients."""
        with torch.no_grad():
            if not self.stacks(x):
                return vmap(self.loss_of(full))(params, x, y, m)
            return self.reduce(self.stacked_rows(params, x, y), m, full)

    def loss_of(self, full: bool) -> Callable[..., torch.Tensor]:
        """A step's loss for one client: masked mean over its real samples (full batch) or a batch mean."""
        if full:
            return self.masked_loss
        return lambda p, x, y, m: self.batch_loss(p, x, y)

    def take(self, g: Group, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if g.plans is None:
            return g.x, g.y
        idx = g.plans[:, step]
        gather = torch.arange(g.x.shape[0], device=idx.device)[:, None]
        return g.x[gather, idx], g.y[gather, idx]

    def sgd(self, params: Params, g: Group, steps: int, lr: float, rho: float = 0.0) -> Params:
        """``steps`` SGD steps on fresh copies of ``params``, updated in place as the sequential path does
        (one fused ``_foreach_add_(alpha=-lr)`` per step); ``rho`` > 0 adds FedAsync's proximal gradient
        rho (w - w_0) as ``steps.inner_loop`` does (Xie et al. 2019, Alg. 1)."""
        step_grad = self.step_grad(g.plans is None)
        params = {n: p.detach().clone() for n, p in params.items()}
        anchor = [p.clone() for p in params.values()] if rho else None
        for s in range(steps):
            x, y = self.take(g, s)
            grads = step_grad(params, x, y, g.mask)
            ordered = [grads[n] for n in params]
            if anchor is not None:
                ordered = torch._foreach_add(ordered, torch._foreach_sub(list(params.values()), anchor), alpha=rho)
            torch._foreach_add_(list(params.values()), ordered, alpha=-lr)
        return params

    def full_losses(self, params: Params, g: Group, sizes: list[int]) -> list[float]:
        """Each client's mean loss over its own samples (``client_means`` of the per-sample losses)."""
        with torch.no_grad():
            if self.stacks(g.x):
                pointwise = self.stacked_rows(params, g.x, g.y)
            else:
                pointwise = vmap(lambda p, x, y: self.pointwise(functional_call(self.model, p, (x,)), y))(
                    params, g.x, g.y)
        return self.client_means(pointwise, sizes)

    @staticmethod
    def client_means(pointwise: torch.Tensor, sizes: list[int]) -> list[float]:
        """Each client's mean of its k x n_max per-sample losses, summed over exactly its n_i values (not over
        the padded row), so the figure does not depend on which clients shared the group: ``math.fsum``
        of the float32 values, correctly rounded whatever their order."""
        rows = pointwise.tolist()
        return [math.fsum(rows[j][:n]) / n for j, n in enumerate(sizes)]

    def fused_sgd(self, steps: int, lr: float) -> FusedSGD | None:
        """Plain local SGD (no proximal term) through ``StackedMLPSGD`` where the model is a plain MLP,
        for ``delta_updates``' ``fused``; None for any other model."""
        if self.mlp is None:
            return None
        mlp = self.mlp
        return lambda theta, g: mlp.local_sgd(theta, g.x, g.y, g.plans, steps, lr)

    def delta_updates(self, theta: torch.Tensor, data: list[Split], plans: list[Plan], batch_size: int,
                      local: Callable[[Params, Group], Params], fused: FusedSGD | None = None) -> list[ClientUpdate]:
        """Client steps that start from theta on each client's whole local data and return w_final - theta
        (FedAvg, Reptile, Per-FedAvg): ``local(params, group)`` runs one group's steps on its stacked
        parameters; the full-data losses before and after, and the updates, are written here. ``fused``
        (``fused_sgd``), where the stacked forward applies, replaces all of that: deltas and per-sample
        losses from one call."""
        out: list[ClientUpdate | None] = [None] * len(data)
        for rows, run in self.groups([group_key(len(d), batch_size) for d in data]):
            g = stack([data[i] for i in run], [plans[i] for i in run], run)
            sizes = [len(data[i]) for i in run]
            if fused is not None and self.stacks(g.x):
                with torch.no_grad():
                    delta, pre, post = fused(theta, g)
                before, after = self.client_means(pre, sizes), self.client_means(post, sizes)
            else:
                params = self.expand(theta, len(run))
                before = self.full_losses(params, g, sizes)
                params = {n: p.detach() for n, p in local(params, g).items()}
                after = self.full_losses(params, g, sizes)
                delta = self.rows(params) - theta
            for i, vector, b, a in zip(rows, delta.unbind(0), before, after, strict=False):  # a lone client: 2 rows
                out[i] = ClientUpdate(vector, b, a, processed(len(data[i]), plans[i]))
        return out  # type: ignore[return-value]

    @staticmethod
    def support_query(shards: Sequence[ClientShard], rngs: Sequence[np.random.Generator], cfg: AlgorithmConfig
                       ) -> tuple[list[Split], list[Split], list[Plan], list[Plan], list[object]]:
        """Support and query splits, their batch plans (drawn in the sequential path's order) and group keys."""
        sup = [s.support for s in shards]
        qry = [s.query for s in shards]
        plans, qplans = [], []
        for r, s, q in zip(rngs, sup, qry, strict=True):  # the sequential path's draw order
            plans.append(batch_plan(r, len(s), cfg.batch_size, cfg.local_steps))
            qplans.append(batch_plan(r, len(q), cfg.batch_size, 1))
        keys: list[object] = [(group_key(len(s), cfg.batch_size), group_key(len(q), cfg.batch_size))
                              for s, q in zip(sup, qry, strict=True)]
        return sup, qry, plans, qplans, keys

    def meta_group(self, sup: list[Split], qry: list[Split], plans: list[Plan], qplans: list[Plan],
                    run: list[int]) -> tuple[Group, Group, torch.Tensor, torch.Tensor]:
        """A group's stacked support and query data, and its one query batch (MAML-style steps)."""
        gs = stack([sup[i] for i in run], [plans[i] for i in run], run)
        gq = stack([qry[i] for i in run], [qplans[i] for i in run], run)
        return (gs, gq, *self.take(gq, 0))

    def meta_updates(self, out: list[ClientUpdate | None], rows: list[int], vectors: torch.Tensor,
                      before: torch.Tensor, after: torch.Tensor,
                      data: tuple[list[Split], list[Split], list[Plan], list[Plan]]) -> None:
        """A group's client updates of a MAML-style step, written into ``out`` at their cohort positions."""
        sup, qry, plans, qplans = data
        for j, i in enumerate(rows):
            out[i] = ClientUpdate(vectors[j], float(before[j]), float(after[j].detach()),
                                  processed(len(sup[i]), plans[i]) + processed(len(qry[i]), qplans[i]))

    def run(self, algorithm: Algorithm, theta: torch.Tensor, shards: Sequence[ClientShard],
            rngs: Sequence[np.random.Generator], cfg: AlgorithmConfig) -> list[ClientUpdate]:
        """The algorithm's vectorized step for these clients (``unsupported_reason`` says when it has none)."""
        if algorithm.vectorized_step is None:
            raise ValueError(f"algorithm {algorithm.name!r} has no vectorized client step")
        return algorithm.vectorized_step(self, theta, shards, rngs, cfg)

    @staticmethod
    def groups(keys: Sequence[object]) -> list[tuple[list[int], list[int]]]:
        """Cohort positions grouped by key (groups in order of first appearance), each with the rows to
        compute: a lone client is computed twice over, because a vmap over one client takes other
        kernels than over several (measured: the last bits differ on CPU), and a client's result must
        not depend on which other clients shared its actor call."""
        groups: dict[object, list[int]] = {}
        for i, k in enumerate(keys):
            groups.setdefault(k, []).append(i)
        return [(rows, rows if len(rows) > 1 else rows * 2) for rows in groups.values()]
