"""Federated datasets whose client shards are pure functions of (parameters, seed, client id).

A shard is built on demand, where it is used (inside the actor serving the client): the driver
never generates, holds or ships client data, so registering 100,000 clients costs it nothing.
Client ids ``0 .. num_clients-1`` are the training population; ids ``num_clients ..
num_clients+eval_clients-1`` are held-out clients that are only ever evaluated.

Each shard has a ``support`` split (the client's training data; the inner-loop / adaptation
data of MAML) and a ``query`` split (its test data; the meta-objective and evaluation data).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

import numpy as np
import torch

from simulator.config.schema import DataConfig


@dataclass(frozen=True)
class Split:
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def to(self, device: torch.device) -> Split:
        return Split(self.x.to(device), self.y.to(device))


@dataclass(frozen=True)
class ClientShard:
    client_id: int
    support: Split
    query: Split

    @property
    def num_samples(self) -> int:
        return len(self.support) + len(self.query)

    @cached_property
    def all(self) -> Split:
        """Support and query together: a training client's whole local dataset (built once per shard)."""
        return Split(torch.cat([self.support.x, self.query.x]), torch.cat([self.support.y, self.query.y]))

    def to(self, device: torch.device) -> ClientShard:
        return ClientShard(self.client_id, self.support.to(device), self.query.to(device))


class FederatedDataset(Protocol):
    """What the worker and the driver need to know about a dataset."""

    task: str          # "regression" | "classification"
    input_dim: int
    output_dim: int
    input_dtype: torch.dtype  # of x: torch.float32, or torch.int64 for token ids (LEAF's Shakespeare)

    def shard(self, client_id: int) -> ClientShard: ...

    def num_samples(self, client_id: int) -> int: ...

    def split_sizes(self, client_id: int) -> tuple[int, int]:
        """(support, query) sizes without building the shard: the driver needs them at dispatch to
        know a client's simulated compute time."""
        ...

    def label_histogram(self) -> np.ndarray | None:
        """Per-client label counts (clients x classes, training and held-out clients) of a classification
        dataset that knows them (pooled, LEAF, tables), else None."""
        ...


def eval_client_ids(cfg: DataConfig) -> range:
    """The held-out clients: never sampled for training."""
    return range(cfg.num_clients, cfg.num_clients + cfg.eval_clients)
