"""Tiny exact models and shards for the algorithm tests (float64, weights given by theta)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from simulator.config.schema import AlgorithmConfig
from simulator.data.base import ClientShard, Split

D = torch.float64


def linear(inp: int = 1, bias: bool = False) -> nn.Module:
    """nn.Linear without the random initialisation (no global RNG draw); weights come from theta."""
    return nn.utils.skip_init(nn.Linear, inp, 1, bias=bias, dtype=D)


def col(values) -> torch.Tensor:
    return torch.tensor(values, dtype=D).reshape(-1, 1)


def shard(xs, ys, xq, yq, cid: int = 0) -> ClientShard:
    return ClientShard(cid, Split(col(xs), col(ys)), Split(col(xq), col(yq)))


def theta(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=D)


def cfg(name: str = "reptile", steps: int = 1, lr: float = 0.1, batch_size: int = 0, **kw) -> AlgorithmConfig:
    return AlgorithmConfig(name=name, local_steps=steps, local_lr=lr, batch_size=batch_size, **kw)


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)
