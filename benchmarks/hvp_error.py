"""Per-FedAvg HF's finite-difference Hessian-vector product against autograd's exact one, per built-in model.

    python -m benchmarks.hvp_error                      # every built-in model, float32 and float64
    python -m benchmarks.hvp_error --deltas 1e-3 1e-5 --models mlp

Per-FedAvg HF (Fallah et al. 2020, Eq. 10) estimates H(w, D'') v by the central difference
[grad f(w + delta v, D'') - grad f(w - delta v, D'')] / (2 delta) (``perfedavg.gradient_difference``), with
v = grad f(w - alpha grad f(w, D), D') as in its local step. This script draws, for each of ``--clients``
clients, the three batches D, D', D'' of a local step (batch 10, seeded), takes w = the model's seeded
initialization, and reports the largest relative error ||d - H v|| / ||H v|| over the clients, H v from
double backward (``torch.autograd.grad`` of <grad f(w), v>, exact up to rounding). The data: the sinusoid's
clients for ``mlp`` (the built-in default, hidden [40, 40], ReLU); uniform [0, 1) 28x28 images and random
labels of 62 classes for ``femnist_cnn``; random 80-character strings and next characters for
``shakespeare_lstm``.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad

from simulator.algorithms.perfedavg import gradient_difference
from simulator.algorithms.steps import descend
from simulator.config.schema import DataConfig, ModelConfig
from simulator.data.registry import make_dataset
from simulator.models import FEMNIST_SIDE, SHAKESPEARE_VOCAB, build_model
from simulator.params import Params
from simulator.rng import generator

ALPHA = 0.02  # the default local_lr: Per-FedAvg's alpha
BATCH = 10


def model_and_batches(name: str, client: int, dtype: torch.dtype, seed: int = 0):
    """The seeded model (in ``dtype``), its loss, and a client's batches D, D', D''."""
    rng = generator(seed, "batches", 0, client)
    if name == "mlp":
        shard = make_dataset(DataConfig(), seed).shard(client).all
        model, loss = build_model(ModelConfig(), 1, 1, seed), F.mse_loss
        batches = [(shard.x[i], shard.y[i]) for i in (torch.from_numpy(rng.permutation(len(shard))[:BATCH])
                                                     for _ in range(3))]
        batches = [(x.to(dtype), y.to(dtype)) for x, y in batches]
    elif name == "femnist_cnn":
        model, loss = build_model(ModelConfig(name=name), FEMNIST_SIDE ** 2, 62, seed), F.cross_entropy
        batches = [(torch.from_numpy(rng.random((BATCH, FEMNIST_SIDE ** 2))).to(dtype),
                    torch.from_numpy(rng.integers(0, 62, BATCH))) for _ in range(3)]
    else:
        model, loss = build_model(ModelConfig(name=name), 80, SHAKESPEARE_VOCAB, seed), F.cross_entropy
        batches = [(torch.from_numpy(rng.integers(0, SHAKESPEARE_VOCAB, (BATCH, 80))),
                    torch.from_numpy(rng.integers(0, SHAKESPEARE_VOCAB, BATCH))) for _ in range(3)]
    return model.to(dtype), loss, batches


def exact_hvp(f, w: Params, v: Params) -> Params:
    """H(w, D'') v by double backward: the gradient of <grad f(w), v> (exact up to rounding)."""
    leaves = {n: t.detach().requires_grad_(True) for n, t in w.items()}
    with torch.backends.cudnn.flags(enabled=False):
        g = torch.autograd.grad(f(leaves, 2), list(leaves.values()), create_graph=True)
        dot = sum((gi * v[n]).sum() for gi, n in zip(g, leaves, strict=True))
        return dict(zip(leaves, torch.autograd.grad(dot, list(leaves.values())), strict=True))


def relative_errors(name: str, deltas: list[float], dtype: torch.dtype, client: int) -> list[float]:
    """||FD(delta) - H v|| / ||H v|| for each delta, at one client's step from the seeded initialization."""
    model, loss, batches = model_and_batches(name, client, dtype)
    w: Params = {n: p.detach() for n, p in model.named_parameters()}

    def f(p: Params, which: int) -> torch.Tensor:
        x, y = batches[which]
        return loss(functional_call(model, p, (x,)), y)

    def grad_at(p: Params, which: int) -> Params:
        return grad(f)(p, which)

    v = grad_at(descend(w, grad_at(w, 0), ALPHA), 1)
    hv = exact_hvp(f, w, v)
    norm = torch.sqrt(sum((t.double() ** 2).sum() for t in hv.values()))
    out = []
    for delta in deltas:
        diff = gradient_difference(grad_at, w, v, delta)
        err = torch.sqrt(sum(((diff[n].double() / (2 * delta) - hv[n].double()) ** 2).sum() for n in w))
        out.append(float(err / norm))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["mlp", "femnist_cnn", "shakespeare_lstm"])
    parser.add_argument("--deltas", type=float, nargs="+", default=[1e-2, 1e-3, 1e-4, 1e-5, 1e-6])
    parser.add_argument("--clients", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| model | dtype | " + " | ".join(f"delta {d:g}" for d in args.deltas) + " |")
    print("|---|---|" + "---|" * len(args.deltas))
    for name in args.models:
        for dtype in (torch.float32, torch.float64):
            worst = np.max([relative_errors(name, args.deltas, dtype, c) for c in range(args.clients)], axis=0)
            print(f"| {name} | {str(dtype).split('.')[-1]} | " + " | ".join(f"{e:.1e}" for e in worst) + " |",
                  flush=True)


if __name__ == "__main__":
    main()
