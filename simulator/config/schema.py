"""The experiment's configuration schema: frozen dataclasses, one per TOML section, and ``ConfigError``.

This module is the bottom of the import graph: it imports nothing of the project. Every key has a
default; the defaults *are* the built-in quickstart (Reptile on the sinusoid task, 1,000 clients).
Reading and writing TOML lives in ``simulator.config.toml``; validation against the dataset, model
and algorithm registries lives in ``simulator.experiment``, which is what callers use to build one
(``load_config``, ``from_dict``, ``replace``). Nothing downstream re-validates or reads raw dictionaries.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field
from typing import Any

#: the exit code of every command for bad input (config, flags, files, run directories): one line, no traceback
EXIT_BAD_INPUT = 2


class ConfigError(ValueError):
    """Bad user input: one message naming the key and how to fix it (the CLI exits with ``EXIT_BAD_INPUT``)."""


@dataclass(frozen=True)
class DataConfig:
    name: str = "sinusoid"
    num_clients: int = 1000
    eval_clients: int = 100
    # sinusoid (Finn et al. 2017)
    shots: int = 10
    query: int = 10
    # synthetic (Li et al. 2020, FedProx)
    alpha: float = 1.0
    beta: float = 1.0
    samples_per_client: int = 0
    iid: bool = False
    test_fraction: float = 0.2
    # pooled labelled datasets (gaussian, digits) split over clients by a partitioner
    partition: str = "iid"
    dirichlet_alpha: float = 0.5
    shards_per_client: int = 2
    quantity_sigma: float = 1.0
    # gaussian mixture: pool size (0 = 50 samples per client), classes, features, class-mean spread
    pool_size: int = 0
    num_classes: int = 10
    features: int = 20
    separation: float = 0.6
    # files: "leaf" (LEAF's JSON train/ and test/ directories) or "table" (Parquet/CSV, one row per sample)
    path: str = ""
    client_column: str = "client_id"
    label_column: str = "label"


_PARTITION_KEYS = {"partition", "dirichlet_alpha", "shards_per_client", "quantity_sigma", "test_fraction"}

#: keys that belong to some datasets only; setting them for another dataset is an error
DATASET_KEYS: dict[str, frozenset[str]] = {
    "sinusoid": frozenset({"shots", "query"}),
    "synthetic": frozenset({"alpha", "beta", "samples_per_client", "iid", "test_fraction"}),
    "gaussian": frozenset(_PARTITION_KEYS | {"pool_size", "num_classes", "features", "separation"}),
    "digits": frozenset(_PARTITION_KEYS),
    "leaf": frozenset({"path"}),
    "table": frozenset({"path", "client_column", "label_column", "test_fraction"}),
}
DATASET_ONLY = frozenset().union(*DATASET_KEYS.values())


@dataclass(frozen=True)
class ModelConfig:
    name: str = "mlp"
    hidden: tuple[int, ...] = (40, 40)
    factory: str = ""


@dataclass(frozen=True)
class AlgorithmConfig:
    name: str = "reptile"
    local_steps: int = 10
    local_lr: float = 0.02
    batch_size: int = 10
    server_lr: float = 1.0
    server_optimizer: str = "sgd"
    server_momentum: float = 0.0
    # fedadagrad | fedadam | fedyogi (Reddi et al. 2021, Alg. 2): beta1, beta2 as in their experiments, tau = 1e-3
    server_beta1: float = 0.9
    server_beta2: float = 0.99
    server_tau: float = 0.001
    outer_lr: float = 0.0          # Per-FedAvg's beta (Fallah et al. 2020); 0 = local_lr
    hf_delta: float = 1e-5         # Per-FedAvg HF: finite-difference step (benchmarks.hvp_error: 1e-3 is 50% off)
    switch_round: int = 0          # pfedavg: first round of Reptile fine-tuning (0 = half of the rounds)
    finetune_server_lr: float = 0.001  # pfedavg: the fine-tuning phase's server Adam learning rate
    factory: str = ""              # "package.module:function" returning your own ``Algorithm`` record


@dataclass(frozen=True)
class ClientsConfig:
    per_round: int = 20


@dataclass(frozen=True)
class SystemConfig:
    backend: str = "ray"
    actors: int = 0
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    gpu_memory_fraction: float = 0.0  # of its GPU's memory a worker's CUDA allocator may hold (0 = gpus_per_actor, Ray)
    clients_per_actor: int = 0
    address: str = ""
    threads: int = 1
    ship_code: bool = False
    shard_cache: int = 65536   # client shards each worker keeps (LRU), at most ...
    shard_cache_mb: float = 512.0  # ... and at most this many MiB of them
    vectorize: bool = True     # train a cohort's clients together with torch.func.vmap where the model allows
    prefetch: bool = False     # actors build the next round's shards while the driver aggregates (sync modes)
    combine: str = "auto"      # where a round's partial sums become its mean: "driver" | "actors" | "auto" (by size)
    max_failures: int = 3      # lost worker calls (actor or node death) retried per round before the run stops
    call_timeout_s: float = 600.0  # a worker call this long past its start is stuck: its actor is replaced (0 = off)
    # round policy, in simulated time
    mode: str = "sync"
    deadline_s: float = 0.0
    overselect: float = 1.3
    max_concurrency: int = 0   # async: clients training at once (0 = clients.per_round)
    max_staleness: int = 0     # async: drop updates staler than this (0 = no limit)


@dataclass(frozen=True)
class Distribution:
    """A positive per-client quantity drawn from (seed, client id): ``dist`` is "constant" (always
    ``median``), "lognormal" (median ``median``, log-space std ``sigma``) or "pareto" (heavy-tailed
    slowness: the reciprocal of the rate is Pareto with tail index ``shape``; median ``median``)."""

    dist: str = "lognormal"
    median: float = 1.0
    sigma: float = 1.0
    shape: float = 1.5


@dataclass(frozen=True)
class DevicesConfig:
    """System heterogeneity: compute speed in samples per simulated second, download bandwidth in
    Mbit/s (upload = ``uplink_ratio`` x download), or a FedScale-style ``trace`` file; availability
    (probability of being online when sampled, or an on/off ``availability_trace``) and the
    probability of dropping out mid-update."""

    speed: Distribution = field(default_factory=lambda: Distribution("lognormal", 100.0, 1.0))
    bandwidth: Distribution = field(default_factory=lambda: Distribution("lognormal", 20.0, 1.0))
    uplink_ratio: float = 0.5
    trace: str = ""
    availability: float = 1.0
    availability_trace: str = ""
    dropout: float = 0.0


@dataclass(frozen=True)
class CompressionConfig:
    """Compressed uploads (``simulator.compression``): ``method`` "none" | "fp16" | "int8" | "qsgd" (Alistarh et
    al. 2017, ``levels`` = s) | "randk" | "topk" (Konecny et al. 2016; k = floor(``fraction`` x the vector size))."""

    method: str = "none"
    levels: int = 16
    fraction: float = 0.1


@dataclass(frozen=True)
class AsyncConfig:
    """Asynchronous aggregation (``system.mode = "async"``): FedBuff (Nguyen et al. 2022) or
    FedAsync (Xie et al. 2019), with a staleness function s(tau)."""

    rule: str = "fedbuff"
    buffer_size: int = 10
    staleness: str = "sqrt"
    staleness_a: float = 0.5
    staleness_b: float = 4.0
    mixing: float = 0.6
    proximal_rho: float = 0.0  # FedAsync's client: f(x) + rho/2 ||x - x_tau||^2 (Xie et al. 2019); 0 = off


@dataclass(frozen=True)
class EvalConfig:
    every: int = 20
    clients: int = 100
    adapt_steps: int = 10
    adapt_lr: float = 0.02


@dataclass(frozen=True)
class MetricsConfig:
    flush_every: int = 5


@dataclass(frozen=True)
class TrackingConfig:
    """Experiment tracking (``actors.tracking``): execution-only keys, never part of a run's numbers, so they
    may change on ``--resume``. "" turns a tracker off."""

    tensorboard: str = ""      # "run" = RUN_DIR/tensorboard; a directory DIR = DIR/<run directory's name>
    mlflow_uri: str = ""       # an MLflow tracking URI: "file:./mlruns" (a local store), "http://host:5000", ...
    mlflow_experiment: str = "metafleet"


@dataclass(frozen=True)
class PrivacyConfig:
    """Differential privacy of the clients' uploads (``simulator.privacy``; README "Differential privacy"):
    ``mode`` "off", "central" (the server clips, sums, adds N(0, sigma^2 C^2); McMahan et al. 2018) or
    "local" (each client clips and noises its own upload); ``clip`` C, ``noise_multiplier`` sigma,
    ``delta``; ``target_epsilon`` (0 = none): with sigma > 0 the run stops before the round that would
    exceed it, with sigma = 0 sigma is calibrated up front for ``rounds``; adaptive clipping (Andrew et
    al. 2021) when ``adaptive_quantile`` > 0, with its learning rate and count noise (0 = per_round / 20)."""

    mode: str = "off"
    clip: float = 1.0
    noise_multiplier: float = 0.0
    delta: float = 1e-5
    target_epsilon: float = 0.0
    adaptive_quantile: float = 0.0
    adaptive_lr: float = 0.2
    adaptive_noise: float = 0.0


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = ""  # "" = ALGORITHM-DATASET
    seed: int = 0
    rounds: int = 300
    checkpoint_every: int = 10  # write the server state every N rounds (async: server updates); 0 = only on Ctrl-C
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    clients: ClientsConfig = field(default_factory=ClientsConfig)
    system: SystemConfig = field(default_factory=SystemConfig)
    devices: DevicesConfig = field(default_factory=DevicesConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    async_: AsyncConfig = field(default_factory=AsyncConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)


#: the top-level keys; every other TOML table is a section, mapped to its dataclass by ``SECTIONS``
TOP_KEYS = ("name", "seed", "rounds", "checkpoint_every")
#: TOML section name -> its dataclass (the ``[async]`` section is the attribute ``async_``)
SECTIONS: dict[str, type] = {name.rstrip("_"): t for name, t in typing.get_type_hints(ExperimentConfig).items()
                              if name not in TOP_KEYS}


def attribute(section: str) -> str:
    return "async_" if section == "async" else section


def section(cfg: ExperimentConfig, name: str) -> Any:
    """A config section by its TOML name: ``section(cfg, "async")`` is ``cfg.async_``."""
    return getattr(cfg, attribute(name))


#: the allowed values of keys with a fixed set of choices (data.name, model.name and algorithm.name come
#: from their registries: ``simulator.experiment``)
CHOICES: dict[str, tuple[str, ...]] = {
    "data.partition": ("iid", "dirichlet", "shards", "quantity"),
    "algorithm.server_optimizer": ("sgd", "adam", "fedadagrad", "fedadam", "fedyogi"),
    "system.backend": ("ray", "inline"),
    "system.mode": ("sync", "deadline", "overselect", "async"),
    "system.combine": ("auto", "driver", "actors"),
    "async.rule": ("fedbuff", "fedasync"),
    "async.staleness": ("constant", "polynomial", "sqrt", "hinge"),
    "compression.method": ("none", "fp16", "int8", "qsgd", "randk", "topk"),
    "devices.speed.dist": ("constant", "lognormal", "pareto"),
    "devices.bandwidth.dist": ("constant", "lognormal", "pareto"),
}


def overselect_cohort(per_round: int, overselect: float) -> int:
    """Clients sampled per overselect round: ceil(overselect x per_round), ignoring float noise
    (1.1 x 50 is 55.00000000000001, and samples 55)."""
    return math.ceil(overselect * per_round - 1e-9)


