"""First-order local SGD of a cohort of plain MLPs with the backward pass written out: the GEMMs and little else.

The client step of FedAvg (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data", Alg. 1 ClientUpdate) and Reptile (Nichol et al. 2018, Alg. 2) is ``local_steps`` SGD
steps w <- w - lr grad L_batch(w) from the server model theta. For k clients of a plain MLP
(``simulator.models.mlp_layers``) stacked along a leading client dimension, this module computes those steps
with batched GEMMs and the backpropagation equations of a dense layer z = h W^T + b (Rumelhart, Hinton and
Williams 1986):

    dL/dW = dz^T h,   dL/db = sum over the batch of dz,   dL/dh = dz W,

with dz = (softmax(z) - onehot(y)) / b at the output for the cross-entropy (b: the batch size) and
dz = 2 (z - y) / (b d) for the mean squared error of d outputs. Against autograd through the stacked forward
(``VectorizedCohort.step_grad``) it removes what surrounds the GEMMs on small layers:

- the update is fused into the weight-gradient GEMM (``W.baddbmm_(dz^T, h, alpha=-lr)``: no gradient tensor,
  no separate ``add_`` over every parameter);
- the full-data loss before local work shares the first step's forward pass: theta is the same for every
  client, so it is one stride-0 view for all of them (no per-client copy), and the first step's batch rows
  are gathered from that pass's activations;
- the first step writes its result into fresh tensors (the per-client copy of theta is that step's output);
- the first layer's weight is held transposed (in x out), the layout its two GEMMs run fastest in, and the
  softmax and log-sum-exp are written out (``torch.log_softmax`` over 10 classes measured 5x slower).

Each GEMM is a ``bmm`` over clients of one shape, so a client's bits do not depend on its chunk-mates
(``VectorizedCohort.groups`` still doubles a lone client). The results equal the sequential path's up to
floating-point summation order (tests/simulator/test_vectorized.py).
"""

from __future__ import annotations

import torch
from torch import nn

from simulator.models import mlp_layers
from simulator.params import Params

#: activations whose backward is one aten kernel of their output (ReLU's is what autograd itself runs)
_FROM_OUTPUT = {
    nn.ReLU: lambda g, out: torch.ops.aten.threshold_backward(g, out, 0),
    nn.Tanh: torch.ops.aten.tanh_backward,
    nn.Sigmoid: torch.ops.aten.sigmoid_backward,
    nn.Identity: lambda g, out: g,
}


def activation_backward(module: nn.Module, grad: torch.Tensor, inp: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """dL/d(input) of an elementwise activation from dL/d(output): a kernel of the output where there is one,
    else autograd through the module (GELU, SiLU, ELU, LeakyReLU, Softplus)."""
    from_output = _FROM_OUTPUT.get(type(module))
    if from_output is not None:
        return from_output(grad, out)
    with torch.enable_grad():
        z = inp.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(module(z), z, grad)
    return g


class StackedMLPSGD:
    """Local SGD of k clients of one plain MLP at once (see the module docstring)."""

    def __init__(self, model: nn.Module, task: str, layers: list[tuple[str, str | None] | nn.Module]) -> None:
        self.layers = layers
        self.regression = task == "regression"
        self.shapes = {n: p.shape for n, p in model.named_parameters()}
        first = next(layer for layer in layers if isinstance(layer, tuple))
        self.transposed = first[0]  # held in x out: its forward and weight-gradient GEMMs are faster so
        #: whether layer i's saved input is layer i - 1's (an in-place ReLU's input is its output)
        self.aliases = [i > 0 and type(layers[i - 1]) is nn.ReLU for i in range(len(layers))]

    @classmethod
    def build(cls, model: nn.Module, task: str) -> StackedMLPSGD | None:
        """The engine for ``model``, or None when it is not a plain MLP (or has an in-place activation other
        than ReLU, whose saved input the forward pass would overwrite)."""
        layers = mlp_layers(model)
        if layers is None or any(isinstance(m, nn.Module) and type(m) is not nn.ReLU and getattr(m, "inplace", False)
                                 for m in layers):
            return None
        return cls(model, task, layers)

    # ------------------------------------------------------------------ pieces
    def shared(self, theta: torch.Tensor, k: int) -> Params:
        """theta as k clients' parameters: stride-0 views (the transposed first weight: one small copy)."""
        out, start = {}, 0
        for name, shape in self.shapes.items():
            piece = theta[start:start + shape.numel()].view(shape)
            if name == self.transposed:
                piece = piece.t().contiguous()
            out[name] = piece.expand(k, *piece.shape)
            start += shape.numel()
        return out

    def forward(self, params: Params, h: torch.Tensor, saved: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The stacked forward pass, (k, batch, in) -> (k, batch, out); ``saved`` collects every layer's input."""
        for layer in self.layers:
            if saved is not None:
                saved.append(h)
            if isinstance(layer, tuple):
                w = params[layer[0]] if layer[0] == self.transposed else params[layer[0]].transpose(1, 2)
                h = torch.bmm(h, w) if layer[1] is None else torch.baddbmm(params[layer[1]].unsqueeze(1), h, w)
            elif type(layer) is nn.ReLU:  # in place on the GEMM's fresh output: its backward needs the output only
                h = h.clamp_min_(0)
            else:
                h = layer(h)
        return h

    def pointwise(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """k x n per-sample losses: squared error averaged over outputs, or the cross-entropy
        logsumexp(z) - z_y with the log-sum-exp written out (max-shifted)."""
        if self.regression:
            return ((out - y) ** 2).reshape(out.shape[0], out.shape[1], -1).mean(dim=2)
        top = out.amax(dim=-1, keepdim=True)
        lse = (out - top).exp_().sum(dim=-1).log_().add_(top.squeeze(-1))
        return lse.sub_(out.gather(-1, y.unsqueeze(-1)).squeeze(-1))

    def targets(self, y: torch.Tensor, classes: int, dtype: torch.dtype) -> torch.Tensor:
        """What the output gradient subtracts: one-hot labels (classification) or the targets themselves."""
        if self.regression:
            return y
        return torch.zeros(*y.shape, classes, dtype=dtype, device=y.device).scatter_(-1, y.unsqueeze(-1), 1.0)

    def output_grad(self, out: torch.Tensor, target: torch.Tensor, scale: float) -> torch.Tensor:
        """dL/dz of the batch-mean loss, ``scale`` = 1 / batch size."""
        if self.regression:
            return (out - target).mul_(2.0 * scale / out[0, 0].numel())
        e = (out - out.amax(dim=-1, keepdim=True)).exp_()
        return e.div_(e.sum(dim=-1, keepdim=True)).sub_(target).mul_(scale)

    def step(self, params: Params, saved: list[torch.Tensor], out: torch.Tensor, target: torch.Tensor,
             lr: float, scale: float, fresh: bool) -> Params:
        """One SGD step of every client, back to front; ``fresh``: ``params`` are shared views of theta, so the
        step writes new tensors (else it updates them in place)."""
        new = dict(params)
        outputs = [*saved[1:], out]
        dz = self.output_grad(out, target, scale)
        for i in range(len(self.layers) - 1, -1, -1):
            layer, h = self.layers[i], saved[i]
            if not isinstance(layer, tuple):
                dz = activation_backward(layer, dz, h, outputs[i])
                continue
            wn, bn = layer
            w = params[wn]
            flipped = wn == self.transposed
            dh = torch.bmm(dz, w.transpose(1, 2) if flipped else w) if i > 0 else None  # before w changes
            a, b = (h.transpose(1, 2), dz) if flipped else (dz.transpose(1, 2), h)
            if fresh:
                new[wn] = torch.baddbmm(w, a, b, alpha=-lr)
            else:
                w.baddbmm_(a, b, alpha=-lr)
            if bn is not None:
                if fresh:
                    new[bn] = torch.add(params[bn], dz.sum(dim=1), alpha=-lr)
                else:
                    params[bn].add_(dz.sum(dim=1), alpha=-lr)
            if dh is not None:
                dz = dh
        return new

    # ------------------------------------------------------------------ the client step
    def local_sgd(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, plans: torch.Tensor | None,
                  steps: int, lr: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``steps`` SGD steps of k clients from theta on their stacked data ``x`` (k x n x in, zero-padded),
        ``y``, with batch indices ``plans`` (k x steps x b; None: full-batch steps, equal sizes). Returns the
        k x P deltas w_final - theta (in ``model.named_parameters()`` order) and the k x n per-sample losses
        before and after."""
        k, n = x.shape[:2]
        params = self.shared(theta, k)
        saved: list[torch.Tensor] = []
        out = self.forward(params, x, saved)
        before = self.pointwise(out, y)
        if plans is None:  # full batch: every step on all of x
            xs, ts = [x] * steps, [self.targets(y, out.shape[-1], out.dtype)] * steps
            scale = 1.0 / n
        else:  # every step's batch rows, gathered at once: row j * n + i of the flattened data
            b = plans.shape[2]
            flat = (plans + n * torch.arange(k, device=x.device)[:, None, None]).transpose(0, 1).reshape(-1)
            xs = x.reshape(k * n, *x.shape[2:]).index_select(0, flat).view(steps, k, b, *x.shape[2:]).unbind(0)
            ys = y.reshape(k * n, *y.shape[2:]).index_select(0, flat).view(steps, k, b, *y.shape[2:])
            ts = self.targets(ys, out.shape[-1], out.dtype).unbind(0)
            scale = 1.0 / b
            first: list[torch.Tensor] = []  # the first batch's activations, from the full-data pass at theta
            for t, alias in zip(saved, self.aliases, strict=True):
                first.append(first[-1] if alias else
                             t.reshape(k * n, *t.shape[2:]).index_select(0, flat[:k * b]).view(k, b, *t.shape[2:]))
            saved = first
            out = out.reshape(k * n, -1).index_select(0, flat[:k * b]).view(k, b, -1)
        for s in range(steps):
            if s > 0:
                saved = []
                out = self.forward(params, xs[s], saved)
            params = self.step(params, saved, out, ts[s], lr, scale, fresh=s == 0)
        after = self.pointwise(self.forward(params, x), y)
        return self.deltas(params, theta, k), before, after

    def deltas(self, params: Params, theta: torch.Tensor, k: int) -> torch.Tensor:
        """k x P rows w_final - theta in ``named_parameters`` order, each parameter's columns written by one
        subtraction (the transposed first weight read back in its own layout): no concatenated copy first."""
        out = torch.empty((k, theta.numel()), dtype=theta.dtype, device=theta.device)
        start = 0
        for name, shape in self.shapes.items():
            size = shape.numel()
            p = params[name].transpose(1, 2) if name == self.transposed else params[name]
            torch.sub(p, theta[start:start + size].view(shape), out=out[:, start:start + size].view(k, *shape))
            start += size
        return out
