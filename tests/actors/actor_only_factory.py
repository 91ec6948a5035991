"""Factories that fail only inside a Ray actor (as code that needs a GPU, or a file only the driver has, would),
for ``test_faults.py``: imported there as ``tests.actors.actor_only_factory``."""

from __future__ import annotations

import ray
import torch.nn as nn

from simulator.algorithms.fedavg import FEDAVG
from simulator.algorithms.record import Algorithm


def _in_actor() -> bool:
    return ray.is_initialized() and bool(ray.get_runtime_context().get_actor_id())


def model(input_dim: int, output_dim: int) -> nn.Module:
    if _in_actor():
        raise RuntimeError("only in the actor: no such device (simulated)")
    return nn.Sequential(nn.Linear(input_dim, 8), nn.ReLU(), nn.Linear(8, output_dim))


def _failing_step(*args, **kwargs):
    raise MemoryError("\x1b[31mCUDA out of memory\x1b[0m (simulated)\nsecond line")


def failing_algorithm() -> Algorithm:
    """FedAvg whose client step always raises inside the worker."""
    return Algorithm("failing", _failing_step, FEDAVG.samples, weighting="samples")
