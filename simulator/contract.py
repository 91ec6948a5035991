"""The contract between the rounds (the driver) and the backends that run client work.

A backend runs cohorts of client updates and evaluations against one model version and returns one
result per chunk of clients; the driver never learns how (Ray actors in ``actors.pool``, one in-process
worker in ``actors.inline``). What crosses the seam is typed here: ``WorkerSpec`` (everything a worker
needs to rebuild data and model by itself), ``TrainResult`` and ``EvalResult`` (row i belongs to
``client_ids[i]``), ``Reduction`` (what a worker needs to reduce its chunk to one ``exactsum.Partial`` instead of
sending one vector per client), ``Release`` (how a release's partials become its mean), ``Selection`` (which kept
vectors a release sums: FedBuff's buffer), ``WorkerFailure`` (work lost beyond ``system.max_failures``), and how a
cohort is cut into one call per worker (``split_cohort``). A backend is a context manager: ``with make_backend(cfg) as
backend: ...`` releases its workers (and a Ray it started) whatever happens.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np

from simulator.algorithms.exactsum import Grid, Partial
from simulator.config.schema import (
    AlgorithmConfig,
    CompressionConfig,
    DataConfig,
    EvalConfig,
    ExperimentConfig,
    ModelConfig,
    SystemConfig,
)
from simulator.plugins import factory_sources


class WorkerFailure(RuntimeError):
    """A backend lost work it could not recover (workers died more than ``system.max_failures``
    times in a round): the driver stops the run cleanly, resumable from its last checkpoint."""


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs to rebuild data and model by itself (small, picklable)."""

    seed: int
    data: DataConfig
    model: ModelConfig
    algorithm: AlgorithmConfig
    eval: EvalConfig
    threads: int
    shard_cache: int
    vectorize: bool = True
    shard_cache_mb: float = 512.0
    proximal_rho: float = 0.0   # FedAsync's proximal client term (async.proximal_rho, FedAsync runs only)
    compression: CompressionConfig = CompressionConfig()  # how uploads are encoded (``simulator.compression``)
    #: (path, source) of the factories given as files (``simulator.plugins``): workers on other nodes load these
    factory_sources: tuple[tuple[str, str], ...] = ()
    #: DP is on: a submitted chunk reports the float64 norms DP clips by (``client.reduce.summarize``)
    clip_norms: bool = False
    #: the share of its GPU's memory the worker's CUDA caching allocator may hold (``gpu_memory_share``; 0 = no cap)
    gpu_memory_fraction: float = 0.0

    @classmethod
    def from_config(cls, cfg: ExperimentConfig) -> WorkerSpec:
        fedasync = cfg.system.mode == "async" and cfg.async_.rule == "fedasync"
        return cls(cfg.seed, cfg.data, cfg.model, cfg.algorithm, cfg.eval, cfg.system.threads,
                   cfg.system.shard_cache, cfg.system.vectorize, cfg.system.shard_cache_mb,
                   cfg.async_.proximal_rho if fedasync else 0.0, cfg.compression,
                   factory_sources((cfg.model.factory, cfg.algorithm.factory)), cfg.privacy.mode != "off",
                   gpu_memory_share(cfg.system))


def gpu_memory_share(system: SystemConfig) -> float:
    """The fraction of its GPU's memory a worker's CUDA allocator may hold, 0 for no cap: ``gpu_memory_fraction``
    when set, else a Ray actor's fractional ``gpus_per_actor``. Ray's GPU fractions are logical, for scheduling only
    (they do not limit what a process allocates), so without a cap one actor of four on a GPU can take all of its
    memory and make its neighbours fail; a whole GPU, or the inline backend, is not capped unless asked."""
    if system.gpu_memory_fraction > 0:
        return system.gpu_memory_fraction
    return system.gpus_per_actor if system.backend == "ray" and 0 < system.gpus_per_actor < 1 else 0.0


@dataclass(frozen=True)
class Reduction:
    """How a worker reduces its chunk of a release (``simulator.client.reduce``): client ``client_ids[i]`` of the
    cohort (or of one chunk: ``parts``) counts with nominal coefficient ``coefs[i]`` on the cohort's ``grid``; a
    non-finite upload is rejected (DP: contributes zero); ``clip`` > 0 clips every upload to L2 norm C (DP),
    ``local_std`` > 0 adds the client's own N(0, local_std^2 I) from (seed, "dp_local", key, client id) after
    compression and clipping (local DP)."""

    client_ids: np.ndarray       # int64, the cohort
    coefs: np.ndarray            # float64 a_i
    grid: Grid
    clip: float = 0.0
    local_std: float = 0.0

    def coefficients(self, client_ids: np.ndarray | list[int]) -> np.ndarray:
        return self.parts([client_ids])[0].coefs

    def parts(self, chunks: list[np.ndarray | list[int]]) -> list[Reduction]:
        """The same reduction for each chunk's clients: their coefficients (the same values), the cohort's grid.
        A few bytes a client, so each travels inside its chunk's call instead of as one object of its own."""
        index = {int(c): i for i, c in enumerate(self.client_ids.tolist())}
        return [dataclasses.replace(self, client_ids=np.asarray(ids, np.int64),
                                    coefs=self.coefs[[index[int(c)] for c in ids]]) for ids in chunks]


@dataclass(frozen=True)
class Release:
    """How one release's partials become the float32 mean the server applies (``client.reduce.release_mean``), so
    that it can run wherever the partials are: the exact sum times 2^-F, then the outliers in the order of
    ``order`` (the cohort's client ids), times ``scale`` (w_i / sum over the accepted clients' w_j, when some
    were rejected; 1 otherwise), plus central DP noise N(0, ``noise_std``^2 I) from (``noise_seed``, "dp_noise",
    ``noise_key``) over ``denominator`` (``noise_std`` 0: none), rounded once to float32."""

    order: np.ndarray
    scale: float = 1.0
    noise_std: float = 0.0
    noise_seed: int = 0
    noise_key: int = 0
    denominator: int = 1


@dataclass(frozen=True)
class Selection:
    """The rows of kept chunks' vectors that one release sums (FedBuff's buffer, ``client.reduce.selected_partial``):
    position i of the release is row ``rows[i]`` of block ``blocks[i]`` (an index into the release's list of kept
    blocks: ``TrainResult.kept``), counted as ``reduce`` says for its i-th client (``reduce.client_ids[i]``, coefficient
    ``reduce.coefs[i]``; the grid, the DP clip and local noise), its local noise keyed by ``noise_keys[i]`` (its
    refill group). The outliers are keyed by position, so the release's ``order`` is 0 .. K-1."""

    blocks: np.ndarray           # int64 per position
    rows: np.ndarray             # int64 per position
    reduce: Reduction
    noise_keys: np.ndarray       # int64 per position


@dataclass(frozen=True)
class TrainResult:
    """One cohort chunk's updates; row i of every array belongs to ``client_ids[i]``. Reduced (a ``Reduction`` was
    given): ``vectors`` is 0 x P and ``partial`` holds the chunk's share of the sum (an ``exactsum.Partial``, or the
    backend's handle to one it keeps where it was computed: ``Backend.release`` takes either), with per-client
    ``accepted`` (finite), ``update_norm`` (float32 L2 norm of the upload) and ``clip_norm`` (float64 norm DP
    clips by). Submitted (``Backend.submit``): the same per-client scalars, worked out by the worker
    (``client.reduce.summarize``); with ``keep`` the vectors stay where they were computed, ``vectors`` is 0 x P and
    ``kept`` is the backend's handle to the k x P block (``Backend.release_rows`` reads it)."""

    worker_id: int
    client_ids: np.ndarray
    vectors: np.ndarray          # k x P float32
    num_samples: np.ndarray      # local data size n_i
    samples_processed: np.ndarray
    loss_before: np.ndarray
    loss_after: np.ndarray
    compute_time_s: np.ndarray   # real seconds: the chunk's time divided over its clients when trained together
    partial: Partial | Any = None
    accepted: np.ndarray | None = None
    update_norm: np.ndarray | None = None
    clip_norm: np.ndarray | None = None
    kept: Any = None


@dataclass(frozen=True)
class EvalResult:
    worker_id: int
    client_ids: np.ndarray
    loss_pre: np.ndarray
    loss_post: np.ndarray
    metric_pre: np.ndarray
    metric_post: np.ndarray


class Pending(Protocol):
    """A submitted chunk of training work, until ``Backend.result`` fetches it."""

    client_ids: list[int]


#: the two kinds of client work a backend runs
Method = Literal["train", "evaluate"]
#: a batch-stream key for all clients of a call (the round), or one key per client (async refill groups)
Keys = int | np.ndarray


class Backend(abc.ABC):
    """Runs client work for the driver; see the module docstring. ``train`` and ``evaluate`` dispatch every
    chunk at once and yield results as they complete (any order: the driver reorders them); ``submit`` and
    ``result`` split training into dispatch and a blocking fetch of one chunk (the asynchronous mode)."""

    num_workers: int

    @abc.abstractmethod
    def train(self, theta: np.ndarray, keys: Keys, client_ids: np.ndarray,
              reduce: Reduction | None = None) -> Iterator[TrainResult]:
        """Update every client of ``client_ids`` from the server vector ``theta``; with ``reduce``, each chunk
        comes back reduced to one partial sum (``Reduction``)."""

    @abc.abstractmethod
    def evaluate(self, theta: np.ndarray, round_idx: int, client_ids: np.ndarray) -> Iterator[EvalResult]:
        """Score ``theta`` on held-out clients before and after adaptation."""

    @abc.abstractmethod
    def submit(self, theta: np.ndarray, keys: Keys, client_ids: np.ndarray, keep: bool = False) -> list[Pending]:
        """Dispatch training as one call per chunk; the chunks run while the caller goes on. Each result carries
        the worker's per-client scalars (``client.reduce.summarize``) and, with ``keep``, a handle to its vectors
        instead of the vectors (kept in the object store by a backend that combines in its workers, see
        ``system.combine``; else held here), for ``release_rows``. A submitted ``theta`` is never changed
        afterwards, so the same array object submitted again is the same model (a backend may reuse what it sent)."""

    @abc.abstractmethod
    def result(self, pending: Any) -> TrainResult:
        """Block until one submitted chunk is done."""

    @abc.abstractmethod
    def release(self, partials: list[Any], release: Release, size: int) -> np.ndarray:
        """The float32 mean (``size`` values; possibly read-only) that one reduced training call's partials
        (``TrainResult.partial`` of its chunks) give under ``release`` (``client.reduce.release_mean``): the
        same bits wherever it is computed."""

    @abc.abstractmethod
    def release_rows(self, blocks: list[Any], selection: Selection, release: Release, size: int) -> np.ndarray:
        """The float32 mean of the kept rows that ``selection`` picks from ``blocks`` (``TrainResult.kept`` of
        submitted chunks) under ``release`` (``client.reduce.selected_mean``): the same bits wherever it is
        computed, and the same as the driver's own sum of those rows."""

    def prefetch(self, client_ids: np.ndarray) -> None:
        """A hint: these clients train next (a round planned ahead). A backend whose workers would otherwise wait
        builds their shards in that wait, on the workers ``train`` will place them on; results never depend on
        it. Default: nothing (the in-process backend has no idle worker)."""
        return None

    @abc.abstractmethod
    def describe(self) -> list[dict[str, object]]:
        """Each worker's device, pid and host."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the workers (idempotent)."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def split_cohort(client_ids: np.ndarray, workers: int, max_chunk: int = 0) -> list[tuple[int, list[int]]]:
    """Split a cohort into (worker index, client ids) calls: equal sizes, stable placement.

    Clients are ordered by (id mod workers, id) before being cut into equal contiguous chunks,
    so a client mostly lands on the same worker round after round (its cached shard is reused)
    while every worker gets the same number of clients. ``max_chunk`` > 0 caps the clients per
    call (``system.clients_per_actor``); extra chunks go round-robin to the workers.
    """
    ids = np.asarray(client_ids, dtype=np.int64)
    if ids.size == 0:
        return []
    ordered = ids[np.lexsort((ids, ids % workers))]
    chunks = workers if max_chunk <= 0 else max(workers, -(-ids.size // max_chunk))
    chunks = min(chunks, ids.size)
    return [(i % workers, part.tolist()) for i, part in enumerate(np.array_split(ordered, chunks))]


def split_work(client_ids: np.ndarray, keys: Keys, workers: int,
               max_chunk: int = 0) -> list[tuple[int, list[int], int | list[int]]]:
    """``split_cohort`` carrying each client's stream key along: (worker, ids, key or keys) per call."""
    if isinstance(keys, int | np.integer):
        return [(w, ids, int(keys)) for w, ids in split_cohort(client_ids, workers, max_chunk)]
    lookup = dict(zip(np.asarray(client_ids, np.int64).tolist(), np.asarray(keys, np.int64).tolist(), strict=True))
    return [(w, ids, [lookup[c] for c in ids]) for w, ids in split_cohort(client_ids, workers, max_chunk)]
