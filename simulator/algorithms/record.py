"""What an algorithm is: one frozen record that carries everything the rest of metafleet asks about it.

An algorithm is a *client step* (pure: global vector, one client's shard, its seeded batch stream ->
an update vector) plus how the server treats that vector. The record says

- ``client_step`` and, optionally, ``vectorized_step`` (the same step for a whole cohort at once,
  ``simulator.algorithms.stacked``; None = the worker runs the client step client by client);
- ``samples``: how many samples a step processes, known at dispatch (it becomes simulated compute time);
- ``weighting`` ("samples": n_i, or "uniform") and ``update`` ("delta": the server descends -mean, or
  "gradient": it descends the mean, a meta-gradient);
- ``second_order`` (it differentiates through inner gradient steps), ``learns_lr`` (the server vector is
  [theta ; alpha], Meta-SGD's learned rates);
- ``schedule``: the server rule of each model version (Personalized FedAvg switches rule mid-run), and
  ``configure``: the algorithm's own defaults and key checks, applied when a config is validated.

The built-in records live one family per file (``fedavg``, ``maml``, ``perfedavg``, ``metasgd``) and are
listed once in ``simulator.algorithms.registry``; a user's record comes from ``algorithm.factory``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from simulator.config.schema import AlgorithmConfig, ExperimentConfig
from simulator.data.base import ClientShard

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Batch = np.ndarray | None  # indices into a split; None = the whole split
#: a client's batches (``steps.batch_plan``): a (steps x batch size) index array whose rows are the batches, or
#: ``[None] * steps`` for full-batch steps
Plan = Sequence[Batch]


@dataclass(frozen=True)
class ClientUpdate:
    """One client's contribution: ``vector`` is a delta (FedAvg, Reptile) or a meta-gradient (MAML).

    The vector is handed over to the worker: it may be read without a copy (the rows of one tensor are one block,
    ``params.row_block``) and compressed in place, so a step returns a tensor of its own, never one it keeps."""

    vector: torch.Tensor
    loss_before: float
    loss_after: float
    samples_processed: int


#: (model, server vector on the worker's device, shard, algorithm config, the client's batch generator, loss)
ClientStep = Callable[[nn.Module, torch.Tensor, ClientShard, AlgorithmConfig, np.random.Generator, LossFn],
                      ClientUpdate]
#: (the worker's ``VectorizedCohort``, server vector, shards, generators, algorithm config): one update per shard
VectorizedStep = Callable[[Any, torch.Tensor, Sequence[ClientShard], Sequence[np.random.Generator], AlgorithmConfig],
                          list[ClientUpdate]]
#: (algorithm config, support size, query size) -> samples one client step processes
SamplesFn = Callable[[AlgorithmConfig, int, int], int]


@dataclass(frozen=True)
class ServerPhase:
    """The server rule for model versions from ``start`` on: client weighting and the optimizer applied to
    the pseudo-gradient (``simulator.algorithms.server``). An optimizer's moments start afresh at ``start``."""

    start: int
    weighting: str         # "samples" | "uniform"
    optimizer: str         # "sgd" | "adam" | "fedadagrad" | "fedadam" | "fedyogi"
    lr: float
    momentum: float = 0.0  # SGD only


#: (algorithm config, the default phase, model version) -> the phase that version is in
Schedule = Callable[[AlgorithmConfig, ServerPhase, int], ServerPhase]
#: (validated config, keys the user set in [algorithm]) -> the config with this algorithm's defaults filled in;
#: raises ConfigError for a combination of keys it cannot serve
Configure = Callable[[ExperimentConfig, frozenset[str]], ExperimentConfig]


@dataclass(frozen=True)
class Algorithm:
    """Everything the simulator asks about an algorithm (see the module docstring)."""

    name: str
    client_step: ClientStep
    samples: SamplesFn
    weighting: str = "uniform"
    update: str = "delta"
    vectorized_step: VectorizedStep | None = None
    second_order: bool = False
    learns_lr: bool = False
    schedule: Schedule | None = None
    configure: Configure | None = None
    summary: str = ""

    def __post_init__(self) -> None:
        if self.weighting not in ("samples", "uniform"):
            raise ValueError(f"Algorithm {self.name!r}: weighting must be 'samples' or 'uniform', "
                             f"not {self.weighting!r}")
        if self.update not in ("delta", "gradient"):
            raise ValueError(f"Algorithm {self.name!r}: update must be 'delta' or 'gradient', not {self.update!r}")


def default_phase(algorithm: Algorithm, cfg: AlgorithmConfig) -> ServerPhase:
    """The server rule of the whole run, unless the algorithm's ``schedule`` says otherwise."""
    return ServerPhase(0, algorithm.weighting, cfg.server_optimizer, cfg.server_lr, cfg.server_momentum)


def phase_at(algorithm: Algorithm, cfg: AlgorithmConfig, version: int) -> ServerPhase:
    """The server rule that applies an update to model version ``version``."""
    base = default_phase(algorithm, cfg)
    return base if algorithm.schedule is None else algorithm.schedule(cfg, base, version)


def batch_samples(cfg: AlgorithmConfig, n: int, count: int) -> int:
    """Samples in ``count`` batches drawn by ``steps.batch_plan`` from a split of n samples."""
    return count * (n if cfg.batch_size <= 0 or cfg.batch_size >= n else cfg.batch_size)


def planned_samples(algorithm: Algorithm, cfg: AlgorithmConfig, n_support: int, n_query: int) -> int:
    """Samples a client step will process (forward/backward), known before it runs: the driver turns it
    into simulated compute time at dispatch. Equals ``ClientUpdate.samples_processed``."""
    return algorithm.samples(cfg, n_support, n_query)


def client_weight(algorithm: Algorithm, num_samples: int) -> float:
    return float(num_samples) if algorithm.weighting == "samples" else 1.0


def pseudo_gradient(algorithm: Algorithm, mean_vector: torch.Tensor) -> torch.Tensor:
    """The server's descent direction: -mean(delta) for FedAvg/Reptile, mean meta-gradient for MAML."""
    return -mean_vector if algorithm.update == "delta" else mean_vector


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
