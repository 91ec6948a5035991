"""Vectorized client cohorts: the local work of many clients as one batched computation.

The clients of a cohort start from the same theta, so their parameters are stacked along a new
client dimension and every local step runs for all of them at once with ``torch.func``:
``vmap(grad(loss))`` over (client parameters, client batch). The sequential client steps of
``simulator.algorithms`` are the reference; this path draws the same batch plans from the same
seeded streams and applies the same updates, so its vectors equal the sequential ones up to
floating-point summation order (a test checks allclose for every algorithm):

- FedAvg / Reptile (McMahan et al. 2017, Alg. 1; Nichol et al. 2018, Alg. 2): ``local_steps`` SGD
  steps on all local data, returning phi_i - theta.
- FOMAML / MAML (Finn et al. 2017, Alg. 1 and Sec. 5.2): SGD adaptation on the support split, then
  grad_theta L_query(theta') (MAML differentiates through the inner steps: ``grad`` of a function
  that itself takes ``grad``s, vmapped over clients).
- Per-FedAvg FO / HF (Fallah et al. 2020, Alg. 1, Eqs. 8-10): ``meta_algorithms.per_fedavg_step`` with
  a vmapped gradient oracle, on all local data; the batch streams D, D', D'' are interleaved into one
  index plan (step s uses rows 2s, 2s+1 or 3s, 3s+1, 3s+2).
- Meta-SGD (Li et al. 2017, Alg. 1): like MAML with theta' = theta - alpha o grad L_support, the
  gradient taken with respect to both theta and the learned rates alpha.

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

from simulator.algorithms import Algorithm, Batch, ClientUpdate, batch_plan, local_sgd_update
from simulator.config import AlgorithmConfig
from simulator.data import ClientShard, Split
from simulator.meta_algorithms import metasgd_inner_step, outer_lr, per_fedavg_plans, per_fedavg_step
from simulator.models import stacked_forward

log = logging.getLogger("metafleet.vectorized")

Params = dict[str, torch.Tensor]


#: algorithms with a vectorized client step
VECTORIZED = frozenset({"fedavg", "reptile", "pfedavg", "fomaml", "maml", "perfedavg_fo", "perfedavg_hf", "metasgd"})


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
    if algorithm is not None and algorithm.name not in VECTORIZED:
        return f"algorithm {algorithm.name!r} has no vectorized client step"
    return None


def _pointwise_loss(task: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Per-sample loss (the batch mean of it is the sequential path's loss)."""
    if task == "regression":
        return lambda out, y: ((out - y) ** 2).reshape(out.shape[0], -1).mean(dim=1)
    return lambda out, y: F.cross_entropy(out, y, reduction="none")


@dataclass
class _Group:
    """Clients whose steps have identical shapes: padded data, index plans and masks, stacked."""

    rows: list[int]            # positions in the cohort
    x: torch.Tensor            # k x n_max x ...
    y: torch.Tensor
    mask: torch.Tensor         # k x n_max (1 = real sample)
    plans: torch.Tensor | None  # k x steps x b indices, None = full-batch steps


def _stack(splits: Sequence[Split], plans: Sequence[list[Batch]], rows: list[int]) -> _Group:
    n_max = max(len(s) for s in splits)
    device = splits[0].x.device

    def pad(t: torch.Tensor) -> torch.Tensor:
        extra = n_max - t.shape[0]
        return torch.cat([t, t.new_zeros((extra, *t.shape[1:]))]) if extra else t

    x = torch.stack([pad(s.x) for s in splits])
    y = torch.stack([pad(s.y) for s in splits])
    mask = torch.stack([pad(torch.ones(len(s), device=device)) for s in splits])
    full = plans[0][0] is None if plans[0] else True
    idx = None if full else torch.from_numpy(np.stack([np.stack(p) for p in plans])).to(device)
    return _Group(rows, x, y, mask, idx)


def _key(n: int, batch_size: int) -> int:
    """Group key of a split: -1 for mini-batch steps (any size), else the size itself (full batch)."""
    return -1 if 0 < batch_size < n else n


class VectorizedCohort:
    """Runs a cohort's client steps for one model architecture, vectorized over clients."""

    def __init__(self, model: nn.Module, task: str) -> None:
        self.model = model
        self.names = [n for n, _ in model.named_parameters()]
        self.shapes = [p.shape for p in model.parameters()]
        self.pointwise = _pointwise_loss(task)
        self.stacked = stacked_forward(model)  # a batched-matmul forward for plain MLPs, else None

    # ------------------------------------------------------------------ functional pieces
    def _unflat(self, theta: torch.Tensor, k: int) -> Params:
        out, start = {}, 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            size = int(np.prod(shape))
            out[name] = theta[start:start + size].reshape(shape).expand(k, *shape).clone()
            start += size
        return out

    @staticmethod
    def _flat(params: Params) -> torch.Tensor:
        return torch.cat([p.reshape(p.shape[0], -1) for p in params.values()], dim=1)

    def _batch_loss(self, p: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.pointwise(functional_call(self.model, p, (x,)), y).mean()

    def _masked_loss(self, p: Params, x: torch.Tensor, y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return (self.pointwise(functional_call(self.model, p, (x,)), y) * m).sum() / m.sum()

    def _stacks(self, x: torch.Tensor) -> bool:
        """Whether the stacked forward applies: a plain MLP and (clients, batch, features) inputs."""
        return self.stacked is not None and x.dim() == 3

    def _stacked_rows(self, params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """k x n pointwise losses from the stacked forward."""
        assert self.stacked is not None
        out = self.stacked(params, x)
        k, n = out.shape[:2]
        return self.pointwise(out.reshape(k * n, *out.shape[2:]), y.reshape(k * n, *y.shape[2:])).reshape(k, n)

    @staticmethod
    def _reduce(rows: torch.Tensor, m: torch.Tensor, full: bool) -> torch.Tensor:
        """Each client's step loss from its pointwise losses (as ``_loss_of``): masked or batch mean."""
        return (rows * m).sum(dim=1) / m.sum(dim=1) if full else rows.mean(dim=1)

    def _step_grad(self, full: bool) -> Callable[[Params, torch.Tensor, torch.Tensor, torch.Tensor], Params]:
        """Every client's gradient of its step loss, first order: one backward pass through the stacked
        forward (the gradient of the sum of the clients' losses, of which client j's slice is its own
        gradient), else ``vmap(grad(loss))``."""
        vmapped = vmap(grad(self._loss_of(full)))

        def step(params: Params, x: torch.Tensor, y: torch.Tensor, m: torch.Tensor) -> Params:
            if not self._stacks(x):
                return vmapped(params, x, y, m)
            leaves = {n: t.detach().requires_grad_(True) for n, t in params.items()}
            with torch.enable_grad():
                rows = self._stacked_rows(leaves, x, y)
                grads = torch.autograd.grad(self._reduce(rows, m, full).sum(), list(leaves.values()))
            return dict(zip(leaves, grads, strict=True))

        return step

    def _step_losses(self, params: Params, x: torch.Tensor, y: torch.Tensor, m: torch.Tensor,
                     full: bool) -> torch.Tensor:
        """Every client's step loss (k values), without gradients."""
        with torch.no_grad():
            if not self._stacks(x):
                return vmap(self._loss_of(full))(params, x, y, m)
            return self._reduce(self._stacked_rows(params, x, y), m, full)

    def _loss_of(self, full: bool) -> Callable[..., torch.Tensor]:
        """A step's loss for one client: masked mean over its real samples (full batch) or a batch mean."""
        if full:
            return self._masked_loss
        return lambda p, x, y, m: self._batch_loss(p, x, y)

    def _take(self, g: _Group, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if g.plans is None:
            return g.x, g.y
        idx = g.plans[:, step]
        gather = torch.arange(g.x.shape[0], device=idx.device)[:, None]
        return g.x[gather, idx], g.y[gather, idx]

    def _sgd(self, params: Params, g: _Group, steps: int, lr: float) -> Params:
        """``steps`` SGD steps on fresh copies of ``params``, updated in place as the sequential path does
        (one fused ``_foreach_add_(alpha=-lr)`` per step)."""
        step_grad = self._step_grad(g.plans is None)
        params = {n: p.detach().clone() for n, p in params.items()}
        for s in range(steps):
            x, y = self._take(g, s)
            grads = step_grad(params, x, y, g.mask)
            torch._foreach_add_(list(params.values()), [grads[n] for n in params], alpha=-lr)
        return params

    def _full_losses(self, params: Params, g: _Group, sizes: list[int]) -> list[float]:
        """Each client's mean loss over its own samples, summed over exactly its n_i values (not over
        the padded row), so the figure does not depend on which clients shared the group: ``math.fsum``
        of the float32 values, correctly rounded whatever their order."""
        with torch.no_grad():
            if self._stacks(g.x):
                pointwise = self._stacked_rows(params, g.x, g.y)
            else:
                pointwise = vmap(lambda p, x, y: self.pointwise(functional_call(self.model, p, (x,)), y))(
                    params, g.x, g.y)
        rows = pointwise.tolist()
        return [math.fsum(rows[j][:n]) / n for j, n in enumerate(sizes)]

    # ------------------------------------------------------------------ algorithms
    def local_sgd(self, theta: torch.Tensor, shards: Sequence[ClientShard], rngs: Sequence[np.random.Generator],
                  cfg: AlgorithmConfig) -> list[ClientUpdate]:
        """FedAvg / Reptile client steps for a whole cohort: vectors phi_i - theta."""
        data = [s.all for s in shards]
        plans = [batch_plan(r, len(d), cfg.batch_size, cfg.local_steps) for r, d in zip(rngs, data, strict=True)]
        out: list[ClientUpdate | None] = [None] * len(shards)
        for rows, run in self._groups([_key(len(d), cfg.batch_size) for d in data]):
            g = _stack([data[i] for i in run], [plans[i] for i in run], run)
            sizes = [len(data[i]) for i in run]
            params = self._unflat(theta, len(run))
            before = self._full_losses(params, g, sizes)
            params = {n: p.detach() for n, p in self._sgd(params, g, cfg.local_steps, cfg.local_lr).items()}
            after = self._full_losses(params, g, sizes)
            delta = self._flat(params) - theta
            for j, i in enumerate(rows):
                n = len(data[i])
                processed = sum(n if b is None else len(b) for b in plans[i])
                out[i] = ClientUpdate(delta[j], before[j], after[j], processed)
        return out  # type: ignore[return-value]

    def per_fedavg(self, theta: torch.Tensor, shards: Sequence[ClientShard], rngs: Sequence[np.random.Generator],
                   cfg: AlgorithmConfig, hessian_free: bool) -> list[ClientUpdate]:
        """Per-FedAvg FO / HF client steps for a whole cohort: vectors w_final - theta."""
        data = [s.all for s in shards]
        streams = [per_fedavg_plans(r, len(d), cfg, hessian_free) for r, d in zip(rngs, data, strict=True)]
        m = 3 if hessian_free else 2
        plans = [[b for step in zip(*st, strict=True) for b in step] for st in streams]  # step s: rows m*s ..
        fd_step = cfg.hf_delta if hessian_free else None
        out: list[ClientUpdate | None] = [None] * len(shards)
        for rows, run in self._groups([_key(len(d), cfg.batch_size) for d in data]):
            g = _stack([data[i] for i in run], [plans[i] for i in run], run)
            sizes = [len(data[i]) for i in run]
            params = self._unflat(theta, len(run))
            before = self._full_losses(params, g, sizes)
            step_grad = self._step_grad(g.plans is None)
            for s in range(cfg.local_steps):
                batches = [self._take(g, m * s + j) for j in range(m)]
                params = per_fedavg_step(params, lambda p, which: step_grad(p, *batches[which], g.mask),  # noqa: B023
                                         cfg.local_lr, outer_lr(cfg), fd_step)
            params = {n: p.detach() for n, p in params.items()}
            after = self._full_losses(params, g, sizes)
            delta = self._flat(params) - theta
            for j, i in enumerate(rows):
                processed = sum(len(data[i]) if b is None else len(b) for b in plans[i])
                out[i] = ClientUpdate(delta[j], before[j], after[j], processed)
        return out  # type: ignore[return-value]

    @staticmethod
    def _support_query(shards: Sequence[ClientShard], rngs: Sequence[np.random.Generator], cfg: AlgorithmConfig
                       ) -> tuple[list[Split], list[Split], list[list[Batch]], list[list[Batch]], list[object]]:
        """Support and query splits, their batch plans (drawn in the sequential path's order) and group keys."""
        sup = [s.support for s in shards]
        qry = [s.query for s in shards]
        plans, qplans = [], []
        for r, s, q in zip(rngs, sup, qry, strict=True):  # the sequential path's draw order
            plans.append(batch_plan(r, len(s), cfg.batch_size, cfg.local_steps))
            qplans.append(batch_plan(r, len(q), cfg.batch_size, 1))
        keys: list[object] = [(_key(len(s), cfg.batch_size), _key(len(q), cfg.batch_size))
                              for s, q in zip(sup, qry, strict=True)]
        return sup, qry, plans, qplans, keys

    @staticmethod
    def _processed(sup: Split, qry: Split, plan: list[Batch], qplan: list[Batch]) -> int:
        return (sum(len(sup) if b is None else len(b) for b in plan)
                + (len(qry) if qplan[0] is None else len(qplan[0])))

    def _meta_group(self, sup: list[Split], qry: list[Split], plans: list[list[Batch]], qplans: list[list[Batch]],
                    run: list[int]) -> tuple[_Group, _Group, torch.Tensor, torch.Tensor]:
        """A group's stacked support and query data, and its one query batch (MAML-style steps)."""
        gs = _stack([sup[i] for i in run], [plans[i] for i in run], run)
        gq = _stack([qry[i] for i in run], [qplans[i] for i in run], run)
        return (gs, gq, *self._take(gq, 0))

    def _meta_updates(self, out: list[ClientUpdate | None], rows: list[int], vectors: torch.Tensor,
                      before: torch.Tensor, after: torch.Tensor,
                      data: tuple[list[Split], list[Split], list[list[Batch]], list[list[Batch]]]) -> None:
        """A group's client updates of a MAML-style step, written into ``out`` at their cohort positions."""
        sup, qry, plans, qplans = data
        for j, i in enumerate(rows):
            out[i] = ClientUpdate(vectors[j], float(before[j]), float(after[j].detach()),
                                  self._processed(sup[i], qry[i], plans[i], qplans[i]))

    def metasgd(self, vector: torch.Tensor, shards: Sequence[ClientShard], rngs: Sequence[np.random.Generator],
                cfg: AlgorithmConfig) -> list[ClientUpdate]:
        """Meta-SGD client steps for a whole cohort: [grad_theta ; grad_alpha] L_query(theta'),
        theta' = theta - alpha o grad L_support (second order through the inner steps)."""
        size = sum(int(np.prod(shape)) for shape in self.shapes)
        theta, alpha = vector[:size], vector[size:]
        sup, qry, plans, qplans, keys = self._support_query(shards, rngs, cfg)
        out: list[ClientUpdate | None] = [None] * len(shards)
        for rows, run in self._groups(keys):
            gs, gq, xq, yq = self._meta_group(sup, qry, plans, qplans, run)
            q_loss = self._loss_of(gq.plans is None)
            params, rates = self._unflat(theta, len(run)), self._unflat(alpha, len(run))
            before = self._step_losses(params, xq, yq, gq.mask, gq.plans is None)
            inner = self._loss_of(gs.plans is None)

            def meta_loss(p: Params, a: Params, steps: list[tuple[torch.Tensor, torch.Tensor]], ms: torch.Tensor,
                          xq: torch.Tensor, yq: torch.Tensor, mq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                fast = p
                for x, y in steps:
                    fast = metasgd_inner_step(fast, grad(inner)(fast, x, y, ms), a)  # noqa: B023
                loss = q_loss(fast, xq, yq, mq)  # noqa: B023
                return loss, loss

            xs = [self._take(gs, s) for s in range(cfg.local_steps)]
            (g_theta, g_alpha), after = vmap(grad(meta_loss, argnums=(0, 1), has_aux=True))(
                params, rates, xs, gs.mask, xq, yq, gq.mask)
            vectors = torch.cat([self._flat({n: t.detach() for n, t in gr.items()}) for gr in (g_theta, g_alpha)],
                                dim=1)
            self._meta_updates(out, rows, vectors, before, after, (sup, qry, plans, qplans))
        return out  # type: ignore[return-value]

    def maml(self, theta: torch.Tensor, shards: Sequence[ClientShard], rngs: Sequence[np.random.Generator],
             cfg: AlgorithmConfig, second_order: bool) -> list[ClientUpdate]:
        """FOMAML / MAML client steps for a whole cohort: meta-gradients grad_theta L_query(theta')."""
        sup, qry, plans, qplans, keys = self._support_query(shards, rngs, cfg)
        out: list[ClientUpdate | None] = [None] * len(shards)
        for rows, run in self._groups(keys):
            gs, gq, xq, yq = self._meta_group(sup, qry, plans, qplans, run)
            q_loss = self._loss_of(gq.plans is None)
            params = self._unflat(theta, len(run))
            before = self._step_losses(params, xq, yq, gq.mask, gq.plans is None)
            if second_order:
                xs = [self._take(gs, s) for s in range(cfg.local_steps)]
                meta_loss = self._meta_loss(self._loss_of(gs.plans is None), q_loss, cfg.local_lr)
                grads, after = vmap(grad(meta_loss, has_aux=True))(params, xs, gs.mask, xq, yq, gq.mask)
            else:
                fast = {n: p.detach() for n, p in self._sgd(params, gs, cfg.local_steps, cfg.local_lr).items()}
                grads = self._step_grad(gq.plans is None)(fast, xq, yq, gq.mask)
                after = self._step_losses(fast, xq, yq, gq.mask, gq.plans is None)
            vectors = self._flat({n: t.detach() for n, t in grads.items()})
            self._meta_updates(out, rows, vectors, before, after, (sup, qry, plans, qplans))
        return out  # type: ignore[return-value]

    @staticmethod
    def _meta_loss(inner: Callable[..., torch.Tensor], q_loss: Callable[..., torch.Tensor],
                   lr: float) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
        """One client's MAML objective L_query(theta'), theta' after SGD steps that stay differentiable
        (``grad`` inside ``grad``: second order), returning the loss twice (value and aux)."""

        def meta_loss(p: Params, steps: list[tuple[torch.Tensor, torch.Tensor]], ms: torch.Tensor,
                      xq: torch.Tensor, yq: torch.Tensor, mq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            fast = p
            for x, y in steps:
                g = grad(inner)(fast, x, y, ms)
                fast = {n: fast[n] - lr * g[n] for n in fast}
            loss = q_loss(fast, xq, yq, mq)
            return loss, loss

        return meta_loss

    def run(self, algorithm: Algorithm, theta: torch.Tensor, shards: Sequence[ClientShard],
            rngs: Sequence[np.random.Generator], cfg: AlgorithmConfig) -> list[ClientUpdate]:
        if algorithm.client_step is local_sgd_update:
            return self.local_sgd(theta, shards, rngs, cfg)
        if algorithm.name in ("fomaml", "maml"):
            return self.maml(theta, shards, rngs, cfg, second_order=algorithm.name == "maml")
        if algorithm.name in ("perfedavg_fo", "perfedavg_hf"):
            return self.per_fedavg(theta, shards, rngs, cfg, hessian_free=algorithm.name == "perfedavg_hf")
        if algorithm.name == "metasgd":
            return self.metasgd(theta, shards, rngs, cfg)
        raise ValueError(f"algorithm {algorithm.name!r} has no vectorized client step")  # see unsupported_reason

    @staticmethod
    def _groups(keys: Sequence[object]) -> list[tuple[list[int], list[int]]]:
        """Cohort positions grouped by key (groups in order of first appearance), each with the rows to
        compute: a lone client is computed twice over, because a vmap over one client takes other
        kernels than over several (measured: the last bits differ on CPU), and a client's result must
        not depend on which other clients shared its actor call."""
        groups: dict[object, list[int]] = {}
        for i, k in enumerate(keys):
            groups.setdefault(k, []).append(i)
        return [(rows, rows if len(rows) > 1 else rows * 2) for rows in groups.values()]
