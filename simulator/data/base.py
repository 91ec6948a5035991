"""Federated datasets whose client shards are pure functions of (parameters, seed, client id).

A shard is built on demand, where it is used (inside the actor serving the client): the driver
never generates, holds or ships client data, so registering 100,000 clients costs it nothing.
Client ids ``0 .. num_clients-1`` are the training population; ids ``num_clients ..
num_clients+eval_clients-1`` are held-out clients that are only ever evaluated.

Each shard has a ``support`` split (the client's training data; the inner-loop / adaptation
data of MAML) and a ``query`` split (its test data; the meta-objective and evaluation data).
"""

from __future__ import annotations

from collections.abc import Sequence
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

    @classmethod
    def from_rows(cls, client_id: int, x: torch.Tensor, y: torch.Tensor, k: int) -> ClientShard:
        """Rows ``0..k-1`` of (x, y) the support, the rest the query: both are views, and (x, y) itself is
        ``all`` (no concatenated copy is ever made; the same values as one)."""
        shard = cls(client_id, Split(x[:k], y[:k]), Split(x[k:], y[k:]))
        shard.__dict__["all"] = Split(x, y)  # what the cached property would hold, without its copy
        return shard

    @cached_property
    def num_samples(self) -> int:
        """Support and query rows (asked of every trained client each call: a cached shard answers from its dict)."""
        return len(self.support) + len(self.query)

    @cached_property
    def all(self) -> Split:
        """Support and query together: a training client's whole local dataset (built once per shard)."""
        return Split(torch.cat([self.support.x, self.query.x]), torch.cat([self.support.y, self.query.y]))

    def shares_rows(self) -> bool:
        """Whether ``all`` is the support's and query's own storage (``from_rows``), not a copy of them (built, or
        to be built by the cached property)."""
        whole = self.__dict__.get("all")
        return whole is not None and whole.x.untyped_storage().data_ptr() == self.support.x.untyped_storage().data_ptr()

    def nbytes(self) -> int:
        """The memory the shard holds once ``all`` is built: support and query, and ``all`` when it is a copy."""
        own = sum(t.element_size() * t.nelement() for split in (self.support, self.query) for t in (split.x, split.y))
        return own if self.shares_rows() else 2 * own

    def to(self, device: torch.device) -> ClientShard:
        """The shard on ``device``: itself when it is there already (its ``all`` kept), else a moved copy (one
        transfer of ``all`` when the splits are views of it)."""
        tensors = (self.support.x, self.support.y, self.query.x, self.query.y)
        if all(t.device == device for t in tensors):
            return self
        if self.shares_rows():
            whole = self.all.to(device)
            return ClientShard.from_rows(self.client_id, whole.x, whole.y, len(self.support))
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


def build_shards(dataset: FederatedDataset, client_ids: Sequence[int]) -> list[ClientShard]:
    """``[dataset.shard(c) ...]``, from the dataset's ``shards`` where it has one (the built-in generated datasets:
    their streams seeded in one pass instead of one by one; the same shards)."""
    many = getattr(dataset, "shards", None)
    return many(list(client_ids)) if many is not None else [dataset.shard(c) for c in client_ids]


def eval_client_ids(cfg: DataConfig) -> range:
    """The held-out clients: never sampled for training."""
    return range(cfg.num_clients, cfg.num_clients + cfg.eval_clients)
