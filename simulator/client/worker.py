"""The client worker: runs a cohort of client updates (or evaluations) against one model version.

The same code runs inside a Ray actor (``actors.pool``) and in-process (``actors.inline``).
It builds the shards of the clients it serves from the dataset spec (lazily, LRU-cached, or ahead of a call:
``prefetch``), so no client data ever crosses a process boundary; it fixes torch's thread count the same way in
every backend, because the thread count changes floating-point results, and glibc's allocator thresholds
(``return_large_frees``) and Python's collector (``frozen_heap``), which change only speed and memory.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import logging
import os
import socket
import sys
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from simulator.algorithms.exactsum import Merger
from simulator.algorithms.fedavg import with_proximal
from simulator.algorithms.record import vector_size
from simulator.algorithms.registry import resolve
from simulator.algorithms.stacked import VectorizedCohort, unsupported_reason
from simulator.algorithms.steps import loss_function
from simulator.client.evaluation import evaluate_client
from simulator.client.reduce import reduce_result, summarize
from simulator.compression import roundtrip
from simulator.contract import EvalResult, Reduction, TrainResult, WorkerSpec
from simulator.data.base import ClientShard, build_shards
from simulator.data.registry import make_dataset
from simulator.models import build_model
from simulator.params import num_parameters, row_block
from simulator.plugins import provide_sources
from simulator.rng import generator, generators

log = logging.getLogger("metafleet.worker")

#: clients per vectorized computation on a CPU: stacking more than a few hundred clients' parameters
#: outgrows the caches (`python -m benchmarks.chunks --clients 10000 --chunks 100 256 1000 10000`, anchor
#: workload, 1 thread: 204, 206, 226 and 424 us per client)
CPU_CHUNK = 256
#: clients ``prefetch`` takes at a time, their misses built together (a bound on what it builds past its stop)
PREFETCH_BATCH = 32
#: update vectors a worker holds at once (one block; a reduced call keeps no more): LEAF's FEMNIST CNN (26 MB an
#: update) trains 20 clients a block instead of 256 (6.7 GB), and a client's result does not depend on its block
BLOCK_BYTES = 512 * 2**20


def configure_threads(threads: int) -> None:
    """Fix torch's intra-op thread count (identically in every backend: results depend on it)."""
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def fixed_threads(threads: int) -> Iterator[None]:
    """torch's intra-op thread count fixed at ``threads`` inside the block, and restored after it. ``run`` holds the
    driver's own torch work (the server step, a FedBuff buffer's exact sum, a release) at the workers' count whatever
    the backend: at torch's default, a thread per core, the driver's parallel regions wait for cores the actors are
    using (``benchmarks/README.md``, "Seventh pass"). Results do not depend on it: those sums are exact or
    elementwise."""
    before = torch.get_num_threads()
    configure_threads(threads)
    try:
        yield
    finally:
        configure_threads(before)


#: allocations from this size up are mapped on their own and returned to the OS when freed (glibc ``mallopt``)
MMAP_THRESHOLD = 8 * 2**20
#: free memory at the heap's top kept before it is trimmed: fixing the mmap threshold also fixes this one, at
#: 128 KiB, and then every mid-sized array (a vectorized cohort's 2-4 MB blocks) faults its pages in again each
#: time (the inline run's CPU time with and without: ``benchmarks/README.md``); 64 MiB is the most glibc's own
#: dynamic rule would keep
TRIM_THRESHOLD = 64 * 2**20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h


def return_large_frees() -> bool:
    """Make glibc hand a freed block of ``MMAP_THRESHOLD`` bytes or more straight back to the OS. By default its
    threshold rises to 32 MiB after the first such free, so a big model's per-round vectors (a 26 MB float32
    update of LEAF's CNN: mean, pseudo-gradient, new model) come from the heap and stay resident as fragments;
    measured by ``benchmarks.driver_memory``, the driver's private peak then grows round after round. A user's own
    ``MALLOC_MMAP_THRESHOLD_`` wins; elsewhere than glibc this does nothing. The trim threshold is fixed with it
    (``TRIM_THRESHOLD``), so smaller blocks keep being served from resident heap. Returns whether both were set."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    except (AttributeError, OSError):  # musl and other C libraries without mallopt
        return False


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """From the first full collection inside the block on, Python's cyclic collector leaves the objects that survived
    it alone (``gc.freeze`` right after it), until exit (``gc.unfreeze``). A driver or worker process holds a few
    hundred thousand long-lived objects (torch's, Ray's, pandas's modules and what they built), and each full
    collection walks all of them: 0.17-0.23 s a pass, two in 200 anchor rounds (``benchmarks/README.md``, "Python's
    collector"). Freezing after a full collection, not at entry, freezes no garbage: a reference cycle left before the
    block (holding an object reference, a file, GPU memory) is still collected, by that collection; a short block
    that sees no full collection changes nothing. New objects are collected as before."""
    frozen = False

    def after(phase: str, info: dict[str, int]) -> None:
        nonlocal frozen
        if phase == "stop" and info["generation"] == 2 and not frozen:
            gc.freeze()
            frozen = True

    gc.callbacks.append(after)
    try:
        yield
    finally:
        gc.callbacks.remove(after)
        if frozen:
            gc.unfreeze()


def pick_device() -> torch.device:
    """The GPU Ray assigned to this process (CUDA_VISIBLE_DEVICES), else the CPU."""
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def cap_gpu_memory(device: torch.device, fraction: float) -> int | None:
    """Cap this process's CUDA caching allocator on ``device`` at ``fraction`` of the device's memory
    (``torch.cuda.set_per_process_memory_fraction``) and return the cap in bytes; None on a CPU or with no cap
    (``fraction`` 0). An allocation past the cap raises ``torch.OutOfMemoryError`` in this worker, instead of
    taking the memory of the other actors that share the GPU. The CUDA context of the process (a few hundred MiB,
    allocated by the driver, not by the caching allocator) is outside the cap."""
    if device.type != "cuda" or fraction <= 0:
        return None
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return int(fraction * torch.cuda.get_device_properties(device).total_memory)


def share_exhausted(exc: BaseException, worker_id: int, cap: int, fraction: float) -> torch.OutOfMemoryError:
    """The error of a worker whose CUDA allocations outgrew its cap: the share, the keys that change it, then
    torch's own first line (what it tried to allocate)."""
    torch_line = (str(exc).strip().splitlines() or [""])[0]
    return torch.OutOfMemoryError(
        f"worker {worker_id} outgrew its share of the GPU's memory ({cap / 2**30:.2f} GiB, a fraction {fraction:g}): "
        "lower system.clients_per_actor, or raise system.gpus_per_actor or system.gpu_memory_fraction; "
        f"torch: {torch_line}")


class ClientWorker:
    def __init__(self, spec: WorkerSpec, worker_id: int = 0) -> None:
        configure_threads(spec.threads)
        return_large_frees()  # a worker's blocks of update vectors, too, go back to the OS when freed
        provide_sources(spec.factory_sources)  # the driver's factory files, for a worker on a node without them
        self.spec, self.worker_id = spec, worker_id
        self.device = pick_device()
        self.gpu_memory_cap = cap_gpu_memory(self.device, spec.gpu_memory_fraction)  # before anything is allocated
        self.dataset = make_dataset(spec.data, spec.seed)
        self.model = build_model(spec.model, self.dataset.input_dim, self.dataset.output_dim, spec.seed)
        self.model.to(self.device)
        self.algorithm = with_proximal(resolve(spec.algorithm), spec.proximal_rho)  # FedAsync's client term
        #: the server vector's length: the model's parameters (Meta-SGD: and their learned rates)
        self.vector_size = vector_size(self.algorithm, num_parameters(self.model))
        self.loss = loss_function(self.dataset.task)
        self._shards: OrderedDict[int, ClientShard] = OrderedDict()
        self._shard_bytes = 0
        self.vectorized: VectorizedCohort | None = None
        if spec.vectorize:
            reason = unsupported_reason(self.model, self.algorithm, self.device)
            if reason is None:
                self.vectorized = VectorizedCohort(self.model, self.dataset.task)
            else:
                log.warning("system.vectorize: sequential client steps instead, because %s", reason)
        log.info("worker %d on %s (%d torch threads)", worker_id, self.describe()["device"], spec.threads)

    def describe(self) -> dict[str, object]:
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        return {"worker_id": self.worker_id, "device": str(self.device), "device_name": name,
                "threads": torch.get_num_threads(), "pid": os.getpid(), "host": socket.gethostname(),
                "gpu_memory_cap": self.gpu_memory_cap}

    def gpu_memory(self) -> dict[str, int | None]:
        """This worker's CUDA memory so far, in bytes: its cap, and the peaks of what its tensors held
        (``max_memory_allocated``) and of what the caching allocator reserved (``max_memory_reserved``, what the
        cap bounds); None on a CPU."""
        cuda = self.device.type == "cuda"
        return {"cap": self.gpu_memory_cap,
                "peak_allocated": torch.cuda.max_memory_allocated(self.device) if cuda else None,
                "peak_reserved": torch.cuda.max_memory_reserved(self.device) if cuda else None}

    def shard(self, client_id: int, built: dict[int, ClientShard] | None = None) -> ClientShard:
        """A client's shard, from the LRU cache (at most ``shard_cache`` shards and ``shard_cache_mb`` MiB),
        else from ``built`` (made ahead by ``shards``), else built from the dataset spec. A round's clients beyond
        the cache are rebuilt every round."""
        shard = self._shards.get(client_id)
        if shard is None:
            shard = built.get(client_id) if built else None
            if shard is None:
                shard = self.dataset.shard(client_id)
            shard = shard.to(self.device)
            self._shards[client_id] = shard
            self._shard_bytes += shard.nbytes()
            budget = self.spec.shard_cache_mb * 2**20
            while len(self._shards) > 1 and (len(self._shards) > self.spec.shard_cache or self._shard_bytes > budget):
                self._shard_bytes -= self._shards.popitem(last=False)[1].nbytes()
        else:
            self._shards.move_to_end(client_id)
        return shard

    def shards(self, client_ids: Sequence[int]) -> list[ClientShard]:
        """``[shard(c) ...]`` with the cache's misses built together first (``data.base.build_shards``): the cache
        ends as ``shard`` one by one leaves it, and holds no more meanwhile than the returned list does."""
        ids = [int(c) for c in client_ids]
        missing = list(dict.fromkeys(c for c in ids if c not in self._shards))
        built = dict(zip(missing, build_shards(self.dataset, missing), strict=True)) if len(missing) > 1 else None
        return [self.shard(c, built) for c in ids]

    def prefetch(self, client_ids: Sequence[int]) -> int:
        """Build (and cache) these clients' shards ahead of their call, while this worker would otherwise wait;
        returns how many were built. It stops at half the cache (shards or MiB), so that it never evicts the shards
        it has just built, nor all the others."""
        built, nbytes, budget = 0, 0, self.spec.shard_cache_mb * 2**20 / 2
        ids = [int(c) for c in client_ids]
        for lo in range(0, len(ids), PREFETCH_BATCH):  # each slice's misses built together, as ``shards`` does
            part, made = ids[lo:lo + PREFETCH_BATCH], None
            for cid in part:
                if built >= self.spec.shard_cache // 2 or nbytes >= budget:
                    return built
                if made is None:  # built once the slice is known to be needed
                    missing = list(dict.fromkeys(c for c in part if c not in self._shards))
                    made = dict(zip(missing, build_shards(self.dataset, missing), strict=True))
                fresh = cid not in self._shards
                shard = self.shard(cid, made)
                _ = shard.all  # the concatenated local data a training client steps on
                if fresh:
                    built, nbytes = built + 1, nbytes + shard.nbytes()
        return built

    def _theta(self, theta: np.ndarray | torch.Tensor) -> torch.Tensor:
        """The server vector on this worker's device: the model's flat parameters, followed (Meta-SGD)
        by their learned rates; client steps and evaluation load only the parameter part into the module."""
        if isinstance(theta, torch.Tensor):
            out = theta.detach().to(self.device, torch.float32, copy=True)
        else:  # arrays from Ray's object store are read-only: copy into a writable array first
            out = torch.from_numpy(np.array(theta, dtype=np.float32)).to(self.device)
        if out.numel() != self.vector_size:
            raise ValueError(f"the server vector has {out.numel()} values, {self.spec.algorithm.name} on this model "
                             f"needs {self.vector_size}")
        return out

    @contextlib.contextmanager
    def _within_share(self) -> Iterator[None]:
        """A CUDA out-of-memory error under a cap (``cap_gpu_memory``) says so, and what to change."""
        try:
            yield
        except torch.OutOfMemoryError as exc:
            if self.gpu_memory_cap is None:
                raise
            raise share_exhausted(exc, self.worker_id, self.gpu_memory_cap, self.spec.gpu_memory_fraction) from exc

    @contextlib.contextmanager
    def _kernels(self) -> Iterator[None]:
        """cuDNN's fused RNN kernels have no double backward: second-order steps of an RNN on a GPU use
        the native kernels (same maths); only ``cudnn.enabled`` is switched, and restored after."""
        if not (self.device.type == "cuda" and self.algorithm.second_order
                and any(isinstance(m, nn.RNNBase) for m in self.model.modules())):
            yield
            return
        enabled = torch.backends.cudnn.enabled
        torch.backends.cudnn.enabled = False
        try:
            yield
        finally:
            torch.backends.cudnn.enabled = enabled

    def train(self, theta: np.ndarray | torch.Tensor, keys: int | Sequence[int], client_ids: list[int],
              reduce: Reduction | None = None, summarized: bool = False) -> TrainResult:
        """Update every client of ``client_ids`` from ``theta``; client i's batches are drawn from
        the stream (seed, "batches", key, client id), key = the round (or, in async mode, the
        refill group it was dispatched in): ``keys`` is one key for all or one per client. With ``reduce``
        the updates are summed here as they are produced (``simulator.client.reduce``): the result carries one
        partial sum and per-client scalars, and this worker never holds more than one block of vectors; ``summarized``
        (a submitted chunk, ``Backend.submit``): the vectors come back with their per-client scalars (``summarize``)."""
        with self._within_share():
            return self._train(theta, keys, client_ids, reduce, summarized)

    def _train(self, theta: np.ndarray | torch.Tensor, keys: int | Sequence[int], client_ids: list[int],
               reduce: Reduction | None, summarized: bool) -> TrainResult:
        configure_threads(self.spec.threads)
        params = self._theta(theta)
        per_client = [keys] * len(client_ids) if isinstance(keys, int | np.integer) else list(keys)
        ids = np.asarray(client_ids, dtype=np.int64)
        shards = self.shards(client_ids)
        rngs = generators(self.spec.seed, "batches", per_client, [int(c) for c in client_ids])
        vectorized = self.vectorized is not None and shards
        step = (CPU_CHUNK if self.device.type == "cpu" else max(1, len(shards))) if vectorized else 1
        step = max(1, min(step, BLOCK_BYTES // (4 * self.vector_size)))
        parts, merged = [], Merger(self.vector_size)
        for i in range(0, len(shards), step):  # a client's result does not depend on its block-mates
            updates, times = self._updates(params, shards[i:i + step], rngs[i:i + step])
            block = self._block([u.vector for u in updates])
            if self.spec.compression.method != "none":
                self._compress(block, per_client[i:i + step], client_ids[i:i + step])
            col = lambda values, dt: np.array(values, dt)  # noqa: E731
            part = TrainResult(self.worker_id, ids[i:i + step], block,
                               col([sh.num_samples for sh in shards[i:i + step]], np.int64),
                               col([u.samples_processed for u in updates], np.int64),
                               col([u.loss_before for u in updates], np.float64),
                               col([u.loss_after for u in updates], np.float64), col(times, np.float64))
            if reduce is not None:  # summed into one partial as the blocks come: O(P) memory for the call
                part = reduce_result(part, reduce, self.spec.seed, np.asarray(per_client[i:i + step]))
                merged.add(part.partial)  # into one buffer of its own: no copy per block
                part = dataclasses.replace(part, partial=None)
            parts.append(part)
        if not parts:
            return TrainResult(self.worker_id, ids, np.empty((0, self.vector_size), np.float32),
                               *(np.zeros(0, dt) for dt in (np.int64, np.int64, np.float64, np.float64, np.float64)))
        joined = {f.name: np.concatenate([getattr(p, f.name) for p in parts])
                  for f in dataclasses.fields(TrainResult) if f.name not in ("worker_id", "partial")
                  and getattr(parts[0], f.name) is not None}
        out = TrainResult(self.worker_id, partial=merged.partial() if reduce is not None else None, **joined)
        return summarize(out, self.spec.clip_norms) if summarized and reduce is None else out

    def _block(self, vectors: list[torch.Tensor]) -> np.ndarray:
        """The updates as one k x P float32 array: a vectorized group's rows are already one tensor on the CPU
        (``params.row_block``), used as it is; any others are copied into a new array, all at once."""
        rows = row_block(vectors)
        if rows is not None and rows.shape[1] == self.vector_size:
            return rows.numpy()
        block = np.empty((len(vectors), self.vector_size), np.float32)
        if vectors:
            torch.stack([v.to("cpu", torch.float32) for v in vectors], out=torch.from_numpy(block))
        return block

    def _updates(self, params: torch.Tensor, shards: list[ClientShard],
                 rngs: list[np.random.Generator]) -> tuple[list, list[float]]:
        """The updates of some clients (trained together when vectorized) and each one's real seconds."""
        start = time.perf_counter()
        if self.vectorized is not None:
            updates = self.vectorized.run(self.algorithm, params, shards, rngs, self.spec.algorithm)
            return updates, [(time.perf_counter() - start) / len(shards)] * len(shards)  # one batched computation
        updates, times = [], []
        for shard, rng in zip(shards, rngs, strict=True):
            start = time.perf_counter()
            with self._kernels():
                updates.append(self.algorithm.client_step(self.model, params, shard, self.spec.algorithm, rng,
                                                          self.loss))
            times.append(time.perf_counter() - start)
        return updates, times

    def _compress(self, vectors: np.ndarray, keys: list[int], client_ids: list[int]) -> None:
        """Each finite row replaced, in place, by what the server decodes of its compressed upload (seeded from
        (seed, "compress", key, client id)); a non-finite row stays as it is, to be rejected by the driver."""
        rngs = generators(self.spec.seed, "compress", keys, [int(c) for c in client_ids])
        for i, rng in enumerate(rngs):
            if np.isfinite(vectors[i]).all():
                vectors[i] = roundtrip(vectors[i], self.spec.compression, rng)

    def evaluate(self, theta: np.ndarray | torch.Tensor, round_idx: int, client_ids: list[int]) -> EvalResult:
        with self._within_share():
            return self._evaluate(theta, round_idx, client_ids)

    def _evaluate(self, theta: np.ndarray | torch.Tensor, round_idx: int, client_ids: list[int]) -> EvalResult:
        configure_threads(self.spec.threads)
        params = self._theta(theta)
        evals = []
        for cid in client_ids:
            rng = generator(self.spec.seed, "eval_batches", round_idx, int(cid))
            evals.append(evaluate_client(self.model, params, self.shard(int(cid)), self.spec.eval,
                                         self.spec.algorithm, rng, self.loss, self.dataset.task, self.algorithm))
        col = lambda attr: np.array([getattr(e, attr) for e in evals], np.float64)  # noqa: E731
        return EvalResult(self.worker_id, np.asarray(client_ids, dtype=np.int64), col("loss_pre"),
                          col("loss_post"), col("metric_pre"), col("metric_post"))
