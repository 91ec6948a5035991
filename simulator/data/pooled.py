"""Pooled labelled datasets split over clients by a partitioner (``simulator.data.partitioners``).

One labelled pool of N samples is partitioned over ``num_clients + eval_clients`` clients with
``partitioners.partition`` (iid, Dirichlet label skew, McMahan et al.'s shards, quantity skew; see
that module's docstring for the sources). Client ``c`` gets part ``c``: ids ``0 .. num_clients-1``
train, the rest are held out. A client's part (sorted pool indices) is shuffled with
``generator(seed, "data", 0, c)`` and cut into a support split (first) and a query split (last
``n_query`` samples, ``n_query = min(max(1, round(n * test_fraction)), n - 1)``, as in ``Synthetic``).

The dataset object holds only the labels and the partition (a flat index array plus offsets); the
features of a client are built when its shard is asked for.

- ``gaussian``: a synthetic benchmark, a Gaussian mixture generated in-process (see ``GaussianPool``).
- ``digits``: the UCI optical recognition of handwritten digits data (Alpaydin & Kaynak 1998), as
  bundled with scikit-learn (``sklearn.datasets.load_digits``).
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
import torch

from simulator.config.schema import ConfigError, DataConfig
from simulator.data import partitioners
from simulator.data.base import ClientShard
from simulator.rng import generator

#: samples per noise block of the Gaussian pool: block b's noise comes from generator(seed, "data", 1, b).
#: Part of the data's definition (changing it changes every sample); small, so that a client whose few
#: samples are scattered over the pool draws little noise it does not use.
NOISE_BLOCK = 256

#: every client needs a support and a query sample
MIN_CLIENT_SIZE = 2


class PooledDataset:
    """A labelled pool partitioned over clients; subclasses supply ``_features(indices)``."""

    task = "classification"
    input_dim: int
    output_dim: int
    input_dtype = torch.float32
    name: str

    def __init__(self, cfg: DataConfig, seed: int, labels: np.ndarray, num_classes: int, input_dim: int) -> None:
        self.seed, self.test_fraction = seed, cfg.test_fraction
        self.labels, self.output_dim, self.input_dim = labels, num_classes, input_dim
        self.num_clients_total = cfg.num_clients + cfg.eval_clients
        parts = _partition(cfg, labels, self.num_clients_total, seed, self.name)
        sizes = np.fromiter((p.size for p in parts), dtype=np.int64, count=len(parts))
        #: client c's sorted pool indices are ``order[offsets[c]:offsets[c + 1]]``
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        index_dtype = np.int32 if labels.size < 2**31 else np.int64
        self.order = np.concatenate(parts).astype(index_dtype)

    def _features(self, indices: np.ndarray) -> np.ndarray:
        """float32 features (len(indices), input_dim) of these pool indices."""
        raise NotImplementedError

    def _check(self, client_id: int) -> int:
        if not 0 <= client_id < self.num_clients_total:
            raise IndexError(f"client id {client_id} out of range 0 .. {self.num_clients_total - 1}")
        return int(client_id)

    def part(self, client_id: int) -> np.ndarray:
        """Client ``client_id``'s pool indices, sorted (the partitioner's part)."""
        c = self._check(client_id)
        return self.order[self.offsets[c]:self.offsets[c + 1]].astype(np.int64)

    def client_indices(self, client_id: int) -> np.ndarray:
        """The client's pool indices in shard order: support first, then query."""
        part = self.part(client_id)
        return part[generator(self.seed, "data", 0, int(client_id)).permutation(part.size)]

    def num_samples(self, client_id: int) -> int:
        c = self._check(client_id)
        return int(self.offsets[c + 1] - self.offsets[c])

    def split_sizes(self, client_id: int) -> tuple[int, int]:
        n = self.num_samples(client_id)
        n_query = min(max(1, round(n * self.test_fraction)), n - 1)
        return n - n_query, n_query

    def shard(self, client_id: int) -> ClientShard:
        idx = self.client_indices(client_id)
        k, _ = self.split_sizes(client_id)
        x = torch.from_numpy(np.ascontiguousarray(self._features(idx), dtype=np.float32))
        y = torch.from_numpy(self.labels[idx].astype(np.int64))
        return ClientShard.from_rows(int(client_id), x, y, k)

    @cached_property
    def _histogram(self) -> np.ndarray:
        parts = np.split(self.order, self.offsets[1:-1])
        return partitioners.label_histogram(self.labels, parts, self.output_dim)

    def label_histogram(self) -> np.ndarray:
        """Per-client label counts, int64 of shape (num_clients + eval_clients, num_classes)."""
        return self._histogram.copy()


class GaussianPool(PooledDataset):
    """A synthetic benchmark: a Gaussian mixture of ``num_classes`` classes in ``features`` dimensions.

    Pool size N = ``pool_size`` or 50 per client. Labels y_i ~ U{0 .. num_classes-1} from
    ``generator(seed, "data_global", 1)``; class means mu_c ~ N(0, separation^2 I) from
    ``generator(seed, "data_global", 2)``; x_i = mu_{y_i} + e_i with e_i ~ N(0, I). The noise e_i is
    a pure function of the pool index i: row ``i % NOISE_BLOCK`` of the float32 standard-normal
    matrix (NOISE_BLOCK x features) drawn from ``generator(seed, "data", 1, i // NOISE_BLOCK)``
    (round 1 keeps it apart from the client-keyed shuffles of round 0). So a sample has the same
    features whichever client or process builds it, and only the labels are held in memory.
    """

    name = "gaussian"

    def __init__(self, cfg: DataConfig, seed: int) -> None:
        total = cfg.num_clients + cfg.eval_clients
        n = cfg.pool_size or 50 * total
        if n < MIN_CLIENT_SIZE * total:
            raise ConfigError(
                f"data.num_clients + data.eval_clients = {total} clients need at least {MIN_CLIENT_SIZE} samples each "
                f"but data.pool_size = {n}; raise data.pool_size to at least {MIN_CLIENT_SIZE * total} (or 0 for 50 "
                f"per client) or lower data.num_clients")
        k = cfg.num_classes
        dtype = np.int16 if k <= np.iinfo(np.int16).max else np.int32
        labels = generator(seed, "data_global", 1).integers(0, k, n, dtype=dtype)
        self.means = generator(seed, "data_global", 2).normal(0.0, cfg.separation, (k, cfg.features))
        super().__init__(cfg, seed, labels, k, cfg.features)

    def _noise_block(self, block: int, rows: int = NOISE_BLOCK) -> np.ndarray:
        """The first ``rows`` rows of block ``block``'s noise (a prefix of the full block's draw)."""
        return generator(self.seed, "data", 1, block).standard_normal((rows, self.input_dim), dtype=np.float32)

    def _features(self, indices: np.ndarray) -> np.ndarray:
        out = np.empty((indices.size, self.input_dim), dtype=np.float32)
        blocks = indices // NOISE_BLOCK
        by_block = np.argsort(blocks, kind="stable")
        firsts = np.flatnonzero(np.diff(blocks[by_block], prepend=-1))
        for start, stop in zip(firsts, [*firsts[1:], indices.size], strict=True):
            pos = by_block[start:stop]
            block = int(blocks[pos[0]])
            rows = indices[pos] - block * NOISE_BLOCK
            out[pos] = self._noise_block(block, int(rows.max()) + 1)[rows]
        out += self.means[self.labels[indices]].astype(np.float32)
        return out


class DigitsPool(PooledDataset):
    """UCI optical recognition of handwritten digits (Alpaydin & Kaynak 1998), via scikit-learn's
    bundled copy (``sklearn.datasets.load_digits``): 1,797 8x8 images, 64 features scaled from
    0..16 to [0, 1], 10 classes. ``num_classes``, ``features``, ``pool_size`` and ``separation``
    do not apply."""

    name = "digits"

    def __init__(self, cfg: DataConfig, seed: int) -> None:
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            raise ConfigError('data.name = "digits" needs scikit-learn; '
                              'install it with pip install "metafleet[digits]"') from None
        x, y = load_digits(return_X_y=True)
        total = cfg.num_clients + cfg.eval_clients
        if len(y) < MIN_CLIENT_SIZE * total:
            raise ConfigError(
                f"data.num_clients + data.eval_clients = {total} clients need at least {MIN_CLIENT_SIZE} samples each "
                f"but digits has {len(y)}; lower data.num_clients to at most "
                f"{len(y) // MIN_CLIENT_SIZE - cfg.eval_clients} (with data.eval_clients = {cfg.eval_clients})")
        self.x = (x / 16.0).astype(np.float32)
        super().__init__(cfg, seed, y.astype(np.int16), 10, self.x.shape[1])

    def _features(self, indices: np.ndarray) -> np.ndarray:
        return self.x[indices]


def _partition(cfg: DataConfig, labels: np.ndarray, total: int, seed: int, name: str) -> list[np.ndarray]:
    """``partitioners.partition`` with the config's parameters; bad sizes become a ConfigError."""
    clients = f"data.num_clients + data.eval_clients = {total} clients"
    params: dict[str, object] = {}
    hint = "lower data.num_clients"
    if cfg.partition == "dirichlet":
        params = {"alpha": cfg.dirichlet_alpha, "min_size": MIN_CLIENT_SIZE}
        hint = "raise data.dirichlet_alpha or lower data.num_clients"
    elif cfg.partition == "shards":
        params = {"shards_per_client": cfg.shards_per_client}
        if cfg.shards_per_client * total > labels.size:
            raise ConfigError(
                f"data.shards_per_client * ({clients}) = {cfg.shards_per_client * total} shards exceeds the "
                f"{labels.size} samples of {name}; lower data.shards_per_client or data.num_clients")
    elif cfg.partition == "quantity":
        params = {"sigma": cfg.quantity_sigma, "min_size": MIN_CLIENT_SIZE}
        hint = "lower data.quantity_sigma or data.num_clients"
    try:
        return partitioners.partition(cfg.partition, labels, total, seed, **params)
    except ValueError as e:
        raise ConfigError(f"data.partition = {cfg.partition!r} cannot split {name} over {clients}: {e}; "
                          f"{hint}") from None


def make_pooled(cfg: DataConfig, seed: int) -> PooledDataset:
    """The pooled dataset ``cfg.name`` ("gaussian" or "digits") partitioned over the clients."""
    if cfg.name == "gaussian":
        return GaussianPool(cfg, seed)
    if cfg.name == "digits":
        return DigitsPool(cfg, seed)
    raise ValueError(f"{cfg.name!r} is not a pooled dataset")
